#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for FUZZ_SECONDS seconds each, one after
# the other, and reports crashes.
#
#   scripts/fuzz.sh                  every target, 30 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh the long run (docs: README, "Fuzzing")
#   scripts/fuzz.sh config envelope  only these targets
#
# cargo-fuzz needs nightly compiler flags (-Z sanitizer, coverage
# instrumentation). Only a stable toolchain is needed: RUSTC_BOOTSTRAP=1
# lets stable rustc accept them. cargo-fuzz itself is installed from
# crates.io into ~/.cargo/bin when missing.
#
# Each target grows fuzz/corpus/<target>/ (not committed) from the committed
# seeds in fuzz/seeds/<target>/; a crash input lands in
# fuzz/artifacts/<target>/. Copy it to tests/fuzz-regressions/<target>/
# once fixed: tests/fuzz_regressions.rs replays it under plain `cargo test`.
#
# Environment: FUZZ_SECONDS (30), FUZZ_JOBS (1 fuzzer process at a time),
# FUZZ_NICE (19), FUZZ_RSS_MB (2048: an input that makes a target use more
# is a finding), FUZZ_SANITIZER (none; address is slower, and mkc has
# little unsafe code).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_EACH=${FUZZ_SECONDS:-30}
NICE=${FUZZ_NICE:-19}
RSS_MB=${FUZZ_RSS_MB:-2048}
SANITIZER=${FUZZ_SANITIZER:-none}
export RUSTC_BOOTSTRAP=1
export PATH="$HOME/.cargo/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz into ~/.cargo/bin" >&2
    cargo install --locked cargo-fuzz
fi

cd fuzz
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz: building ${targets[*]}" >&2
nice -n "$NICE" cargo fuzz build -s "$SANITIZER" --debug-assertions

failed=()
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    dict=()
    case $target in
        config) dict=(-dict=dict/config.dict) ;;
        *) dict=(-dict=dict/json.dict) ;;
    esac
    log="artifacts/$target/run.log"
    echo "fuzz: $target for ${SECONDS_EACH}s (log: fuzz/$log)" >&2
    status=0
    nice -n "$NICE" cargo fuzz run -s "$SANITIZER" --debug-assertions "$target" \
        "corpus/$target" "seeds/$target" -- \
        -max_total_time="$SECONDS_EACH" -rss_limit_mb="$RSS_MB" -timeout=10 \
        -max_len=65536 -print_final_stats=1 "${dict[@]}" >"$log" 2>&1 || status=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    corpus=$(find "corpus/$target" -type f | wc -l)
    crashes=$(find "artifacts/$target" -type f \( -name 'crash-*' -o -name 'oom-*' \
        -o -name 'timeout-*' -o -name 'leak-*' \) | wc -l)
    line="$target: ${SECONDS_EACH}s, ${execs:-?} executions, corpus $corpus, crash files $crashes, exit $status"
    summary+=("$line")
    echo "fuzz: $line" >&2
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        tail -n 40 "$log" >&2
    fi
done

echo
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs under $ROOT/fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: no crash"
