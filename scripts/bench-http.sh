#!/usr/bin/env bash
# The gateway's throughput and p99 next to a plain axum hello-world server, in the same run, with
# wrk (Debian package `wrk`). Every server answers a 2-byte `ok` over HTTP/1.1 keep-alive on
# loopback:
#   plain:   GET /           axum hello world
#   gateway: GET /noop/noop  nodus HTTP gateway → the node's engine → a worker process
#   locator: GET /noop/noop  the same gateway reaching the app through the locator's TCP service,
#                            the way it reaches apps on other nodes
#   daemon:  GET /noop/noop  a real `nodus daemon` with HTTP mounted, the app deployed through its
#                            REST API (the node's engine, as in production)
# The servers take turns for ROUNDS rounds (so a busy machine hurts them alike) and the medians
# are printed. Target (issue 14): gateway requests/s >= 0.4x the plain server's at 64 connections.
#
# Usage: scripts/bench-http.sh [seconds per run, default 5] [connections, default 64] [rounds, default 3]
# Env: WRK_THREADS (default 2), BENCH_POOL (workers, default 2), BENCH_CONCURRENCY (default 64).
set -euo pipefail

DURATION="${1:-5}"
CONNS="${2:-64}"
ROUNDS="${3:-3}"
THREADS="${WRK_THREADS:-2}"
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
    echo "wrk is not installed: apt-get install wrk" >&2
    exit 1
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -q -p nodus-http --bin nodus-http-bench-server --bin nodus-http-worker \
    -p nodus --bin nodus
BIN="$CARGO_TARGET_DIR/release"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# start NAME ARGS...: starts a server; sets ADDR to its address once it is listening.
start() {
    local name="$1"; shift
    "$BIN/nodus-http-bench-server" "$@" --addr-file "$WORK/$name.addr" >"$WORK/$name.log" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 1 100); do
        if [ -s "$WORK/$name.addr" ]; then
            ADDR="$(cat "$WORK/$name.addr")"
            return
        fi
        sleep 0.1
    done
    echo "$name did not start; its log:" >&2
    cat "$WORK/$name.log" >&2
    exit 1
}

