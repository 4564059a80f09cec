#!/usr/bin/env bash
# `make image-test`: run the built image as a user would. Inside it: build a small demo set
# (demo-data, then build) into a mounted folder, start `imgsearch serve all` with host
# networking on free loopback ports, check grpc.health.v1 on all six ports (service and admin
# of each tier) and one Search with results, then stop it with SIGTERM and expect a clean exit.
#
# Environment: IMAGE (default imgsearch:latest), CONTAINER_ENGINE, IMAGE_TEST_PHOTOS (300),
# IMAGE_TEST_CLIP_STEPS (40).
# The folder (var/image-test.*) is removed when the test passes and kept when it fails.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=engine.sh
. "$here/engine.sh"
image=${IMAGE:-imgsearch:latest}
photos=${IMAGE_TEST_PHOTOS:-300}
clip_steps=${IMAGE_TEST_CLIP_STEPS:-40}
name=imgsearch-image-test-$$

if ! $ENGINE image inspect "$image" >/dev/null 2>&1; then
    echo "error: no image $image: build it first (make image)" >&2
    exit 1
fi
mkdir -p "$repo/var"
folder=$(mktemp -d "$repo/var/image-test.XXXXXX")
user_flags=()
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "$folder" # the image's own user writes it
elif [ "$(basename "$ENGINE")" = podman ]; then
    user_flags=(--userns=keep-id --user "$(id -u):$(id -g)")
else
    user_flags=(--user "$(id -u):$(id -g)")
fi
run=("$ENGINE" run "${ENGINE_RUN_FLAGS[@]}" "${user_flags[@]}" -v "$folder:/var/lib/imgsearch")

passed=0
finish() {
    if $ENGINE container inspect "$name" >/dev/null 2>&1; then
        [ "$passed" = 1 ] || { echo "[image-test] the container's last log lines:"; $ENGINE logs --tail 40 "$name" 2>&1; }
        $ENGINE rm -f "$name" >/dev/null 2>&1 || true
    fi
    if [ "$passed" = 1 ]; then
        rm -rf "$folder"
    else
        echo "[image-test] FAILED; its folder is kept: $folder" >&2
    fi
}
trap finish EXIT

echo "[image-test] $image: a demo catalogue of $photos photos and a set built from it in $folder"
# The catalogue `make run` serves, smaller, with a short CLIP training and the rankers that
# load the native libraries (ALS: implicit and its OpenMP runtime), so it builds in minutes.
"${run[@]}" --rm "$image" demo-data --quiet \
    --photos "$photos" --users $((photos / 3)) --conversions $((photos * 20)) \
    /var/lib/imgsearch/demo-data
"${run[@]}" --rm "$image" build --data /var/lib/imgsearch/demo-data \
    --out /var/lib/imgsearch/artifacts --clip-steps "$clip_steps" \
    --rankers none,popularity,als

# The image starts the gateway with tokens (IMGSEARCH_AUTH_TOKENS_FILE, docs/guides/
# access-control.md): a random token that may search, in the mounted folder it reads.
tokens="$folder/tokens"
printf '%s search\n' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$tokens"
chmod 600 "$tokens"
[ "$(id -u)" != 0 ] || chown 10001:10001 "$tokens"

# Six free loopback ports: service and admin port of each tier.
read -r gateway retrieval ranking gateway_admin retrieval_admin ranking_admin \
    < <(free_loopback_ports 6)
echo "[image-test] serve all: ports $gateway $retrieval $ranking, admin $gateway_admin $retrieval_admin $ranking_admin"
"${run[@]}" -d --name "$name" --network host "$image" serve all \
    --gateway-port "$gateway" --retrieval-port "$retrieval" --ranking-port "$ranking" \
    --gateway-admin-port "$gateway_admin" --retrieval-admin-port "$retrieval_admin" \
    --ranking-admin-port "$ranking_admin" >/dev/null
$ENGINE exec -i -e IMGSEARCH_TOKEN_FILE=/var/lib/imgsearch/tokens "$name" python - "$gateway" "$gateway" "$retrieval" "$ranking" \
    "$gateway_admin" "$retrieval_admin" "$ranking_admin" <"$here/check_serving.py"

echo "[image-test] SIGTERM"
$ENGINE stop -t 30 "$name" >/dev/null
status=$($ENGINE container inspect --format '{{.State.ExitCode}}' "$name")
if [ "$status" != 0 ]; then
    echo "error: serve all exited with status $status after SIGTERM" >&2
    exit 1
fi
passed=1
echo "[image-test] passed: every tier SERVING, a Search answered, a clean exit on SIGTERM"
