# Sourced by the image scripts: the host's pip settings that reach its package index, for pip
# inside a container (a build, or the Python 3.13 test run), without copying them into an image.
#
# host_pip_ca: the CA bundle pip uses here (PIP_CERT, pip's config, SSL_CERT_FILE or
#   REQUESTS_CA_BUNDLE), empty when none is set.
# write_pip_conf FILE CA_PATH: a pip.conf with the host's index-url and extra-index-url (those
#   over http(s): a file:// index is a path of this host) and `cert = CA_PATH` when the host
#   has a CA bundle. PYTHON names the Python whose pip is asked (default python3).

# The host's value of a pip setting: its PIP_* variable, else the last config file's.
host_pip_setting() {
    local variable
    variable="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!variable:-}" ]; then
        echo "${!variable}"
        return
    fi
    "${PYTHON:-python3}" -m pip config list 2>/dev/null |
        sed -n "s/^[a-z]*\.$1='\(.*\)'\$/\1/p" | tail -1
}

host_pip_ca() {
    local ca
    ca=$(host_pip_setting cert)
    ca=${ca:-${SSL_CERT_FILE:-${REQUESTS_CA_BUNDLE:-}}}
    if [ -f "$ca" ]; then echo "$ca"; fi
}

write_pip_conf() {
    local file=$1 ca_path=$2 index url extra=()
    index=$(host_pip_setting index-url)
    for url in $(host_pip_setting extra-index-url); do
        case "$url" in
            http://* | https://*) extra+=("$url") ;;
            *) echo "[pip] left out (a path of this host): extra-index-url $url" >&2 ;;
        esac
    done
    {
        echo "[global]"
        case "$index" in http://* | https://*) echo "index-url = $index" ;; esac
        [ ${#extra[@]} -eq 0 ] || echo "extra-index-url = ${extra[*]}"
        [ -z "$(host_pip_ca)" ] || echo "cert = $ca_path"
    } >"$file"
}
