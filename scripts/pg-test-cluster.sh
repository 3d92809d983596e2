#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the tests that need a real database server.
#
#   scripts/pg-test-cluster.sh start [--owner-pid PID]   create and start one; prints
#                                                         export NODUS_TEST_PG=postgres://...
#                                                         export NODUS_TEST_PG_DIR=/tmp/nodus-pg.XXXX
#   scripts/pg-test-cluster.sh restart DIR               pg_ctl restart (fast shutdown, then start)
#   scripts/pg-test-cluster.sh stop DIR                  stop it and remove DIR
#
# `eval "$(scripts/pg-test-cluster.sh start)"` sets both variables in a shell. The cluster lives in
# a fresh temporary directory, listens on 127.0.0.1 on a free port (and on a Unix socket in its
# directory), trusts local connections (a test cluster only) and has a superuser `nodus`. PostgreSQL
# refuses to run as root: as root the cluster runs as $NODUS_PG_USER, else `nobody`, else a system
# user `nodus-pg` created once (no home, no shell). With --owner-pid, a watchdog stops and removes
# the cluster once that process has exited (a test binary that is killed leaks nothing).
# The binaries: $NODUS_PG_BIN, else the newest /usr/lib/postgresql/*/bin, else pg_ctl on the PATH.
# Exit status 3: no PostgreSQL installed.
set -euo pipefail

MARK=.nodus-pg-test-cluster

die() { echo "pg-test-cluster: $*" >&2; exit 1; }

bindir() {
    if [[ -n "${NODUS_PG_BIN:-}" ]]; then
        if [[ -x "$NODUS_PG_BIN/initdb" && -x "$NODUS_PG_BIN/pg_ctl" ]]; then echo "$NODUS_PG_BIN"; return; fi
        echo "pg-test-cluster: no initdb and pg_ctl in NODUS_PG_BIN=$NODUS_PG_BIN" >&2
        exit 3
    fi
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -n | tail -n1 || true)
    if [[ -n "$d" && -x "$d/initdb" ]]; then echo "$d"; return; fi
    if command -v pg_ctl >/dev/null 2>&1; then dirname "$(command -v pg_ctl)"; return; fi
    echo "pg-test-cluster: no PostgreSQL found (install postgresql, or set NODUS_PG_BIN)" >&2
    exit 3
}

# The user the server runs as (only when this script runs as root).
run_user() {
    if [[ -n "${NODUS_PG_USER:-}" ]]; then echo "$NODUS_PG_USER"; return; fi
    if getent passwd nobody >/dev/null; then echo nobody; return; fi
    if ! getent passwd nodus-pg >/dev/null; then
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nodus-pg >&2 ||
            getent passwd nodus-pg >/dev/null || die "cannot create the user nodus-pg"
    fi
    echo nodus-pg
}

# Runs a command as the cluster's owner.
as_owner() {
    local dir=$1; shift
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u "$(stat -c %U "$dir")" -- "$@"
    else
        "$@"
    fi
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

checked_dir() {
    local dir=${1:-}
    [[ -n "$dir" && -f "$dir/$MARK" ]] || die "$dir is not a test cluster made by this script"
    echo "$dir"
}

start() {
    local owner_pid=""
    if [[ "${1:-}" == "--owner-pid" ]]; then owner_pid=${2:?--owner-pid needs a pid}; fi
    local bin; bin=$(bindir)
    local dir; dir=$(mktemp -d "${TMPDIR:-/tmp}/nodus-pg.XXXXXX")
    touch "$dir/$MARK"
    if [[ $(id -u) -eq 0 ]]; then
        chown "$(run_user)": "$dir"
    fi
    chmod 700 "$dir"
    if ! as_owner "$dir" "$bin/initdb" -D "$dir/data" -U nodus --auth=trust --encoding=UTF8 --locale=C.UTF-8 \
        --no-instructions >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        rm -rf "$dir"
        die "initdb failed"
    fi
    local port started=""
    for _ in $(seq 1 20); do
        port=$((20000 + RANDOM % 40000))
        port_free "$port" || continue
        cat >"$dir/data/nodus-test.conf" <<EOF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
max_connections = 300
logging_collector = off
EOF
        chown --reference="$dir" "$dir/data/nodus-test.conf"
        grep -q "^include_if_exists = 'nodus-test.conf'" "$dir/data/postgresql.conf" ||
            echo "include_if_exists = 'nodus-test.conf'" >>"$dir/data/postgresql.conf"
        if as_owner "$dir" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null 2>&1; then
            started=yes
            break
        fi
    done
    if [[ -z "$started" ]]; then
        tail -n 20 "$dir/server.log" >&2 || true
        rm -rf "$dir"
        die "the server did not start"
    fi
    echo "$bin" >"$dir/bindir"
    if [[ -n "$owner_pid" ]]; then
        # Stops the cluster once its owner is gone (polled: nothing else tells a shell).
        nohup bash -c "while kill -0 $owner_pid 2>/dev/null && [[ -f '$dir/$MARK' ]]; do sleep 1; done; \
            [[ -f '$dir/$MARK' ]] && '$(realpath "$0")' stop '$dir'" >/dev/null 2>&1 &
    fi
    echo "export NODUS_TEST_PG=postgres://nodus@127.0.0.1:$port/postgres"
    echo "export NODUS_TEST_PG_DIR=$dir"
}

restart() {
    local dir; dir=$(checked_dir "${1:-}")
    as_owner "$dir" "$(cat "$dir/bindir")/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 60 restart >/dev/null
}

stop() {
    local dir; dir=$(checked_dir "${1:-}")
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_owner "$dir" "$(cat "$dir/bindir")/pg_ctl" -D "$dir/data" -m immediate -w -t 60 stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    restart) restart "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 start [--owner-pid PID] | restart DIR | stop DIR" ;;
esac
