#!/usr/bin/env bash
# Builds flotilla and the demo service, then runs `flotilla up` on the hello example.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --locked --bins
export PATH="$PWD/target/release:$PATH"
exec flotilla up -f examples/hello/flotilla.toml "$@"
