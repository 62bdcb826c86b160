# SkinGPT on a CUDA host: offline, non-root, weights mounted read-only, loopback-published.
#
#   docker build -t skingpt .
#   docker run --gpus all --read-only --tmpfs /tmp:mode=1777 \
#       -v /srv/skingpt/weights/skingpt4-vicuna7b:/weights:ro \
#       -e SKINGPT_AUTH='clinic:choose-a-long-password' -e SKINGPT_API_KEY='choose-a-long-api-key' \
#       -p 127.0.0.1:7860:7860 skingpt
#
# Inside the container the app listens on 0.0.0.0 (so that the published port reaches it), which
# the app only allows with a password (and a key for its /v1 API, or SKINGPT_NO_API=1); publish on
# 127.0.0.1 as above unless a reverse proxy with TLS stands in front.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    SKINGPT_WEIGHTS=/weights \
    SKINGPT_HOST=0.0.0.0 \
    SKINGPT_PORT=7860

# fonts-wqy-microhei: the CJK font the Chinese PDF report embeds (nothing is fetched at run time)
# cmake, g++, python3-dev: pip builds llama-cpp-python (the CPU runtime of GGUF bundles) from source,
# for AVX2 CPUs rather than the build machine's own (CMAKE_ARGS)
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev cmake g++ \
    fonts-wqy-microhei && rm -rf /var/lib/apt/lists/*
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

RUN useradd --create-home --uid 10001 skingpt
WORKDIR /opt/skingpt
COPY requirements.txt .
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.txt
COPY model/ model/
COPY tools/ tools/
COPY app/ app/
COPY cli/ cli/
COPY launch.py .

USER skingpt
VOLUME ["/weights"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]
CMD ["/opt/venv/bin/python", "launch.py"]
