# syntax=docker/dockerfile:1
# One image for both services: the entrypoint picks the service from its first argument.
#   docker build -t x402-agent-gateway:0.1.0 .
#   docker run --rm x402-agent-gateway:0.1.0 gateway serve --config /etc/x402/gateway.json
#   docker run --rm x402-agent-gateway:0.1.0 facilitator serve --config /etc/x402/facilitator.toml
# The runtime stage has no compiler, no node, anvil or solc (the dev chain is not in the image).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: wheels of the project and of every dependency (compiled here if a wheel is missing)
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY facilitator ./facilitator
COPY budgets ./budgets
COPY gateway ./gateway
COPY devtools ./devtools
RUN pip wheel --wheel-dir /wheels .

# -- runtime: a virtualenv with the wheels only, run as an unprivileged user
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/x402/bin:$PATH \
    ETH_HASH_BACKEND=pysha3
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/x402 \
 && /opt/x402/bin/pip install --no-cache-dir --no-index --find-links /wheels x402-agent-gateway \
 && /opt/x402/bin/pip uninstall -y pip \
 && groupadd --system --gid 10001 x402 \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/x402 --shell /usr/sbin/nologin x402 \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/x402
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/x402-entrypoint
# The state directory (embedded SQLite stores when no Redis is configured) is the working
# directory; in Kubernetes it is an emptyDir under a read-only root filesystem.
WORKDIR /var/lib/x402
USER 10001:10001
EXPOSE 8402 4020
STOPSIGNAL SIGTERM
LABEL org.opencontainers.image.title="x402-agent-gateway" \
      org.opencontainers.image.description="x402 agent payment gateway and facilitator" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/x402-entrypoint"]
CMD ["gateway", "serve", "--config", "/etc/x402/gateway.json"]
