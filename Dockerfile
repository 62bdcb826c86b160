# SkinGPT on a CUDA host. First version: the clinic-app issue finishes it (health check, app settings).
# Build:  docker build -t skingpt .
# Run:    docker run --gpus all -p 127.0.0.1:7860:7860 -v /srv/skingpt/bundle:/weights:ro skingpt
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 skingpt
WORKDIR /opt/skingpt
COPY requirements.txt .
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install -r requirements.txt
COPY --chown=skingpt:skingpt model/ model/
COPY --chown=skingpt:skingpt app/ app/
COPY --chown=skingpt:skingpt launch.py .

USER skingpt
# weights are mounted read-only at /weights; nothing is downloaded at run time
VOLUME ["/weights"]
EXPOSE 7860
CMD ["/opt/venv/bin/python", "launch.py", "inspect", "--weights", "/weights"]
