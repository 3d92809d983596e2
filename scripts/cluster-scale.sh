#!/usr/bin/env bash
# The cluster at scale with real daemon processes: `nodus-bench cluster --nodes N` for a list of
# N, each the median of several runs (a new random graph per run), printed as one table.
#
#   scripts/cluster-scale.sh [--nodes 20,40,60,80,100] [--runs 5] [--before OLD_NODUS] [-- ARGS...]
#
# Builds nodus and nodus-bench in release if missing. Every run starts N `nodus daemon` processes
# on loopback all together (each dials two others), waits until every node sees every node,
# measures idle traffic, then kill -9s the busiest hub; the row shows the medians of the runs:
# convergence, bytes per node, false deaths, idle bytes per link, the crash seen everywhere,
# and the fewest live nodes any node reported. With --before, another nodus binary (e.g. built
# from an older commit) is measured row for row in the same run. Arguments after `--` go to
# `nodus-bench cluster` (e.g. --heartbeat-ms 100 --dials 3 --json).
#
# Environment: CARGO_TARGET_DIR (default ~/.cache/nodus-target), NODUS_BENCH (default
# $CARGO_TARGET_DIR/release/nodus-bench), NODUS (default: the nodus next to it).
set -euo pipefail
cd "$(dirname "$0")/.."

NODES="20,40,60,80,100"
RUNS=5
BEFORE=()
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) NODES="${2:?--nodes needs a list}"; shift 2 ;;
        --nodes=*) NODES="${1#*=}"; shift ;;
        --runs) RUNS="${2:?--runs needs a number}"; shift 2 ;;
        --runs=*) RUNS="${1#*=}"; shift ;;
        --before) BEFORE=(--before "${2:?--before needs a binary}"); shift 2 ;;
        --before=*) BEFORE=(--before "${1#*=}"); shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "cluster-scale: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
case "$RUNS" in
    ''|*[!0-9]*|0) echo "cluster-scale: --runs must be a positive number, not '$RUNS'" >&2; exit 2 ;;
esac

TARGET_ROOT="${CARGO_TARGET_DIR:-$HOME/.cache/nodus-target}"
NODUS_BENCH="${NODUS_BENCH:-$TARGET_ROOT/release/nodus-bench}"
NODUS="${NODUS:-$(dirname "$NODUS_BENCH")/nodus}"
if [ ! -x "$NODUS_BENCH" ] || [ ! -x "$NODUS" ]; then
    echo "cluster-scale: building nodus and nodus-bench (release) in $TARGET_ROOT" >&2
    CARGO_TARGET_DIR="$TARGET_ROOT" cargo build --release --locked -p nodus -p nodus-bench >&2
fi

echo "cluster at scale: nodes $NODES, medians of $RUNS run(s) each, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
exec "$NODUS_BENCH" --nodus "$NODUS" cluster --nodes "$NODES" --runs "$RUNS" "${BEFORE[@]}" "${EXTRA[@]}"
