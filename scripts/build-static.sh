#!/usr/bin/env bash
# Fully static release binaries (glibc, +crt-static), for copying to hosts as single files:
# `flotilla` (everything) and `flotilla-agent` (the agent alone, for nodes).
# The explicit --target keeps the static flag off build scripts and proc macros.
# `-z pack-relative-relocs` stores the position-independent binary's relocations as RELR
# (a few KiB instead of about 260 KiB that every process reads at start and keeps mapped);
# the static binary applies them itself, so it needs nothing from the host's glibc.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs" \
    cargo build --release --locked --bins --target "$target"
for bin in flotilla flotilla-agent; do
    out="${CARGO_TARGET_DIR:-target}/$target/release/$bin"
    file "$out" 2>/dev/null || true
    ls -l "$out"
done
