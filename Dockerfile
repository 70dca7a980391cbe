# batchsize-service: the HTTP API and its probe worker in one container.
#
#   docker build -t batchsize-service .
#   docker run --gpus all -p 8000:8000 -v batchsize-data:/data batchsize-service
#
# torch comes from PyPI: on Linux x86_64 that is the CUDA build, which carries its own CUDA runtime
# (nvidia-* wheels), so the base image needs no CUDA; the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit for `--gpus all`. Without a GPU the same image probes on the CPU.
# A smaller CPU-only image: --build-arg TORCH_SPEC=torch==2.13.0 \
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# See docs/docker.md (and scripts/docker_smoke.sh, which builds and checks this image with podman).

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# The torch release the test suite runs on; the CUDA build on PyPI by default.
ARG TORCH_SPEC="torch==2.13.0"
# Empty: PyPI. Set to a PyTorch wheel index (e.g. .../whl/cpu) for another build of torch.
ARG TORCH_INDEX_URL=""
# Fixed ids, so a bind-mounted /data can be chown'ed to match on the host.
ARG APP_UID=10001
ARG APP_GID=10001

SHELL ["/bin/sh", "-eu", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# 1. A venv (`python3 -m venv` works on python:3.11-slim and on a Debian python3 alike) and torch alone
#    in it: the largest layer (GBs for CUDA), rebuilt only when TORCH_SPEC changes. The spec is pinned
#    through the build argument, which hadolint cannot see into.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
 && python -m pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

# 2. The other dependencies, read from pyproject.toml: rebuilt only when it changes.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 3. The package itself (service, models, migrations + alembic's script template, and the client package
#    batchsize_client that its schemas and CLI use), installed into the venv, so `batchsize migrate` finds
#    its migrations wherever it runs.
COPY README.md alembic.ini ./
COPY client ./client
COPY models ./models
COPY migrations ./migrations
COPY service ./service
RUN python -m pip install --no-cache-dir --no-deps . \
 && rm -rf build ./*.egg-info \
 && batchsize --help > /dev/null

# A non-root user with a fixed id; /data (the SQLite file, uploaded artifacts) belongs to it.
RUN groupadd --system --gid "$APP_GID" batchsize \
 && useradd --system --uid "$APP_UID" --gid "$APP_GID" --home-dir /home/batchsize --create-home \
      --shell /usr/sbin/nologin batchsize \
 && mkdir -p /data \
 && chown "$APP_UID:$APP_GID" /data

ENV BATCHSIZE_HOST=0.0.0.0 \
    BATCHSIZE_PORT=8000 \
    BATCHSIZE_DATA_DIR=/data

VOLUME ["/data"]
EXPOSE 8000
USER ${APP_UID}:${APP_GID}

# Liveness without curl: the stdlib asks /healthz; any error or non-2xx status fails the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BATCHSIZE_PORT', '8000'), timeout=4)"]

# `docker run IMAGE` serves (migrations first); `docker run IMAGE migrate` or `... worker` also work.
ENTRYPOINT ["batchsize"]
CMD ["serve"]
