#!/usr/bin/env bash
# A fully static release binary (glibc, +crt-static), for copying to hosts as one file.
# The explicit --target keeps the static flag off build scripts and proc macros.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --bins --target "$target"
out="target/$target/release/flotilla"
file "$out" 2>/dev/null || true
ls -l "$out"
