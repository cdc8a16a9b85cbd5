#!/usr/bin/env bash
# A throwaway PostgreSQL server for the storage tests: Debian's package (installed when missing),
# a fresh cluster in a temporary directory on a free port, trust authentication on loopback.
#   scripts/postgres.sh start   prints the database URL (postgres://tiller@127.0.0.1:PORT/tiller)
#   scripts/postgres.sh stop    stops it and removes the cluster
set -euo pipefail
state=/tmp/tiller-postgres
case "${1:-}" in
start)
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        echo "installing PostgreSQL (Debian's package)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
    fi
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    "$0" stop >/dev/null 2>&1 || true
    mkdir -p "$state"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    # PostgreSQL refuses to run as root: the cluster belongs to the package's `postgres` user.
    as_pg=()
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$state"
        as_pg=(runuser -u postgres --)
    fi
    "${as_pg[@]}" "$bin/initdb" -D "$state/data" -A trust -U tiller >/dev/null
    "${as_pg[@]}" "$bin/pg_ctl" -D "$state/data" -l "$state/log" -w \
        -o "-p $port -k $state -c listen_addresses=127.0.0.1 -c fsync=on" start >/dev/null
    "${as_pg[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U tiller tiller
    echo "$port" > "$state/port"
    echo "postgres://tiller@127.0.0.1:$port/tiller"
    ;;
stop)
    [ -d "$state/data" ] || exit 0
    bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
    as_pg=()
    [ "$(id -u)" = 0 ] && as_pg=(runuser -u postgres --)
    "${as_pg[@]}" "$bin/pg_ctl" -D "$state/data" -m fast -w stop >/dev/null || true
    rm -rf "$state"
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
