# syntax=docker/dockerfile:1
# Serving image: `barlow serve` (BentoML + ONNX Runtime) on port 3000, as a numeric non-root user.
# The MODEL_DIR (current.json + versions/, or one flat version folder: model.onnx + model.json) is mounted
# at /models/model, or baked in (a version folder, models/barlow/versions/<version>, bakes just that model):
#   docker build -f docker/serve.Dockerfile -t barlow-serve .
#   docker build -f docker/serve.Dockerfile --build-arg MODEL_DIR=models/fmnist -t barlow-serve:fmnist .
#   docker run -p 3000:3000 -v "$PWD/models/fmnist:/models/model:ro" barlow-serve
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# Build stage: a virtual environment with the project and its dependencies (all binary wheels).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY serving/ serving/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 barlow \
    && useradd --no-log-init --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin barlow
COPY --from=build /opt/venv /opt/venv
# The default is an empty placeholder: mount the real model directory over /models/model.
ARG MODEL_DIR=docker/no-model
COPY ${MODEL_DIR}/ /models/model/
# HOME and BENTOML_HOME on /tmp: the root filesystem may be read-only (Kubernetes mounts emptyDirs).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    BENTOML_HOME=/tmp/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    BARLOW_MODEL_DIR=/models/model
USER 10001:10001
EXPOSE 3000
# urlopen raises on 503, so the check passes only once the model is loaded and /readyz answers 200.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]
ENTRYPOINT ["barlow", "serve"]
CMD ["/models/model", "--host", "0.0.0.0", "--port", "3000"]
