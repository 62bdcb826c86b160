# SkinGPT on a CUDA host, or any x86-64 CPU (llama.cpp dispatches at run time): offline, non-root,
# weights mounted read-only, loopback-published.
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
# cmake, g++, python3-dev: llama.cpp (the CPU runtime of GGUF bundles) is built from source below
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev cmake g++ \
    fonts-wqy-microhei && rm -rf /var/lib/apt/lists/*

# llama.cpp with runtime CPU dispatch, so that one image runs on any x86-64 CPU: ggml's CPU backend is
# built once per CPU generation (x64, SSE4.2, Sandy Bridge, Haswell/AVX2, Skylake-X/AVX-512, Ice Lake,
# Alder Lake, Sapphire Rapids/AMX, ...) as libggml-cpu-<variant>.so, and at start-up ggml scores each
# against the CPU and loads the best; the app's start-up line names it ("llama.cpp's CPU code: ...").
# (An image built with -march=native on an AVX-512 host would stop with an illegal instruction on an
# AVX2 clinic PC.) It is the llama.cpp vendored in the pinned llama-cpp-python, whose bindings are then
# installed without a native build of their own (LLAMA_BUILD=OFF) and load it from LLAMA_CPP_LIB_PATH.
# GGML_OPENMP=OFF: ggml's own thread pool, not PyTorch's libgomp (see requirements.txt).
ARG LLAMA_CPP_PYTHON=0.3.36
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip download -q --no-deps --no-binary :all: -d /tmp/llama \
        "llama-cpp-python==${LLAMA_CPP_PYTHON}" \
    && tar xzf /tmp/llama/llama_cpp_python-${LLAMA_CPP_PYTHON}.tar.gz -C /tmp/llama \
    && cmake -S /tmp/llama/llama_cpp_python-${LLAMA_CPP_PYTHON}/vendor/llama.cpp -B /tmp/llama/build \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON \
        -DGGML_CPU_ALL_VARIANTS=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_COMMON=OFF \
    && cmake --build /tmp/llama/build -j"$(nproc)" \
    && mkdir -p /opt/llama-cpp/lib && cp -a /tmp/llama/build/bin/*.so* /opt/llama-cpp/lib/ \
    && rm -rf /tmp/llama
ENV LLAMA_CPP_LIB_PATH=/opt/llama-cpp/lib \
    CMAKE_ARGS="-DLLAMA_BUILD=OFF"

RUN useradd --create-home --uid 10001 skingpt
WORKDIR /opt/skingpt
COPY requirements.txt .
RUN /opt/venv/bin/pip install -r requirements.txt
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
