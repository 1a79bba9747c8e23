# One image for both processes of the service; only the command differs:
#   api:    iwae serve --host 0.0.0.0 --port 8000   (the default CMD)
#   worker: iwae worker
#
# Build arguments:
#   TORCH_VARIANT  which PyTorch build: cu126 (default: CUDA 12.6, for the GPU worker; needs an
#                  NVIDIA driver >= 525 and a GPU of compute capability 5.0 to 9.0), cu130
#                  (CUDA 13.0: driver >= 580, needed for Blackwell GPUs) or cpu (a much smaller
#                  image, for the api alone or a host without a GPU). It names the wheel index
#                  https://download.pytorch.org/whl/${TORCH_VARIANT}.
#   TORCH_VERSION  the PyTorch release: the one CI tests with (.ci/run installs the same).
#   TORCH_INDEX_URL  where that build comes from (default: PyTorch's index for TORCH_VARIANT).
#   TORCH_FIND_LINKS a folder inside the build context that holds the torch wheel (allowed in
#                  .dockerignore: wheels/); when set, torch comes from it and its dependencies
#                  from the package index, for a machine that cannot reach PyTorch's index.
#   PYTHON_IMAGE   the base of both stages: any Debian bookworm image with python3 3.11 and
#                  its venv module (deploy/local-images.sh makes one from Debian's packages).
#
# No `# syntax=` line: BuildKit would fetch that frontend from Docker Hub, which a machine
# without the public registry cannot reach; nothing here needs more than the built-in one.
#
# No dataset, checkpoint or job record is baked in: they live under IWAE_HOME and
# IWAE_DATA_DIR, on volumes (see docker-compose.yml). The base is pinned to an exact
# Python patch release on Debian bookworm; pin its digest too (python:...@sha256:...) where
# the registry can be reached to read it.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VARIANT=cu126
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ARG TORCH_FIND_LINKS=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# PyTorch first, from its own index (or the wheel folder), so that the project's `torch`
# range is already met and pip never picks a different build of it from PyPI. This layer is
# the big one (several GB for CUDA), and it is cached across changes to the code.
# Without TORCH_FIND_LINKS the COPY brings a file that is always there, and nothing uses it.
COPY ${TORCH_FIND_LINKS:-pyproject.toml} /tmp/torch-wheels/
RUN if [ -n "${TORCH_FIND_LINKS}" ]; then \
        pip install --no-cache-dir --find-links /tmp/torch-wheels "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY worker ./worker
COPY app ./app
# A regular (not editable) install: the runtime stage needs only /opt/venv.
RUN pip install --no-cache-dir . \
    && python -c "import torch, app.cli; print('torch', torch.__version__)"


FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cu126
LABEL org.opencontainers.image.title="iwae-service" \
      org.opencontainers.image.description="Train, serve and study VAE/IWAE models of MNIST" \
      org.iwae.torch-variant="${TORCH_VARIANT}"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IWAE_HOME=/data/iwae \
    IWAE_DATA_DIR=/data/iwae/data

# A fixed, non-root uid/gid: named volumes mounted on /data/iwae and /data/iwae/data start out
# owned by it, and a host folder bind-mounted there needs to be writable by uid 10001.
RUN groupadd --system --gid 10001 iwae \
    && useradd --system --uid 10001 --gid iwae --home-dir /data/iwae --no-create-home \
        --shell /usr/sbin/nologin iwae \
    && mkdir -p /data/iwae/data \
    && chown -R iwae:iwae /data

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /data/iwae

EXPOSE 8000

# /healthz answers while the API process is alive (no curl in the slim image: python does it).
# The worker serves no HTTP: docker-compose.yml gives it its own (disabled) healthcheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

CMD ["iwae", "serve", "--host", "0.0.0.0", "--port", "8000"]
