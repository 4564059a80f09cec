#!/usr/bin/env bash
# `make image`: build the Dockerfile with podman or docker, on a machine with a registry and
# internet or without them.
#
# Environment (all optional):
#   IMAGE            tag to build (default imgsearch:latest; the Makefile passes imgsearch:VERSION)
#   IMAGE_BASE       base image; default python:3.11-slim when the engine can pull it, else a
#                    Debian bookworm base made here from Debian's archive (debian-base.sh)
#   TORCH_INDEX_URL  where torch comes from; default PyTorch's CPU wheels when reachable, else
#                    the package index pip uses (on PyPI: torch with its CUDA libraries)
#   CONTAINER_ENGINE podman or docker (default: whichever is installed)
#   PYTHON           the Python whose pip settings the build takes (default python3)
#
# The host's pip settings that reach its package index (index-url and extra-index-url over
# http(s), the CA bundle) go to the build as the secrets pip-conf and pip-ca, never into a
# layer of the image.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=engine.sh
. "$here/engine.sh"
# shellcheck source=pip-settings.sh
. "$here/pip-settings.sh"
image=${IMAGE:-imgsearch:latest}
cpu_torch_index=https://download.pytorch.org/whl/cpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- the base image
base=${IMAGE_BASE:-}
if [ -z "$base" ]; then
    if $ENGINE image inspect docker.io/library/python:3.11-slim >/dev/null 2>&1 ||
        timeout 120 $ENGINE pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1; then
        base=docker.io/library/python:3.11-slim
    else
        echo "[image] python:3.11-slim cannot be pulled: a Debian bookworm base (Python 3.11) instead"
        base=localhost/imgsearch-base:bookworm
        "$here/debian-base.sh" bookworm "$base"
    fi
fi

# --- where torch comes from
reachable() {
    "${PYTHON:-python3}" - "$1" "${2:-}" <<'PY' >/dev/null 2>&1
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[2] or None)
urllib.request.urlopen(sys.argv[1], timeout=15, context=context)
PY
}

ca=$(host_pip_ca)

if [ -z "${TORCH_INDEX_URL+set}" ]; then
    if reachable "$cpu_torch_index/torch/" "$ca"; then
        TORCH_INDEX_URL=$cpu_torch_index
    else
        echo "[image] $cpu_torch_index cannot be reached: torch from the package index pip uses"
        echo "        (on PyPI that is torch with its CUDA libraries: a larger image, same code)"
        TORCH_INDEX_URL=
    fi
fi

# --- pip's settings for the build
write_pip_conf "$work/pip.conf" /run/secrets/pip-ca
secrets=(--secret "id=pip-conf,src=$work/pip.conf")
[ -z "$ca" ] || secrets+=(--secret "id=pip-ca,src=$ca")

echo "[image] building $image with $ENGINE: base $base, torch from ${TORCH_INDEX_URL:-the package index}"
start=$(date +%s)
DOCKER_BUILDKIT=1 $ENGINE build "${ENGINE_RUN_FLAGS[@]}" \
    --build-arg "BASE_IMAGE=$base" \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" \
    "${secrets[@]}" \
    -t "$image" "$repo"
seconds=$(($(date +%s) - start))
size=$($ENGINE image inspect --format '{{.Size}}' "$image")
echo "[image] $image built in ${seconds} s; size $((size / 1000000)) MB ($size bytes)"
