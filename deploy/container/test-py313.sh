#!/usr/bin/env bash
# `make test-py313`: the whole `make test` on Python 3.13, in a Debian 13 (trixie) container
# whose Python is Debian's own, from a fresh copy of this working tree (tracked files and
# untracked ones git does not ignore: no .venv, no var/) in a one-commit clone of its HEAD, so
# that what records a commit beside its figures (results pages, the bench) finds it there as
# here (`-dirty` when the tree differs); then `make run` there, which builds the demo and
# serves it, and one search against it.
#
# The image holds what `.ci/run` gives the host: a PostgreSQL server (started in the container
# on a free port, for the conversion store's tests) and Chromium with its driver (the search
# page's browser tests), so that the same tests run as on Python 3.11 and none skips for want
# of them. The container shares the host's network and runs privileged, so that the
# multi-host test can make its network namespaces as it does on the host as root. pip inside
# it gets the host's index settings and CA bundle (pip-settings.sh); torch for 3.13 comes from
# the package index (several GB from PyPI, with its CUDA libraries) at every run.
#
# Environment: CONTAINER_ENGINE, PYTHON (the host Python whose pip settings are taken),
# TEST_PY313_TESTS=0 to skip `make test`, TEST_PY313_RUN=0 to skip the `make run` check,
# PYTEST_ADDOPTS (default -rs: the reason of every skip is listed).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=engine.sh
. "$here/engine.sh"
# shellcheck source=pip-settings.sh
. "$here/pip-settings.sh"
image=localhost/imgsearch-test:trixie

# make for `make test`, git for the commit of the copy, iproute2 for the multi-host test,
# libgomp1 for implicit, PostgreSQL for the conversion store, Chromium and chromedriver for the
# search page.
"$here/debian-base.sh" trixie "$image" \
    make,git,iproute2,libgomp1,postgresql,chromium,chromium-driver

mkdir -p "$repo/var"
work=$(mktemp -d "$repo/var/py313.XXXXXX")
trap 'rm -rf "$work"' EXIT
git clone --quiet --depth 1 --no-checkout "file://$repo" "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard |
    (cd "$repo" && tar --null -T - -c) | tar -x -C "$work/src"
git -C "$work/src" reset --quiet  # the index at HEAD, the files as copied
write_pip_conf "$work/pip.conf" /etc/pip-ca.pem
mounts=(-v "$work/src:/src" -v "$work/pip.conf:/etc/pip.conf:ro")
ca=$(host_pip_ca)
[ -z "$ca" ] || mounts+=(-v "$ca:/etc/pip-ca.pem:ro")
# The Kubernetes manifests are rendered by kubectl when there is one (a static binary).
kubectl=$(command -v kubectl || true)
[ -z "$kubectl" ] || mounts+=(-v "$kubectl:/usr/local/bin/kubectl:ro")

# Free loopback ports for `make run`'s servers and the PostgreSQL server (host network: the
# defaults may be taken); `make test` runs with none of the servers' ports set, as on the host.
read -r p1 p2 p3 p4 p5 p6 p7 < <(free_loopback_ports 7)

echo "[py313] in $image, a copy of $repo in $work/src"
$ENGINE run --rm "${ENGINE_RUN_FLAGS[@]}" --network host --privileged "${mounts[@]}" \
    -e CI="${CI:-}" -e PYTEST_ADDOPTS="${PYTEST_ADDOPTS:--rs}" -e POSTGRES_PORT="$p7" \
    -e RUN_PORTS="$p1 $p2 $p3 $p4 $p5 $p6" -e TEST_PY313_RUN="${TEST_PY313_RUN:-1}" \
    -e TEST_PY313_TESTS="${TEST_PY313_TESTS:-1}" \
    -w /src "$image" bash -euo pipefail -c '
        python3 --version
        # The imported image has no /run, where PostgreSQL puts its socket and lock file.
        install -d -o postgres -g postgres /run/postgresql
        source .ci/postgres.sh
        start_postgres "$POSTGRES_PORT"  # exports IMGSEARCH_TEST_POSTGRES_DSN
        started=$(date +%s)
        make .venv/.installed PYTHON=python3.13
        echo "[py313] installed in $(( $(date +%s) - started )) s"
        if [ "$TEST_PY313_TESTS" = 1 ]; then
            started=$(date +%s)
            make test PYTHON=python3.13
            echo "[py313] make test passed in $(( $(date +%s) - started )) s"
        fi
        [ "$TEST_PY313_RUN" = 1 ] || exit 0
        echo "[py313] make run"
        read -r gateway retrieval ranking gateway_admin retrieval_admin ranking_admin <<<"$RUN_PORTS"
        export IMGSEARCH_GATEWAY_PORT=$gateway IMGSEARCH_RETRIEVAL_PORT=$retrieval \
            IMGSEARCH_RANKING_PORT=$ranking IMGSEARCH_GATEWAY_ADMIN_PORT=$gateway_admin \
            IMGSEARCH_RETRIEVAL_ADMIN_PORT=$retrieval_admin \
            IMGSEARCH_RANKING_ADMIN_PORT=$ranking_admin
        started=$(date +%s)
        make run PYTHON=python3.13 >/tmp/run.log 2>&1 &
        run=$!
        waited=0
        until grep -q "imgsearch is SERVING" /tmp/run.log; do
            kill -0 $run 2>/dev/null || { cat /tmp/run.log; exit 1; }
            sleep 1
            waited=$((waited + 1))
            if [ $((waited % 60)) = 0 ]; then
                echo "[py313] make run: ${waited} s: $(tr "\r" "\n" </tmp/run.log | grep . | tail -1)"
            fi
        done
        echo "[py313] make run: built the demo and SERVING after $(( $(date +%s) - started )) s"
        grep -v "it/s\|img/s\|B/s" /tmp/run.log | tail -25
        .venv/bin/imgsearch search "blue star" --target "127.0.0.1:$gateway"
        # SIGTERM to what make started (the servers), so make itself sees how they exited.
        kill -TERM $(cat /proc/$run/task/$run/children)
        wait $run
        echo "[py313] make run: the demo built, served and answered; a clean exit on SIGTERM"
    '
