# syntax=docker/dockerfile:1
# modelserve server image: slim, non-root (uid 10001), runs with a read-only root filesystem.
#
#   docker build -t modelserve:0.1.0 .                                  # extras: postgres, s3
#   docker build -t modelserve:0.1.0-gpu --build-arg EXTRAS=postgres,s3,gpu,auth .
#
# The default command serves /models with API keys (it refuses to listen beyond loopback without
# authentication); the keys live in the embedded registry under the home folder, so keep that on a volume:
#   docker run --rm -v ms-home:/home/modelserve modelserve:0.1.0 keys create --name me --role admin
#   docker run -v ms-home:/home/modelserve -v "$PWD/models:/models:ro" -p 8000:8000 -p 8001:8001 modelserve:0.1.0
#
# The Kubernetes manifests (`modelserve deploy k8s`) pass their own arguments to the same entrypoint.

ARG PYTHON_VERSION=3.12

# -- build: the modelserve wheel and the wheels of everything it needs with EXTRAS --------------------------
FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=postgres,s3
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --wheel-dir /wheels ".[${EXTRAS}]"

# -- runtime: install from those wheels only (no index, no compiler), then drop root ----------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
ARG EXTRAS=postgres,s3
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/home/modelserve
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "modelserve[${EXTRAS}]" \
 && groupadd --system --gid 10001 modelserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/modelserve --create-home modelserve \
 && mkdir -p /models /var/cache/modelserve /var/lib/modelserve/spill \
 && chown 10001:10001 /var/cache/modelserve /var/lib/modelserve/spill
WORKDIR /home/modelserve
# numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd
USER 10001:10001
# HTTP, gRPC, metrics
EXPOSE 8000 8001 9090
# no curl in a slim image: the interpreter asks the liveness route (plain HTTP on 8000; override with TLS)
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/live', timeout=4)"]
ENTRYPOINT ["modelserve"]
# Sensible for `docker run` (see the top); the Kubernetes manifests replace it with registry-mode arguments.
CMD ["serve", "--model-repository", "/models", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001", \
     "--metrics-port", "9090", "--auth", "keys", \
     "--monitor-spill", "/var/lib/modelserve/spill/spill.jsonl"]
