# Sourced by .ci/run: install (Debian's packages) and start a PostgreSQL server for the
# conversion store's tests, create their role and database, export their DSN.
# initdb and the server refuse to run as root, so the cluster is started as its owner.
# `start_postgres PORT` moves a cluster that is not running yet to PORT (the Python 3.13
# container shares the host's network, whose 5432 may be taken).

start_postgres() {
    local want_port=${1:-}
    if ! command -v pg_ctlcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        echo "[ci] installing PostgreSQL from Debian's packages"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local version cluster port status
    if [ -z "$(pg_lsclusters -h)" ]; then
        version=$(ls /usr/lib/postgresql | sort -V | tail -1)
        pg_createcluster ${want_port:+--port "$want_port"} "$version" main >/dev/null
    fi
    read -r version cluster port status _ < <(pg_lsclusters -h | head -1)
    if [ -n "$want_port" ] && [ "$status" != "online" ] && [ "$port" != "$want_port" ]; then
        pg_conftool "$version" "$cluster" set port "$want_port"
        port=$want_port
    fi
    if [ "$status" != "online" ]; then
        runuser -u postgres -- pg_ctlcluster "$version" "$cluster" start
    fi
    for _ in $(seq 60); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 0.5
    done
    pg_isready -h 127.0.0.1 -p "$port"
    runuser -u postgres -- psql -q -p "$port" -v ON_ERROR_STOP=1 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'imgsearch') THEN
    CREATE ROLE imgsearch LOGIN PASSWORD 'imgsearch';
  END IF;
END $$;
SQL
    if ! runuser -u postgres -- psql -p "$port" -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'imgsearch_test'" | grep -q 1; then
        runuser -u postgres -- createdb -p "$port" -O imgsearch imgsearch_test
    fi
    export IMGSEARCH_TEST_POSTGRES_DSN="postgresql://imgsearch:imgsearch@127.0.0.1:${port}/imgsearch_test"
    echo "[ci] PostgreSQL $version/$cluster on port $port for the conversion store tests"
}
