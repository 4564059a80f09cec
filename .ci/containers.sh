# Sourced by .ci/run when a container check is asked for: install podman (with runc, which
# works where crun refuses the cgroup layout) and mmdebstrap (the Debian base images where no
# registry answers) from Debian's packages, unless they are there.

install_container_tools() {
    local missing=()
    command -v podman >/dev/null || command -v docker >/dev/null || missing+=(podman runc)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "[ci] installing ${missing[*]} from Debian's packages"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}
