#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind (callgrind) in flotilla's own process
# and in nginx as a reverse proxy, for the same requests. Unlike times, instruction counts do
# not move with a shared machine's speed: this is the A/B measure for user-space changes to the
# request path. It counts user space only (not the kernel's share of syscalls), and valgrind
# runs a process's threads one at a time, so it says nothing about throughput or latency; those
# are scripts/bench-gateway.sh's.
#
#   scripts/bench-instructions.sh            # release build, then measure
#
# Environment:
#   FLOTILLA_BIN   binary to measure (default target/release/flotilla, built unless SKIP_BUILD=1)
#   REQUESTS       requests counted per protocol (default 20000), after 2000 uncounted ones
#   SCENARIOS      any of: h1 (HTTP/1.1, 10 connections), h2c (HTTP/2 prior knowledge,
#                  10 connections x 10 streams); default both
#
# Needs valgrind, nginx and h2load (nghttp2-client); installs the Debian packages if missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
REQUESTS=${REQUESTS:-20000}
WARMUP=2000
SCENARIOS=${SCENARIOS:-h1 h2c}
WORKERS=2
BACKEND_WORKERS=1

log() { echo "[bench-instructions] $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need[*]}; run as root or install them"
  log "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building flotilla (release)"
  cargo build --release --locked --bins
fi
FLOTILLA=${FLOTILLA_BIN:-$ROOT/target/release/flotilla}
[ -x "$FLOTILLA" ] || die "$FLOTILLA is missing"
FLOTILLA=$(realpath "$FLOTILLA")

T=$(mktemp -d /tmp/flotilla-bench-ins.XXXXXX)
mkdir -p "$T"/{backend/tmp,nginx/tmp,flotilla,tls,cg}
PIDS=()
cleanup() {
  local status=$? pid
  trap - EXIT INT TERM
  # SIGINT: flotilla stops its workloads with it (on SIGTERM it would leave them running);
  # nginx takes it as a fast shutdown, as SIGTERM.
  for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 150); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ] || [ "${KEEP:-0}" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_port, wait_http (here with 2 s per try: valgrind is slow), make_cert.
source "$ROOT/scripts/bench/common.sh"
make_cert "$T/tls"
source "$ROOT/scripts/bench/gateway-configs.sh"

# flotilla under callgrind, instrumentation off until the counted requests; the backend (its
# service's nginx) is a child process and is not traced.
FL_API=$(free_port) FL_HTTP=$(free_port) FL_TLS=$(free_port) FL_METRICS=$(free_port)
NGX_HTTP=$(free_port) NGX_H2C=$(free_port) NGX_TLS=$(free_port)
write_backend_template
write_flotilla_file plain
(cd "$T/flotilla" && FLOTILLA_LOG=warn FLOTILLA_CONFIG_DIR=$T/flotilla/config exec valgrind \
  --tool=callgrind --instr-atstart=no --callgrind-out-file="$T/cg/flotilla.%p" \
  "$FLOTILLA" up -f "$T/flotilla/flotilla.toml" --node bench >"$T/flotilla/up.out" 2>"$T/flotilla/up.log") &
FL_PID=$!
PIDS+=("$FL_PID")
wait_http "http://127.0.0.1:$FL_HTTP/" 120 2 || die "flotilla's gateway did not answer 200; see $T/flotilla/up.log"

# The backend's HTTP port, for nginx as a proxy: from the flotilla config's service instance.
TOKEN=$(cat "$T/flotilla/data/admin.token")
curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$FL_API/api/v1/instances?service=backend" \
  >"$T/flotilla/instances.json"
read -r _ B_HTTP _ < <(python3 "$ROOT/scripts/bench/gateway_report.py" instance-ports "$T/flotilla/instances.json")
[ -n "$B_HTTP" ] || die "no backend port"

# nginx as the reverse proxy, same config as in bench-gateway.sh, one master + WORKERS workers
# all under callgrind (the workers are forked children).
write_nginx_conf
valgrind --tool=callgrind --instr-atstart=no --trace-children=yes \
  --callgrind-out-file="$T/cg/nginx.%p" \
  nginx -e stderr -p "$T/nginx" -c "$T/nginx/nginx.conf" -g 'daemon off;' 2>"$T/nginx/stderr.log" &
NGX_PID=$!
PIDS+=("$NGX_PID")
wait_http "http://127.0.0.1:$NGX_HTTP/" 120 2 || die "nginx did not answer 200; see $T/nginx/stderr.log"

# The callgrind processes of a target (nginx: master and workers), as callgrind_control lists
# them ("PID n: command").
cg_pids() { # target
  local pat
  case $1 in
    flotilla) pat="$FLOTILLA up" ;;
    nginx) pat="nginx" ;;
  esac
  callgrind_control 2>/dev/null | awk -v pat="PID [0-9]+: $pat" '$0 ~ pat {sub(":", "", $2); print $2}'
}

