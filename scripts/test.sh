#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and integration tests.
# Tests that need root (cgroups) say "skipped: ..." when not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
