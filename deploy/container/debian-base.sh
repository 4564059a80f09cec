#!/usr/bin/env bash
# A Debian base image with the distribution's own Python, made from Debian's archive with
# mmdebstrap and imported into the container engine, for machines that reach Debian's archive
# but no container registry (python:3.11-slim cannot be pulled there).
#
#   deploy/container/debian-base.sh SUITE TAG [PACKAGE,...]
#   deploy/container/debian-base.sh bookworm localhost/imgsearch-base:bookworm   # Python 3.11
#   deploy/container/debian-base.sh trixie localhost/imgsearch-base:trixie       # Python 3.13
#
# The image holds python3 (as `python` too), venv, pip's CA certificates and the packages named;
# an image already tagged TAG with the same package list (its label imgsearch.packages) is kept
# (IMAGE_BASE_REBUILD=1 makes it again).
# Environment: CONTAINER_ENGINE (podman or docker; default: whichever is installed),
# DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

suite=${1:?usage: debian-base.sh SUITE TAG}
tag=${2:?usage: debian-base.sh SUITE TAG}
packages=python3,python3-venv,python-is-python3,ca-certificates${3:+,$3}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
here=$(dirname "$0")
# shellcheck source=engine.sh
. "$here/engine.sh"

if [ "${IMAGE_BASE_REBUILD:-0}" != 1 ] && $ENGINE image inspect "$tag" >/dev/null 2>&1; then
    made_with=$($ENGINE image inspect --format '{{ index .Config.Labels "imgsearch.packages" }}' \
        "$tag" 2>/dev/null || true)
    if [ "$made_with" = "$packages" ]; then
        echo "[base] $tag exists (IMAGE_BASE_REBUILD=1 to make it again)"
        exit 0
    fi
    echo "[base] $tag was made with other packages (${made_with:-not recorded}): making it again"
fi
if ! command -v mmdebstrap >/dev/null; then
    echo "error: mmdebstrap is needed to make the Debian base image $tag" >&2
    echo "       (Debian/Ubuntu: apt-get install mmdebstrap), or set IMAGE_BASE to an image" >&2
    echo "       your engine can pull, e.g. IMAGE_BASE=python:3.11-slim" >&2
    exit 1
fi
echo "[base] making $tag: Debian $suite from $mirror (mmdebstrap, a minute or two)"
# Security updates and point-release updates as well as the release itself, so that the
# packages the image installs later (libgomp1) come at their current versions.
mmdebstrap --variant=minbase --format=tar --quiet \
    --include="$packages" \
    "$suite" - \
    "deb $mirror $suite main" \
    "deb $mirror $suite-updates main" \
    "deb ${mirror%/debian}/debian-security $suite-security main" |
    $ENGINE import \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL imgsearch.packages=$packages" \
        --change 'CMD ["python3"]' \
        - "$tag"
echo "[base] $tag: $($ENGINE run --rm "${ENGINE_RUN_FLAGS[@]}" "$tag" python3 --version 2>&1)"