# Counts the instructions of every process of `target` while `load ...` runs: instrumentation
# on and counters zeroed, the load, then a dump named `tag` (callgrind writes one file per
# process and dump) and instrumentation off. Prints the sum of the dumps' totals.
count_during() { # target tag load-args...
  local target=$1 tag=$2 pid total=0 n f
  shift 2
  local pids
  pids=$(cg_pids "$target")
  [ -n "$pids" ] || die "no callgrind process for $target"
  for pid in $pids; do
    callgrind_control -i on "$pid" >/dev/null 2>&1
    callgrind_control -z "$pid" >/dev/null 2>&1
  done
  load "$@" >"$T/$tag.txt" 2>&1 || die "load failed: $T/$tag.txt"
  for pid in $pids; do
    callgrind_control --dump="$tag" "$pid" >/dev/null 2>&1
    callgrind_control -i off "$pid" >/dev/null 2>&1
  done
  for f in "$T"/cg/*; do
    grep -q "^desc: Trigger: dump $tag\$" "$f" 2>/dev/null || continue
    n=$(awk '/^totals:/ {print $2}' "$f")
    total=$((total + ${n:-0}))
  done
  echo "$total"
}

load() { # scenario url requests
  case $1 in
    h1) h2load --h1 -n "$3" -c 10 -t 1 "$2" ;;
    h2c) h2load -n "$3" -c 10 -m 10 -t 1 "$2" ;;
  esac
}

printf '| protocol | nginx | flotilla | ratio |\n|---|---|---|---|\n' >"$T/report.md"
for scenario in $SCENARIOS; do
  declare -A per=()
  for target in nginx flotilla; do
    case $scenario.$target in
      h1.nginx) url=http://127.0.0.1:$NGX_HTTP/ ;;
      h2c.nginx) url=http://127.0.0.1:$NGX_H2C/ ;;
      *.flotilla) url=http://127.0.0.1:$FL_HTTP/ ;;
    esac
    load "$scenario" "$url" "$WARMUP" >"$T/$scenario.$target.warmup.txt" 2>&1 || true
    counted=$(count_during "$target" "$scenario.$target" "$scenario" "$url" "$REQUESTS")
    ok=$(awk '/^requests:/ {print $8}' "$T/$scenario.$target.txt")
    [ "${ok:-0}" -gt 0 ] || die "no request succeeded: $T/$scenario.$target.txt"
    log "$scenario $target: $counted instructions for $ok requests"
    per[$target]=$((counted / ok))
  done
  python3 -c "import sys; n, f = int(sys.argv[2]), int(sys.argv[3]); print(f'| {sys.argv[1]} | {n:,} | {f:,} | {f / n:.2f}× |')" \
    "$scenario" "${per[nginx]}" "${per[flotilla]}" >>"$T/report.md"
done
echo "## Instructions per request (callgrind, user space) — $(date -u +%Y-%m-%dT%H:%MZ), REQUESTS=$REQUESTS"
echo
cat "$T/report.md"
