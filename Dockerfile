# impasto server image (CPU). Build: docker build -t impasto .   Run: docker run -p 50051:50051 impasto
FROM python:3.11-slim

WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

# torch's CPU build, pinned, from PyTorch's CPU index: PyPI's default Linux wheel is a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

COPY proto proto
COPY scripts/gen_proto.py scripts/gen_proto.py
COPY clients clients
COPY server server
COPY backends backends
COPY compiler compiler
COPY lora lora
COPY training training
COPY models models
COPY pyproject.toml README.md ./

RUN pip install "grpcio-tools==1.85.1" \
 && python scripts/gen_proto.py \
 && pip install ./clients/python ".[compile,lora]" \
 && pip uninstall -y grpcio-tools

EXPOSE 50051
# Health: grpc.health.v1 on the same port (e.g. grpc_health_probe -addr=:50051).
CMD ["impasto", "serve", "--host", "0.0.0.0", "--port", "50051"]
