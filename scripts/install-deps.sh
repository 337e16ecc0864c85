#!/usr/bin/env bash
# Installs what the tests need beyond what cargo fetches. Safe to run repeatedly.
set -euo pipefail
need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v ps >/dev/null 2>&1 || need+=(procps)
command -v curl >/dev/null 2>&1 || need+=(curl)
# Network namespaces, veth pairs and a bridge for the fleet tests over a real network.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# protoc: the etcd client's gRPC code is generated at build time.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# A real etcd for the store's conformance tests and the high-availability tests.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# The .deb: built with dpkg-deb, checked with lintian, its units with systemd-analyze.
command -v dpkg-deb >/dev/null 2>&1 || need+=(dpkg-dev)
command -v lintian >/dev/null 2>&1 || need+=(lintian)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v file >/dev/null 2>&1 || need+=(file)
command -v adduser >/dev/null 2>&1 || need+=(adduser)
# A C++ compiler: libfuzzer-sys builds libFuzzer (scripts/fuzz.sh).
command -v c++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${need[*]}: install them (as root: apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
