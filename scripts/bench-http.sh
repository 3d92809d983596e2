#!/usr/bin/env bash
# The gateway's throughput and p99 next to a plain axum hello-world server, in the same run, with
# wrk (Debian package `wrk`). Both answer a 2-byte `ok` over HTTP/1.1 keep-alive on loopback:
#   plain:   GET /           axum hello world
#   gateway: GET /noop/noop  nodus HTTP gateway → the node's engine → a worker process
#   (also measured: the gateway reaching the app through the locator's TCP service, the way it
#   reaches apps on other nodes)
# Target (issue 14): gateway requests/s >= 0.4x the plain server's at 64 connections.
#
# Usage: scripts/bench-http.sh [seconds per run, default 10] [connections, default 64]
# Env: WRK_THREADS (default 2), BENCH_POOL (workers, default 2), BENCH_CONCURRENCY (default 64).
set -euo pipefail

DURATION="${1:-10}"
CONNS="${2:-64}"
THREADS="${WRK_THREADS:-2}"
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
    echo "wrk is not installed: apt-get install wrk" >&2
    exit 1
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -q -p nodus-http --bin nodus-http-bench-server --bin nodus-http-worker
BIN="$CARGO_TARGET_DIR/release"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# start NAME ARGS...: starts a server; sets ADDR to its address once it is listening and PID to
# its process id.
start() {
    local name="$1"; shift
    "$BIN/nodus-http-bench-server" "$@" --addr-file "$WORK/$name.addr" >"$WORK/$name.log" 2>&1 &
    PID="$!"
    PIDS+=("$PID")
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

# run URL: wrk's requests/s and p99 (ms) for URL, after a short warm-up.
run() {
    wrk -t"$THREADS" -c"$CONNS" -d2s "$1" >/dev/null
    local out
    out="$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "$1")"
    local errors
    errors="$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}')"
    [ -n "$errors" ] && echo "warning: $1: $errors" >&2
    local rps p99
    rps="$(echo "$out" | awk '/Requests\/sec/ {print $2}')"
    p99="$(echo "$out" | awk '$1 == "99%" {print $2}')"
    echo "$rps $p99"
}

to_ms() { # wrk prints 1.23ms / 456.00us / 1.2s
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'
}

start plain hello
PLAIN="$ADDR"
read -r PLAIN_RPS PLAIN_P99 <<<"$(run "http://$PLAIN/")"
kill "$PID"; wait "$PID" 2>/dev/null || true

# gateway MODE: starts the gateway server (MODE yes: through the locator); sets GATEWAY.
gateway() {
    start "gateway-$1" gateway --worker "$BIN/nodus-http-worker" --via-locator "$1" \
        --pool "${BENCH_POOL:-2}" --concurrency "${BENCH_CONCURRENCY:-64}"
    GATEWAY="$ADDR"
    if [ "$(curl -s "http://$GATEWAY/noop/noop")" != "ok" ]; then
        echo "the gateway does not answer ok; its log:" >&2
        cat "$WORK/gateway-$1.log" >&2
        exit 1
    fi
}

gateway no
read -r GW_RPS GW_P99 <<<"$(run "http://$GATEWAY/noop/noop")"
kill "$PID"; wait "$PID" 2>/dev/null || true
gateway yes
read -r LOC_RPS LOC_P99 <<<"$(run "http://$GATEWAY/noop/noop")"

ratio() { awk -v g="$1" -v p="$PLAIN_RPS" 'BEGIN { printf "%.2f", g / p }'; }
echo
echo "wrk -t$THREADS -c$CONNS -d${DURATION}s, $(nproc) cores"
printf '%-40s %12s %10s %8s\n' "server" "requests/s" "p99 ms" "ratio"
printf '%-40s %12s %10s %8s\n' "plain axum hello world" "$PLAIN_RPS" "$(to_ms "$PLAIN_P99")" "1.00"
printf '%-40s %12s %10s %8s\n' "nodus gateway → no-op app" "$GW_RPS" "$(to_ms "$GW_P99")" "$(ratio "$GW_RPS")"
printf '%-40s %12s %10s %8s\n' "  same app through the locator (TCP)" "$LOC_RPS" "$(to_ms "$LOC_P99")" "$(ratio "$LOC_RPS")"
echo "target: gateway >= 0.40 x plain"
