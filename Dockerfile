# syntax=docker/dockerfile:1
# The production image: a multi-stage build, a non-root user, a health check, JSON-form CMD.
# Build: docker build -t gateway .      Run: see deploy/ (certificates and config are mounted).

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock requirements-runtime.lock pyproject.toml README.md LICENSE ./
# The runtime environment gets only the locked runtime dependencies; the models are built
# with the full lock (scikit-learn) in a separate environment that is not shipped.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes -r requirements-runtime.lock \
 && python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes -r requirements.lock
COPY gateway ./gateway
COPY gateway_client ./gateway_client
COPY models/build.py ./models/build.py
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/build/bin/python models/build.py --root /opt/models

FROM python:3.11.14-slim-bookworm
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/models /models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8443 8081
# Probes use the plain-HTTP probe listener (server.probe_port): they carry no client certificate.
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8081/v2/health/live', timeout=2).status != 200)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.toml"]
