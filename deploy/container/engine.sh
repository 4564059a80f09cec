# Sourced by the image scripts: which container engine to use, the flags every container it
# starts needs on this machine, and free loopback ports for containers on the host's network.
#
# CONTAINER_ENGINE: podman or docker (default: podman if installed, else docker).
# ENGINE_RUN_FLAGS: for `run` and `build`. Podman gives containers a higher open-files limit
# than a process here may set without CAP_SYS_RESOURCE, and the container then fails to start
# ("error setting rlimit ... operation not permitted"): the limits are set to what this host
# allows instead (its hard open-files limit; processes capped by the kernel's pid_max).

ENGINE=${CONTAINER_ENGINE:-}
if [ -z "$ENGINE" ]; then
    if command -v podman >/dev/null; then
        ENGINE=podman
    elif command -v docker >/dev/null; then
        ENGINE=docker
    else
        echo "error: no container engine: install podman (Debian/Ubuntu: apt-get install podman)" >&2
        echo "       or docker, or name one with CONTAINER_ENGINE=" >&2
        exit 1
    fi
fi
ENGINE_RUN_FLAGS=()
if [ "$(basename "$ENGINE")" = podman ]; then
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then
        nproc=$pid_max
    fi
    if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then
        nofile=1048576
    fi
    ENGINE_RUN_FLAGS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
fi

# free_loopback_ports N: N ports free on 127.0.0.1 now, space-separated, for servers that a
# container started with host networking binds (the defaults may be taken on a shared host).
free_loopback_ports() {
    python3 - "$1" <<'PY'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
PY
}
