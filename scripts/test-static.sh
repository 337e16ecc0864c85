#!/usr/bin/env bash
# The static binary on a machine that has nothing else: a root directory holding only
# /flotilla, entered with chroot (as root). `flotilla --version` runs, and `flotilla up` starts
# (store, API, gateway, agent) and answers its API's /healthz from outside the chroot.
#
#   scripts/test-static.sh [BINARY]     (default: the build of scripts/build-static.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "skipped: scripts/test-static.sh needs root (chroot)"
    exit 0
fi
bin=${1:-${CARGO_TARGET_DIR:-target}/$(rustc -vV | sed -n 's/^host: //p')/release/flotilla}
root=$(mktemp -d)
pid=""
cleanup() {
    [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT
install -m 0755 "$bin" "$root/flotilla"
ls "$root" | grep -qx flotilla
version=$(chroot "$root" /flotilla --version)
echo "ok: chroot with only the binary: $version"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
gw=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mt=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FLOTILLA_CONFIG_DIR=/config chroot "$root" /flotilla --data-dir /data up \
    --api-listen "127.0.0.1:$port" --gateway-listen "127.0.0.1:$gw" --metrics-listen "127.0.0.1:$mt" \
    > "$root/up.log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do
    if curl -fsS "http://127.0.0.1:$port/healthz" > /dev/null 2>&1; then
        echo "ok: flotilla up in the chroot answers http://127.0.0.1:$port/healthz"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.05
done
echo "FAILED: flotilla up in a chroot with only the binary did not answer; it printed:" >&2
cat "$root/up.log" >&2
exit 1
