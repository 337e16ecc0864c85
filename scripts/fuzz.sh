#!/usr/bin/env bash
# Builds every fuzz target of fuzz/ and runs each for FUZZ_SECONDS (default 30) seconds, from its
# seeds (fuzz/seeds/TARGET, copied: the repository is not modified). Prints one line per target
# (runs, seconds); exits non-zero, naming the target and the input it failed on, if any target
# crashes, times out or runs out of memory. See docs/benchmarks.md ("Fuzzing").
#
# The targets are built with plain `cargo build` and the instrumentation cargo-fuzz passes
# (sanitizer coverage with comparison tracing; libfuzzer-sys builds libFuzzer itself), without
# AddressSanitizer, in fuzz/Cargo.toml's `ci` profile (opt-level 1, the crates no target runs at
# 0): on two cores that builds in about half of `cargo fuzz build`'s time and needs no cargo-fuzz
# installed first; the code fuzzed is safe Rust, where an out-of-bounds access is a panic anyway.
# `cargo fuzz` (fuzz/README.md) stays the way to fuzz for long, with AddressSanitizer.
#
#   FUZZ_SECONDS     seconds per target (default 30)
#   FUZZ_TARGETS     the targets to run, space-separated (default: every fuzz/fuzz_targets/*.rs)
#   FUZZ_JOBS        targets run at once (default: the number of cores)
#   FUZZ_ARGS        more libFuzzer options for every target
#   FUZZ_CARGO_ARGS  more cargo build options (`--timings`)
#   FUZZ_ASAN=1      build with AddressSanitizer too (a build of its own; runs about 5x slower)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${FUZZ_SECONDS:-30}
jobs=${FUZZ_JOBS:-$(nproc)}
targets=${FUZZ_TARGETS:-$(cd fuzz/fuzz_targets && ls -- *.rs | sed 's/\.rs$//')}
if ! [ "$seconds" -ge 1 ] 2>/dev/null; then
  # libFuzzer takes 0 as no limit at all.
  echo "fuzz: FUZZ_SECONDS must be a whole number of seconds, at least 1 (not ${seconds@Q})" >&2
  exit 2
fi
host=$(rustc -vV | sed -n 's/^host: //p')
target_dir=$root/fuzz/target
profile=ci

# What cargo-fuzz 0.13 passes (`cargo fuzz build -s none`), less `-Ccodegen-units=1`.
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  -Cllvm-args=-sanitizer-coverage-stack-depth
  --cfg fuzzing
  -Cdebug-assertions
)
if [ "${FUZZ_ASAN:-0}" = 1 ]; then
  # Nightly-only; RUSTC_BOOTSTRAP below allows it on the stable toolchain.
  flags+=(-Zsanitizer=address)
  target_dir=$target_dir/asan
fi

started=$(date +%s)
# `--target` keeps the flags off build scripts and proc macros, as cargo-fuzz does.
# RUSTC_BOOTSTRAP lets the stable toolchain take `-Z` flags (FUZZ_ASAN).
(
  cd fuzz
  # shellcheck disable=SC2086 # FUZZ_CARGO_ARGS is a list of options
  RUSTC_BOOTSTRAP=1 RUSTFLAGS="${flags[*]}" cargo build --profile "$profile" --bins \
    --target "$host" --target-dir "$target_dir" ${FUZZ_CARGO_ARGS:-}
)
echo "fuzz: built $(wc -w <<<"$targets") targets in $(($(date +%s) - started)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
artifacts=$root/fuzz/artifacts

# Runs one target; its libFuzzer log goes to $work/TARGET.log, its exit code to TARGET.rc.
run() {
  local t=$1 corpus=$work/corpus/$1 dict=()
  mkdir -p "$corpus" "$artifacts/$t"
  if [ -d "fuzz/seeds/$t" ]; then
    cp -R "fuzz/seeds/$t/." "$corpus/"
  fi
  if [ -f "fuzz/dicts/$t.dict" ]; then
    dict=("-dict=fuzz/dicts/$t.dict")
  fi
  local rc=0
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of options
  "$target_dir/$host/$profile/$t" "$corpus" "${dict[@]}" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
    -artifact_prefix="$artifacts/$t/" -print_final_stats=1 ${FUZZ_ARGS:-} \
    >"$work/$t.log" 2>&1 || rc=$?
  echo "$rc" >"$work/$t.rc"
}

running=0
for t in $targets; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  run "$t" &
  running=$((running + 1))
done
wait

failed=()
for t in $targets; do
  log=$work/$t.log
  rc=$(cat "$work/$t.rc" 2>/dev/null || echo 1)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  cov=$( (grep -o 'cov: [0-9]*' "$log" || true) | tail -1 | cut -d' ' -f2)
  if [ "$rc" = 0 ]; then
    rate=$(( ${runs:-0} / (${took:-$seconds} > 0 ? ${took:-$seconds} : 1) ))
    echo "fuzz: $t: ${runs:-?} runs in ${took:-?} s ($rate runs/s, cov ${cov:-?}), no crash"
    continue
  fi
  failed+=("$t")
  crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
  echo "fuzz: $t: FAILED (exit $rc) after ${runs:-?} runs; input: ${crash:-none written}"
  # The panic (without its backtrace) or libFuzzer's report, and the input itself (CI's clone
  # is thrown away).
  {
    sed -n '/panicked at/,/^stack backtrace:/p' "$log" | grep -v '^stack backtrace:' | head -30
    grep -E '^(==[0-9]+== ERROR|SUMMARY|MS:)' "$log" || true
  } | sed "s/^/  $t: /"
  if [ -n "$crash" ] && [ -f "$crash" ]; then
    echo "  $t: input as base64: $(head -c 8192 "$crash" | base64 -w0)"
    echo "  $t: replay: $target_dir/$host/$profile/$t $crash"
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: $(wc -w <<<"$targets") targets, ${seconds} s each, no crash (total $(($(date +%s) - started)) s)"
