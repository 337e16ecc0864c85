#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and integration tests, then every fuzz
# target for a bounded time (scripts/fuzz.sh).
# Tests that need root (cgroups) say "skipped: ..." when not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/check-tracked.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# Every fuzz target for a bounded time (FUZZ_SECONDS); its failure fails the suite, after the
# summary below.
fuzz_status=0
./scripts/fuzz.sh || fuzz_status=$?
# The release artifact: the static binary (ldd finds nothing, size printed), run in a chroot
# holding nothing else, then packaged and taken through install, reload, upgrade and removal.
release_status=0
{
  ./scripts/build-static.sh flotilla &&
    ./scripts/test-static.sh &&
    python3 scripts/test-deb.py --binary "${CARGO_TARGET_DIR:-target}/$(rustc -vV | sed -n 's/^host: //p')/release/flotilla"
} || release_status=$?
# One closing summary for the whole run (cargo prints one line per test binary). A test that
# could not run here passes after printing `skipped: <test> needs …`: those are counted apart.
skips=$(grep -o 'skipped: .*' "$log" | sort -u || true)
skipped=$(printf '%s' "$skips" | grep -c . || true)
awk -v skipped="$skipped" '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "all tests: %d passed, %d skipped, %d failed, %d ignored\n", p - skipped, skipped, f, i }' "$log"
if [ "$skipped" -gt 0 ]; then
  echo "skipped (each says why):"
  printf '%s\n' "$skips" | sed 's/^/  /'
fi
[ "$fuzz_status" -ne 0 ] && echo "note: scripts/fuzz.sh failed (exit $fuzz_status): see its lines above"
[ "$release_status" -ne 0 ] && echo "note: the static binary or the .deb failed (exit $release_status): see the FAILED line above"
[ "$status" -ne 0 ] && exit "$status"
[ "$fuzz_status" -ne 0 ] && exit "$fuzz_status"
exit "$release_status"
