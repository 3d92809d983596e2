#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and fails on any crash.
#
#   scripts/fuzz.sh [SECONDS] [--merge] [TARGET...]
#
# SECONDS   run time per target (default 20); the build comes on top.
# --merge   afterwards, add the inputs that found new edges to fuzz/corpus/<target>/ (and
#           drop found inputs that no longer add any); without it the corpus is only read.
# TARGET    run only these targets (default: all of them).
#
# Prints per target: inputs tried (execs), crashes, peak RSS. A crash leaves its input in
# fuzz/artifacts/<target>/; reproduce it with `cargo +nightly fuzz run <target> <file>`.
# Environment: NODUS_FUZZ_TARGET_DIR (build cache, default ~/.cache/nodus-fuzz-target),
# FUZZ_SANITIZER (none | address, default none: the crates forbid unsafe code, and without
# ASan each target tries several times more inputs), FUZZ_MAX_LEN (bytes, default 8192),
# FUZZ_RSS_LIMIT_MB (default 1024).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(wire_text wire_binary cocaine_worker cocaine_service gossip control flags arpcp_line tasks_cluster rows)

seconds=20
merge=0
targets=()
for arg in "$@"; do
    case "$arg" in
        --merge) merge=1 ;;
        -h | --help)
            sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *[!0-9]*) targets+=("$arg") ;;
        *) seconds="$arg" ;;
    esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

export CARGO_TARGET_DIR="${NODUS_FUZZ_TARGET_DIR:-$HOME/.cache/nodus-fuzz-target}"
sanitizer="${FUZZ_SANITIZER:-none}"
max_len="${FUZZ_MAX_LEN:-8192}"
rss_limit="${FUZZ_RSS_LIMIT_MB:-1024}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (once, into ~/.cargo/bin)"
    cargo install cargo-fuzz --locked
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain cargo-fuzz needs"
    rustup toolchain install nightly --profile minimal
fi

start=$(date +%s)
echo "== building fuzz targets (sanitizer: $sanitizer)"
build_log=$(mktemp)
if ! (cd fuzz && cargo +nightly fuzz build --sanitizer "$sanitizer" --target-dir "$CARGO_TARGET_DIR") >"$build_log" 2>&1; then
    grep -Ev '^ +(Compiling|Downloaded|Downloading) ' "$build_log" >&2 || true
    echo "the fuzz targets do not build" >&2
    exit 1
fi
rm -f "$build_log"
host=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin="$CARGO_TARGET_DIR/$host/release"
for t in "${targets[@]}"; do
    [ -x "$bin/$t" ] || { echo "fuzz target $t did not build (known: ${ALL_TARGETS[*]})" >&2; exit 1; }
done
echo "== built in $(($(date +%s) - start)) s; running each target for $seconds s"

# Replaces the found inputs in corpus/<target>/ with a smallest set that, together with the
# seed-* and regress-* files (always kept), covers every edge the old corpus and this run's new
# inputs cover. Edges only (-use_counters=0): hit counts and comparisons would keep thousands of
# near-duplicates, and the fuzzer finds those again in seconds.
merge_corpus() {
    local t="$1" corpus="$2" work="$3"
    local n kept
    n=$(ls "$corpus" | wc -l)
    mkdir -p "$work/kept" "$work/all" "$work/min"
    cp "$corpus"/seed-* "$corpus"/regress-* "$work/kept/" 2>/dev/null || true
    cp "$corpus"/* "$work/new"/* "$work/all/" 2>/dev/null || true
    if ! "$bin/$t" -set_cover_merge=1 -use_counters=0 -max_len="$max_len" "$work/min" "$work/kept" "$work/all" \
        >"$work/merge.log" 2>&1; then
        echo "   merge failed; corpus unchanged:" >&2
        tail -5 "$work/merge.log" >&2
        return
    fi
    kept=$(cd "$work/kept" && sha1sum -- * 2>/dev/null | cut -d' ' -f1)
    find "$corpus" -type f ! -name 'seed-*' ! -name 'regress-*' -delete
    for f in "$work/min"/*; do
        [ -e "$f" ] || continue
        grep -qx "$(basename "$f")" <<<"$kept" || cp "$f" "$corpus/"
    done
    echo "   merged: $corpus has $(ls "$corpus" | wc -l) inputs (was $n), $(cat "$corpus"/* | wc -c) bytes"
}

failed=()
printf '%-16s %12s %8s %8s %10s\n' target execs exec/s crashes "peak rss"
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    artifacts="fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    work=$(mktemp -d)
    mkdir -p "$work/new"
    log="$work/log"
    before=$(ls "$artifacts" | wc -l)
    # New inputs go to the scratch directory (first); the committed corpus is read only.
    set +e
    "$bin/$t" -max_total_time="$seconds" -print_final_stats=1 -max_len="$max_len" \
        -rss_limit_mb="$rss_limit" -timeout=10 -artifact_prefix="$artifacts/" \
        "$work/new" "$corpus" >"$log" 2>&1 </dev/null
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    # After a crash libFuzzer prints no final stats: take the last status line's figures.
    [ -n "$execs" ] || execs=$( (grep -o '^#[0-9]*' "$log" || true) | tail -1 | tr -d '#')
    [ -n "$rss" ] || rss=$( (grep -o 'rss: [0-9]*Mb' "$log" || true) | tail -1 | tr -dc '0-9')
    crashes=$(($(ls "$artifacts" | wc -l) - before))
    [ "$rc" -eq 0 ] || [ "$crashes" -gt 0 ] || crashes=1
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    printf '%-16s %12s %8s %8s %7s MB\n' "$t" "${execs:-?}" "${rate:-?}" "$crashes" "${rss:-?}"
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        echo "---- $t failed (exit $rc); the fuzzer said:" >&2
        { grep -m1 -A1 'panicked at' "$log" | cut -c1-300; grep -m1 'SUMMARY' "$log"; } >&2 || tail -20 "$log" >&2
        ls -t "$artifacts" | head -1 | sed "s|^|     input: $artifacts/|" >&2
    fi
    if [ "$merge" -eq 1 ] && [ "$rc" -eq 0 ]; then
        merge_corpus "$t" "$corpus" "$work"
    fi
    rm -rf "$work"
done
echo "== fuzzing took $(($(date +%s) - start)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}" >&2
    exit 1
fi
