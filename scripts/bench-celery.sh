#!/usr/bin/env bash
# The same no-op task workload through Celery with a Redis broker and result backend, side by
# side with `nodus-bench tasks`, in the same run.
#
#   scripts/bench-celery.sh [--tasks N] [--submitters K]
#
# Installs redis-server (Debian package) if missing and Celery with its Redis extra (PyPI) in a
# virtualenv, runs Redis on 127.0.0.1 only (append-only file with fsync every second, its usual
# durable setting), then for 1 and 4 worker processes (prefork pool): K threads submit N no-op
# tasks with `delay()`, and the run ends when every result is in the result backend. Then it runs
# `nodus-bench tasks` (if built) with the same K and prints both and the ratio (nodus runs
# NODUS_TASKS tasks, default 20000: at its speed fewer make a run too short to measure).
#
# Environment: TASKS (default 5000), SUBMITTERS (default 256), NODUS_TASKS, CELERY_VENV (default
# ~/.cache/nodus-celery-venv), CARGO_TARGET_DIR (default ~/.cache/nodus-target), NODUS_BENCH
# (default $CARGO_TARGET_DIR/release/nodus-bench), REDIS_PORT (default: first free port from
# 16379).
set -euo pipefail
cd "$(dirname "$0")/.."

TASKS="${TASKS:-5000}"
SUBMITTERS="${SUBMITTERS:-256}"
NODUS_TASKS="${NODUS_TASKS:-20000}"
while [ $# -gt 0 ]; do
    case "$1" in
        --tasks) TASKS="${2:?--tasks needs a value}"; shift 2 ;;
        --submitters) SUBMITTERS="${2:?--submitters needs a value}"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-celery: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
VENV="${CELERY_VENV:-$HOME/.cache/nodus-celery-venv}"
TARGET_ROOT="${CARGO_TARGET_DIR:-$HOME/.cache/nodus-target}"
NODUS_BENCH="${NODUS_BENCH:-$TARGET_ROOT/release/nodus-bench}"

work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- redis-server and celery ---------------------------------------------------------------
if ! command -v redis-server >/dev/null; then
    echo "== installing redis-server (Debian package)"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi
if ! [ -x "$VENV/bin/celery" ]; then
    echo "== installing celery[redis] (PyPI) in $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check 'celery[redis]>=5.3,<6'
fi

port_free() {
    python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}
REDIS_PORT="${REDIS_PORT:-16379}"
while ! port_free "$REDIS_PORT"; do REDIS_PORT=$((REDIS_PORT + 1)); done

redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$work" --save '' \
    --appendonly yes --appendfsync everysec --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
redis-cli -p "$REDIS_PORT" ping >/dev/null || { echo "bench-celery: redis did not start" >&2; cat "$work/redis.log" >&2; exit 1; }

cat >"$work/bench_celery_tasks.py" <<PY
from celery import Celery

app = Celery("bench", broker="redis://127.0.0.1:$REDIS_PORT/0", backend="redis://127.0.0.1:$REDIS_PORT/1")
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=64, result_expires=3600, broker_connection_retry_on_startup=True)


@app.task
def noop():
    return None
PY

cat >"$work/produce.py" <<'PY'
import json, sys, threading, time

from bench_celery_tasks import noop

n, k, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
noop.delay().get(timeout=60)  # the worker is up
results = [None] * n
submitted_at = [0.0] * n


def submit(first):
    for i in range(first, n, k):
        submitted_at[i] = time.perf_counter()
        results[i] = noop.delay()


t0 = time.perf_counter()
threads = [threading.Thread(target=submit, args=(j,)) for j in range(k)]
for t in threads:
    t.start()
for t in threads:
    t.join()
submit_secs = time.perf_counter() - t0
for r in results:
    r.get(timeout=600)
secs = time.perf_counter() - t0
print(json.dumps({"system": "celery+redis", "workers": workers, "tasks": n, "secs": round(secs, 3),
                  "tasks_per_sec": round(n / secs, 1), "submit_per_sec": round(n / submit_secs, 1)}))
PY

celery_run() {
    local workers="$1"
    (cd "$work" && "$VENV/bin/celery" -A bench_celery_tasks worker --pool prefork --concurrency "$workers" \
        --without-heartbeat --without-gossip --without-mingle -l warning >"$work/worker-$workers.log" 2>&1) &
    local wpid=$!
    pids+=("$wpid")
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    (cd "$work" && "$VENV/bin/python" produce.py "$TASKS" "$SUBMITTERS" "$workers")
    pkill -TERM -P "$wpid" 2>/dev/null || true
    kill "$wpid" 2>/dev/null || true
    wait "$wpid" 2>/dev/null || true
}

echo "== celery + redis: $TASKS no-op tasks, $SUBMITTERS submitter threads"
celery1="$(celery_run 1)"
echo "$celery1"
celery4="$(celery_run 4)"
echo "$celery4"

if ! [ -x "$NODUS_BENCH" ]; then
    echo "bench-celery: $NODUS_BENCH not built; run cargo build --release -p nodus-bench -p nodus-tasks --bins for the nodus side" >&2
    exit 0
fi
echo "== nodus-bench tasks: $NODUS_TASKS no-op tasks, $SUBMITTERS submitters"
nodus="$("$NODUS_BENCH" --json tasks --tasks "$NODUS_TASKS" --submitters "$SUBMITTERS" --light 200)"
echo "$nodus"

python3 - "$celery1" "$celery4" "$nodus" <<'PY'
import json, sys

celery = {w: json.loads(line) for w, line in zip((1, 4), sys.argv[1:3])}
lines = [json.loads(l) for l in sys.argv[3].splitlines() if l.startswith("{")]
nodus = [r for r in lines if r["system"] == "nodus-tasks"]
disk = [r for r in lines if r["system"] == "disk"]
print()
if disk:
    print("fsync of this disk during the nodus run: p50 %.0f us" % disk[0]["fsync_p50_us"])
print("%-40s %12s %12s %8s" % ("end to end, no-op tasks", "celery t/s", "nodus t/s", "ratio"))
for sync in ("FULL", "NORMAL"):
    for w in (1, 4):
        row = [r for r in nodus if r["synchronous"] == sync and r["workers"] == w and r["what"].startswith("end to end")]
        if not row:
            continue
        n, c = row[0]["tasks_per_sec"], celery[w]["tasks_per_sec"]
        print("%-40s %12.0f %12.0f %7.1fx" % ("%d worker%s, nodus synchronous=%s" % (w, "" if w == 1 else "s", sync), c, n, n / c))
PY
