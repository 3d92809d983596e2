#!/usr/bin/env bash
# Request/reply benchmark against nats-server, side by side with `nodus-bench reqrep`.
#
#   scripts/bench-nats.sh [--duration SECS]
#
# Installs nats-server (Debian package) if missing, runs it on 127.0.0.1 only, builds
# benches/nats-compare and runs payload 64 / 4096 B x inflight 1 / 64. If the nodus bench binary
# exists it runs the same matrix there and prints both side by side.
#
# Environment: DURATION (seconds, default 5), PAYLOADS (default "64 4096"),
# INFLIGHTS (default "1 64"), CARGO_TARGET_DIR (default ~/.cache/nodus-target),
# NODUS_BENCH (default $CARGO_TARGET_DIR/release/nodus-bench), NODUS_ARGS (extra arguments for
# it, e.g. "--transport tcp" to match NATS's loopback TCP), NATS_PORT (default: first free port
# from 14222).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-5}"
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) DURATION="${2:?--duration needs a value}"; shift 2 ;;
        --duration=*) DURATION="${1#*=}"; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-nats: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
PAYLOADS="${PAYLOADS:-64 4096}"
INFLIGHTS="${INFLIGHTS:-1 64}"
TARGET_ROOT="${CARGO_TARGET_DIR:-$HOME/.cache/nodus-target}"
NODUS_BENCH="${NODUS_BENCH:-$TARGET_ROOT/release/nodus-bench}"
read -r -a NODUS_EXTRA <<<"${NODUS_ARGS:-}"

work="$(mktemp -d)"
nats_pid=""
cleanup() {
    if [ -n "$nats_pid" ] && kill -0 "$nats_pid" 2>/dev/null; then
        kill "$nats_pid" 2>/dev/null || true
        wait "$nats_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- nats-server ---------------------------------------------------------------------------
NATS_SERVER="$(command -v nats-server || true)"
[ -z "$NATS_SERVER" ] && [ -x /usr/sbin/nats-server ] && NATS_SERVER=/usr/sbin/nats-server
if [ -z "$NATS_SERVER" ]; then
    echo "== installing nats-server (Debian package)"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nats-server >/dev/null
    NATS_SERVER="$(command -v nats-server || echo /usr/sbin/nats-server)"
fi

port_free() {
    python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}
if [ -z "${NATS_PORT:-}" ]; then
    for candidate in $(seq 14222 14321); do
        if port_free "$candidate"; then NATS_PORT="$candidate"; break; fi
    done
    [ -n "${NATS_PORT:-}" ] || { echo "bench-nats: no free port in 14222..14321" >&2; exit 1; }
fi
URL="nats://127.0.0.1:$NATS_PORT"

echo "== $("$NATS_SERVER" --version) on $URL"
"$NATS_SERVER" --addr 127.0.0.1 --port "$NATS_PORT" >"$work/nats-server.log" 2>&1 &
nats_pid=$!
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null; }
for _ in $(seq 50); do
    if ! kill -0 "$nats_pid" 2>/dev/null; then
        echo "bench-nats: nats-server exited:" >&2; cat "$work/nats-server.log" >&2; exit 1
    fi
    listening && break
    sleep 0.1
done
if ! listening; then
    echo "bench-nats: nats-server is not listening on port $NATS_PORT after 5 s" >&2; exit 1
fi

# --- build -----------------------------------------------------------------------------------
echo "== building benches/nats-compare"
CARGO_TARGET_DIR="$TARGET_ROOT/nats-compare" \
    cargo build --release --quiet --manifest-path benches/nats-compare/Cargo.toml
NATS_BENCH="$TARGET_ROOT/nats-compare/release/nats-bench"

# --- runs ------------------------------------------------------------------------------------
# Each run appends its JSON line (the last stdout line that starts with '{') to a results file.
run_json() {
    local out="$1"; shift
    local line
    line="$("$@" | grep '^{' | tail -n 1)" || return 1
    [ -n "$line" ] || return 1
    printf '%s\n' "$line" >>"$out"
}

echo "== nats: ${DURATION}s per run after a 1 s warm-up"
for payload in $PAYLOADS; do
    for inflight in $INFLIGHTS; do
        run_json "$work/nats.jsonl" "$NATS_BENCH" --url "$URL" --payload "$payload" \
            --inflight "$inflight" --duration "$DURATION" --json
    done
done

nodus_note=""
: >"$work/nodus.jsonl"
if [ -x "$NODUS_BENCH" ]; then
    echo "== nodus: $NODUS_BENCH reqrep ${NODUS_ARGS:-}"
    for payload in $PAYLOADS; do
        for inflight in $INFLIGHTS; do
            if ! run_json "$work/nodus.jsonl" "$NODUS_BENCH" reqrep --payload "$payload" \
                --inflight "$inflight" --duration "$DURATION" --json ${NODUS_EXTRA[@]+"${NODUS_EXTRA[@]}"}; then
                echo "bench-nats: nodus run payload=$payload inflight=$inflight failed" >&2
                nodus_note="some nodus runs failed (see above)"
            fi
        done
    done
else
    nodus_note="nodus skipped: no executable at $NODUS_BENCH (build it with 'cargo build --release -p nodus -p nodus-bench' or set NODUS_BENCH)"
fi

# --- table -----------------------------------------------------------------------------------
echo
python3 - "$work/nats.jsonl" "$work/nodus.jsonl" <<'EOF'
import json, sys

def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[(int(r["payload"]), int(r["inflight"]))] = r
    return rows

nats, nodus = load(sys.argv[1]), load(sys.argv[2])
cols = ("payload", "inflight", "nats req/s", "nodus req/s", "nodus/nats", "nats p99 us", "nodus p99 us")
fmt = "{:>8} {:>8} {:>12} {:>12} {:>10} {:>12} {:>12}"
print(fmt.format(*cols))
for key in sorted(nats):
    a, b = nats[key], nodus.get(key)
    ratio = f"{b['req_per_sec'] / a['req_per_sec']:.2f}" if b and a["req_per_sec"] else "-"
    print(fmt.format(
        key[0], key[1],
        f"{a['req_per_sec']:.0f}", f"{b['req_per_sec']:.0f}" if b else "-", ratio,
        f"{a['p99_us']:.0f}", f"{b['p99_us']:.0f}" if b else "-",
    ))
EOF
if [ -n "$nodus_note" ]; then
    echo
    echo "$nodus_note"
fi
