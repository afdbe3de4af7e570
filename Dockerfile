# syntax=docker/dockerfile:1
# The gateway's images: `cpu` (the default, ONNX Runtime's CPU provider) and `cuda` (onnxruntime-gpu
# with NVIDIA's CUDA and cuDNN runtime wheels). Non-root, read-only root filesystem, no key inside.
#
#   podman build --target cpu  -t gateway:cpu  .        (make image)
#   podman build --target cuda -t gateway:cuda .        (make image-cuda: several GB of wheels)
#
# The base is a build argument so that the same file builds from a Debian-made base where no
# registry can be reached (deploy/dev/containers-setup makes one); pin the public one by digest.
# checkov:skip=CKV_DOCKER_7: the base is this build argument, whose default is pinned by tag and digest
ARG BASE=docker.io/library/python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
ARG GATEWAY_UID=10001
ARG WORKER_GID=10002
ARG WORKER_UID_BASE=61184

# --- build: the helper, the environments and the SBOM; nothing of it ships but what is copied ---
FROM ${BASE} AS build
ARG GATEWAY_UID
ARG WORKER_GID
ARG WORKER_UID_BASE
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The compiler is the build's only system package; the distribution's current one is wanted.
# hadolint ignore=DL3008
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY deploy/image/worker-exec.c deploy/image/sbom.lock ./deploy/image/
RUN mkdir -p /out \
 && gcc -O2 -Wall -Wextra -Werror -fstack-protector-strong -D_FORTIFY_SOURCE=2 -fPIE -pie -Wl,-z,relro,-z,now \
      -DGATEWAY_UID="${GATEWAY_UID}" -DWORKER_GID="${WORKER_GID}" -DWORKER_UID_BASE="${WORKER_UID_BASE}" \
      -DPYTHON='"/opt/venv/bin/python"' -o /out/worker-exec deploy/image/worker-exec.c \
 && python3 -m venv /opt/sbom \
 && /opt/sbom/bin/pip install -q --require-hashes -r deploy/image/sbom.lock
COPY requirements-runtime-cpu.lock requirements-runtime-cuda.lock ./

# The locked dependencies first (a layer that changes only with the lock), then the gateway.
FROM build AS venv-cpu
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --require-hashes -r requirements-runtime-cpu.lock
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
COPY gateway_client ./gateway_client
RUN /opt/venv/bin/pip install -q --no-deps . \
 && /opt/sbom/bin/cyclonedx-py environment --output-format JSON --output-file /out/sbom.cdx.json /opt/venv/bin/python

FROM build AS venv-cuda
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -q --require-hashes -r requirements-runtime-cuda.lock
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
COPY gateway_client ./gateway_client
RUN /opt/venv/bin/pip install -q --no-deps . \
 && /opt/sbom/bin/cyclonedx-py environment --output-format JSON --output-file /out/sbom.cdx.json /opt/venv/bin/python

# --- runtime: users, the worker helper, the writable places (all volumes) ---
FROM ${BASE} AS runtime
ARG GATEWAY_UID
ARG WORKER_GID
LABEL org.opencontainers.image.title="gateway" \
      org.opencontainers.image.description="Secure model-serving gateway: mTLS, OIDC with MFA, RBAC, limits, audit, ONNX Runtime workers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/gateway" \
      org.opencontainers.image.vendor="gateway"
# The gateway's user; the workers' group (each worker runs as a user id of its own from
# WORKER_UID_BASE, which owns no file); the helper that starts them, runnable by the gateway alone;
# a worker host container's user (gateway-worker). Volumes mounted on these folders take their
# owners (podman), or the pod's fsGroup (Kubernetes).
COPY --from=build /out/worker-exec /usr/local/libexec/gateway/worker-exec
RUN groupadd --system --gid "${GATEWAY_UID}" gateway \
 && useradd --system --uid "${GATEWAY_UID}" --gid gateway --no-create-home --shell /usr/sbin/nologin gateway \
 && groupadd --system --gid "${WORKER_GID}" gateway-worker \
 && useradd --system --uid "${WORKER_GID}" --gid gateway-worker --no-create-home --shell /usr/sbin/nologin gateway-worker \
 && chown root:gateway /usr/local/libexec/gateway/worker-exec \
 && chmod 4750 /usr/local/libexec/gateway/worker-exec \
 && mkdir -p /etc/gateway /run/gateway /run/gateway-worker /var/lib/gateway/audit /var/lib/gateway/issuer /models \
 && chown gateway:gateway /run/gateway /var/lib/gateway/audit /var/lib/gateway/issuer /models \
 && chown gateway-worker:gateway-worker /run/gateway-worker \
 && chmod 0700 /run/gateway /run/gateway-worker /var/lib/gateway/audit /var/lib/gateway/issuer
# Defaults that make the image work with a `gateway init` configuration mounted at /etc/gateway;
# environment variables override the file, so change these with -e, not in gateway.toml.
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY__SERVER__HOST=0.0.0.0 \
    GATEWAY__SERVER__PROBE_PORT=8081 \
    GATEWAY__SERVER__RUNTIME_DIR=/run/gateway \
    GATEWAY__SERVER__PID_FILE=/run/gateway/gateway.pid \
    GATEWAY__SERVER__WORKER_EXEC=/usr/local/libexec/gateway/worker-exec \
    GATEWAY__SERVER__WORKER_USER=gateway-worker \
    GATEWAY__AUDIT__DIRECTORY=/var/lib/gateway/audit \
    GATEWAY__MODELS__ROOT=/models
VOLUME ["/var/lib/gateway/audit", "/run/gateway"]
EXPOSE 8443 8081
# The probe listener (server.probe_port, set above) answers without a client certificate.
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8081/v2/health/live', timeout=2).status != 200)"]
USER ${GATEWAY_UID}:${GATEWAY_UID}
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.toml"]

FROM runtime AS cuda
COPY --from=venv-cuda /opt/venv /opt/venv
COPY --from=venv-cuda /out/sbom.cdx.json /usr/share/gateway/sbom.cdx.json
LABEL org.opencontainers.image.variant="cuda"
# Fail at start when the CUDA provider cannot load, rather than serve on the CPU unnoticed.
ENV GATEWAY_REQUIRE_CUDA=1 NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
COPY --from=venv-cpu /out/sbom.cdx.json /usr/share/gateway/sbom.cdx.json
LABEL org.opencontainers.image.variant="cpu"
