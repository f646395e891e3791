# syntax=docker/dockerfile:1
# The ext_proc sidecar image: `docker build -t ai-extproc .`
#   docker run --rm -v $PWD/config:/etc/ai-gateway/policy:ro ai-extproc \
#     --config /etc/ai-gateway/policy/dev.yaml
# The entrypoint is `extproc serve`; arguments go to it (--config, --workers).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: install the package and its dependencies into a venv (binary wheels)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# xds-protos ships an older copy of opentelemetry/proto/* (the OTLP exporter of
# `telemetry:` needs the real one): put opentelemetry-proto's files back, as `make`.
RUN /opt/venv/bin/pip install --prefer-binary --no-compile . \
 && /opt/venv/bin/pip install --no-compile --force-reinstall --no-deps \
      "opentelemetry-proto==$(/opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')" \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# ---- run: the venv on a clean slim Python, no compilers, no pip cache, not root
FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 extproc \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin extproc
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# gRPC (worker N on 50051+N) and Prometheus /metrics.
EXPOSE 50051 50052 9464
ENTRYPOINT ["extproc", "serve"]
CMD ["--config", "/etc/ai-gateway/policy/policy.yaml"]
