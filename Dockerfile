# syntax=docker/dockerfile:1
# One image for the three services: `imgsearch serve gateway|retrieval|ranking` (one per
# container, as deploy/kubernetes runs them) or `imgsearch serve all` (the default command).
# CPU torch; no artifact set inside: mount one at /var/lib/imgsearch/artifacts.
# `make image` builds it with podman or docker, `make image-test` starts every tier in it
# (docs/guides/container.md).
#
#   docker build -t REGISTRY/imgsearch:0.1.0 .
#   make certs    # var/certs/token: a bearer token with the scopes search, feedback:write
#   docker run --rm -p 50051:50051 -e IMGSEARCH_HOST=0.0.0.0 \
#     -e IMGSEARCH_AUTH_TOKENS_FILE=/var/lib/imgsearch/certs/token \
#     -v "$PWD/var:/var/lib/imgsearch" REGISTRY/imgsearch:0.1.0
#
# The gateway asks every caller for a scoped token (docs/guides/access-control.md): without a
# tokens file at IMGSEARCH_AUTH_TOKENS_FILE it does not start.
#
# No HEALTHCHECK: Kubernetes ignores it (the manifests probe grpc.health.v1 on each tier's
# admin port instead), the port to check depends on the tier chosen at run time, and a check
# would start a Python interpreter every interval.

# BASE_IMAGE: a Debian with Python 3.11 at `python` (bookworm's python3 with python-is-python3
# and python3-venv does too: deploy/container/debian-base.sh makes one where no registry answers).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# TORCH_INDEX_URL: PyTorch's CPU wheels (PyPI's Linux wheels bring the CUDA libraries, several
# GB). Empty: torch from the index pip is configured with, for machines that cannot reach
# PyTorch's (a larger image, same code).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# PIP_CONFIG_FILE: the build's pip settings (index, CA bundle) arrive as the build secrets
# pip-conf and pip-ca (`make image` passes the host's), mounted only while pip runs: they are
# in no layer. Without them pip uses PyPI; a missing file is ignored.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/run/secrets/pip.conf \
    PATH=/opt/imgsearch/bin:$PATH
# A layer of its own before the source, so a code change does not download torch again;
# `torch==2.14.1` in pyproject.toml is then already met by 2.14.1+cpu. (Both are pinned:
# hadolint takes the optional `--index-url` expansion for an unpinned package.)
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip-conf,target=/run/secrets/pip.conf,required=false \
    --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca,required=false \
    python -m venv /opt/imgsearch \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY imgsearch/ imgsearch/
COPY imgsearch_tools/ imgsearch_tools/
COPY retrieval_service/ retrieval_service/
COPY ranking_service/ ranking_service/
COPY gateway/ gateway/
COPY requirements/image.txt requirements/
# postgres: the conversion store that several gateway and ranking replicas share. Every
# package at the version and hashes `make lock` wrote (less torch, installed above); then the
# project itself, with nothing more (DL3013 cannot tell `--no-deps .` from an unpinned name).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip-conf,target=/run/secrets/pip.conf,required=false \
    --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca,required=false \
    pip install --require-hashes -r requirements/image.txt \
    && pip install --no-deps '.[postgres]'

# No compilers, no pip cache, no build secrets: the virtual environment and what it links to.
FROM ${BASE_IMAGE}
# libgomp1: the OpenMP runtime that implicit's wheel links (the ranking tier does not start
# without it). Debian's current version, as the base's own packages are (DL3008 asks for pins).
# A fixed numeric UID, so that Kubernetes can check runAsNonRoot without reading /etc/passwd.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home --home-dir /home/imgsearch \
        imgsearch \
    && mkdir -p /var/lib/imgsearch/artifacts \
    && chown -R 10001:10001 /var/lib/imgsearch
COPY --from=build /opt/imgsearch /opt/imgsearch
# XDG_CACHE_HOME: ONNX Runtime writes a device id under it; /tmp is the one writable place
# with a read-only root filesystem (an emptyDir in the manifests). OPENBLAS_NUM_THREADS:
# implicit's ALS asks for it; the servers size their own torch and FAISS threads.
ENV PATH=/opt/imgsearch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/cache \
    OPENBLAS_NUM_THREADS=1 \
    IMGSEARCH_ARTIFACTS=/var/lib/imgsearch/artifacts
USER 10001:10001
WORKDIR /home/imgsearch
# Service ports 5005x, admin ports 5006x (grpc.health.v1 and AdminService, plaintext).
EXPOSE 50051 50052 50053 50061 50062 50063
# Where the gateway reads its tokens file: a path, not a secret (DL3064 goes by the name).
# hadolint ignore=DL3064
ENV IMGSEARCH_AUTH_TOKENS_FILE=/var/lib/imgsearch/tokens
ENTRYPOINT ["imgsearch"]
CMD ["serve", "all"]
