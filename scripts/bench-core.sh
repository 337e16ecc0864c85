#!/usr/bin/env bash
# Core platform benchmarks (issue: core platform). Release build; loopback only.
#   RUNS=10 ./scripts/bench-core.sh
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked --bins
exec python3 scripts/bench_core.py
