#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and integration tests.
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
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "all tests: %d passed, %d failed, %d ignored\n", p, f, s }' "$log"
skipped=$(grep -c '^skipped:' "$log" || true)
[ "$skipped" -gt 0 ] && echo "note: $skipped tests skipped (they need root and cgroups)"
exit "$status"
