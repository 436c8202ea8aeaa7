# syntax=docker/dockerfile:1
# Training image: the official PyTorch CUDA runtime (CUDA 13, cuDNN 9, which onnxruntime-gpu 1.31
# also needs) plus this project; `barlow-torchrun ... barlow train` (torchrun, exit codes aside) is the entrypoint. TORCH_VERSION is the
# torch the image runs: inside pyproject's torch range (tests/test_docker.py checks) and >= 2.12, the
# first torchrun that reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT (how long the workers get to write their
# SIGTERM checkpoint; older ones kill them after 30 s). The build fails if pip replaces it.
# The Kubernetes Jobs (k8s/) also run `barlow export|embed|index` in it.
#   docker build -f docker/train.Dockerfile -t barlow-train .
#   docker run --gpus all --shm-size=8g -v "$PWD/data:/data" barlow-train \
#       --preset fmnist --data /data/shards --out /data/runs/fmnist
ARG TORCH_VERSION=2.14.1
ARG BASE_IMAGE=pytorch/pytorch:${TORCH_VERSION}-cuda13.0-cudnn9-runtime

# Build stage: the project as a wheel; its source tree and build backend stay here.
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY serving/ serving/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/barlow
# A named user with a NUMERIC uid: Kubernetes runAsNonRoot can only verify numbers, and
# getpass.getuser() (torch.compile's cache path) needs the uid to exist in /etc/passwd.
RUN groupadd --gid 10001 barlow \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin barlow
# Dependencies resolve against the torch/torchvision already in the base image (pyproject allows them);
# the last line fails the build if pip swapped torch for another version.
ARG TORCH_VERSION
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir /wheels/barlow_embed-*.whl \
    && barlow --help > /dev/null \
    && python -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '${TORCH_VERSION}' else 'torch ' + v + ' in the image, ${TORCH_VERSION} expected')"
WORKDIR /home/barlow
USER 10001:10001
# torchrun's agent stays PID 1 (exec form): on SIGTERM it signals the workers, which write a checkpoint;
# barlow-torchrun is torchrun with exit codes a Job can tell apart (143 on SIGTERM, 75: store unreachable).
# --standalone is the one-machine launch; the Kubernetes Job replaces it with the multi-node line.
ENTRYPOINT ["barlow-torchrun", "--standalone", "--nproc-per-node=gpu", "--max-restarts=3", "--no-python", "barlow", "train"]
