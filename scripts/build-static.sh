#!/usr/bin/env bash
# Fully static release binaries (glibc, +crt-static), for copying to hosts as single files and
# for the .deb: `flotilla` (everything) and `flotilla-agent` (the agent alone, for nodes).
# The explicit --target keeps the static flag off build scripts and proc macros.
# `-z pack-relative-relocs` stores the position-independent binary's relocations as RELR
# (a few KiB instead of about 260 KiB that every process reads at start and keeps mapped);
# the static binary applies them itself, so it needs nothing from the host's glibc.
# Fails when `ldd` finds a dynamic dependency; prints each binary's size.
#
#   scripts/build-static.sh [BIN…]      (default: flotilla flotilla-agent)
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(flotilla flotilla-agent)
args=()
for bin in "${bins[@]}"; do args+=(--bin "$bin"); done
# getrandom looks glibc's getrandom() up with dlsym, which a static binary cannot: without
# `linux_getrandom` it falls back to /dev/urandom and a root without /dev (a bare chroot, a
# minimal container) cannot start.
RUSTFLAGS="-C target-feature=+crt-static -C force-unwind-tables=no -C link-arg=-Wl,-z,pack-relative-relocs --cfg getrandom_backend=\"linux_getrandom\"" \
    cargo build --release --locked -p flotilla "${args[@]}" --target "$target"
for bin in "${bins[@]}"; do
    out="${CARGO_TARGET_DIR:-target}/$target/release/$bin"
    deps=$(ldd "$out" 2>&1 || true)
    case "$deps" in
        *"not a dynamic executable"*|*"statically linked"*) ;;
        *) echo "$out is not static; ldd says:" >&2; echo "$deps" >&2; exit 1 ;;
    esac
    size=$(stat -c %s "$out")
    echo "$out: static, $(awk -v s="$size" 'BEGIN { printf "%.1f MiB", s / 1048576 }') ($size bytes)"
done