# gateway NAME VIA_LOCATOR: starts a gateway server and checks that it answers; sets ADDR.
gateway() {
    start "$1" gateway --worker "$BIN/nodus-http-worker" --via-locator "$2" \
        --pool "${BENCH_POOL:-2}" --concurrency "${BENCH_CONCURRENCY:-64}"
    if [ "$(curl -s "http://$ADDR/noop/noop")" != "ok" ]; then
        echo "the $1 gateway does not answer ok; its log:" >&2
        cat "$WORK/$1.log" >&2
        exit 1
    fi
}

# daemon: a `nodus daemon` serving HTTP, with the no-op app deployed through the REST API and
# scaled to BENCH_POOL workers; sets ADDR.
daemon() {
    local port app="$WORK/noop-app"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    mkdir -p "$app"
    cp "$BIN/nodus-http-worker" "$app/"
    echo '{"executable": "nodus-http-worker"}' >"$app/manifest.json"
    printf 'pool-limit = %s\nconcurrency = %s\nqueue-limit = 10000\nidle-timeout = 0\n' \
        "${BENCH_POOL:-2}" "${BENCH_CONCURRENCY:-64}" >"$app/profile.toml"
    tar czf "$WORK/noop.tar.gz" -C "$WORK" noop-app
    printf '%s\n' "server_name = \"bench\"" "data_dir = \"$WORK/daemon\"" 'tcp_listen = ""' '[cluster]' 'listen = ""' \
        'udp_listen = ""' '[apps]' 'locator_listen = "127.0.0.1:0"' 'run_as = "root"' '[http]' \
        "listen = \"127.0.0.1:$port\"" >"$WORK/daemon.toml"
    "$BIN/nodus" daemon --config "$WORK/daemon.toml" --log-level warn >"$WORK/daemon.log" 2>&1 &
    PIDS+=("$!")
    ADDR="127.0.0.1:$port"
    for _ in $(seq 1 100); do
        curl -sf "http://$ADDR/api/node" >/dev/null && break
        sleep 0.1
    done
    local token
    token="$(cat "$WORK/daemon/auth.token")"
    curl -sf -X PUT -H "Authorization: Bearer $token" --data-binary @"$WORK/noop.tar.gz" \
        "http://$ADDR/api/apps/noop" >/dev/null
    curl -sf -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        -d "{\"workers\": ${BENCH_POOL:-2}}" "http://$ADDR/api/apps/noop/scale" >/dev/null
    if [ "$(curl -s "http://$ADDR/noop/noop")" != "ok" ]; then
        echo "the daemon's gateway does not answer ok; its log:" >&2
        cat "$WORK/daemon.log" >&2
        exit 1
    fi
}

start plain hello
URL_plain="http://$ADDR/"
gateway gateway no
URL_gateway="http://$ADDR/noop/noop"
gateway locator yes
URL_locator="http://$ADDR/noop/noop"
daemon
URL_daemon="http://$ADDR/noop/noop"
SERVERS="plain gateway locator daemon"
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"

to_ms() { # wrk prints 1.23ms / 456.00us / 1.2s
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'
}

# run NAME: one wrk run against NAME's URL; appends "rps p99_ms" to $WORK/NAME.runs.
run() {
    local url_var="URL_$1" out errors rps p99
    out="$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "${!url_var}")"
    errors="$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}')"
    [ -n "$errors" ] && echo "warning: $1: $errors" >&2
    rps="$(echo "$out" | awk '/Requests\/sec/ {print $2}')"
    p99="$(echo "$out" | awk '$1 == "99%" {print $2}')"
    echo "$rps $(to_ms "$p99")" >>"$WORK/$1.runs"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for name in $SERVERS; do # warm-up
    wrk -t"$THREADS" -c"$CONNS" -d1s "$(eval echo "\$URL_$name")" >/dev/null
done
for round in $(seq 1 "$ROUNDS"); do
    for name in $SERVERS; do
        run "$name"
    done
    echo "round $round: $(for n in $SERVERS; do printf '%s %s  ' "$n" "$(tail -1 "$WORK/$n.runs" | cut -d' ' -f1)"; done)" >&2
done

RPS_plain="$(cut -d' ' -f1 "$WORK/plain.runs" | median)"
echo
echo "wrk -t$THREADS -c$CONNS, $ROUNDS rounds of ${DURATION}s each, $(nproc) cores; medians"
echo "load average (1, 5, 15 min): before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-44s %12s %10s %8s\n' "server" "requests/s" "p99 ms" "ratio"
for name in $SERVERS; do
    case "$name" in
        plain) label="plain axum hello world" ;;
        gateway) label="nodus gateway → no-op app (engine)" ;;
        locator) label="nodus gateway → no-op app (via locator)" ;;
        daemon) label="nodus daemon (HTTP mounted) → no-op app" ;;
    esac
    rps="$(cut -d' ' -f1 "$WORK/$name.runs" | median)"
    p99="$(cut -d' ' -f2 "$WORK/$name.runs" | median)"
    ratio="$(awk -v g="$rps" -v p="$RPS_plain" 'BEGIN { printf "%.2f", g / p }')"
    printf '%-44s %12.0f %10.2f %8s\n' "$label" "$rps" "$p99" "$ratio"
done
echo "target: gateway (engine) and daemon >= 0.40 x plain"
for name in gateway locator daemon; do
    url_var="URL_$name"
    failed="$(curl -s "${!url_var%/noop/noop}/metrics" | awk '/^nodus_gateway_requests_total/ && !/code="200"/ {print}')"
    [ -z "$failed" ] || echo "$name answered errors: $failed"
done
