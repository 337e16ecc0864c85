#!/usr/bin/env bash
# Edge gateway benchmark (issue 3): flotilla's gateway side by side with nginx and HAProxy, in
# front of the same backend, on loopback, in one run. Prints a Markdown table (see
# docs/benchmarks.md, "Gateway").
#
#   ./scripts/bench-gateway.sh                       # DURATION=10 s per measurement, RUNS=5
#   QUICK=1 ./scripts/bench-gateway.sh               # smoke test: DURATION=2, RUNS=1
#   DURATION=5 RUNS=3 SCENARIOS="h1 h2" ./scripts/bench-gateway.sh
#
# Settings (environment):
#   DURATION        seconds per measurement (default 10; QUICK=1: 2)
#   RUNS            repetitions of every measurement; figures are medians (default 5; QUICK=1: 1)
#   SCENARIOS       any of: h1 (HTTP/1.1 cleartext), tls (HTTP/1.1 over TLS 1.3), h2 (h2load:
#                   cleartext h2 and h2 over TLS) — default "h1 tls h2"
#   CONNS           connections for throughput and fixed-rate runs (default 50)
#   RATES           fixed rates, in % of nginx's measured max (default "25 50 75")
#   MEASURES        any of: max (closed-loop throughput), c1 (latency at c=1), rates (fixed
#                   rates; needs max) — default "max c1 rates"; h2 runs only measure max
#   H2_STREAMS      concurrent streams per h2 connection (default 10)
#   WORKERS         worker processes/threads of every proxy (default 2; flotilla: [gateway] workers)
#   BACKEND_WORKERS worker processes of the backend nginx (default 1)
#   OHA             path of an oha binary to use, or "none" for the fallbacks (wrk at c=1,
#                   h2load --h1 --rps at fixed rates); default target/bench-tools/bin/oha
#   SKIP_BUILD=1    use target/release as it is;  KEEP=1  keep the temporary directory
#   FLOTILLA_BIN    the flotilla binary to measure (default target/release/flotilla), e.g. a
#                   build with symbols for perf (implies nothing about SKIP_BUILD)
#
# Needs root to install packages (nginx, haproxy, wrk, nghttp2-client, openssl) when missing;
# oha is built once into target/bench-tools. Every process it starts is stopped on exit; every
# load run is bounded by DURATION (plus a timeout); all traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
HELPER="python3 $ROOT/scripts/bench/gateway_report.py"
TOOLS=$ROOT/target/bench-tools

if [ "${QUICK:-0}" = 1 ]; then
  DURATION=${DURATION:-2}
  RUNS=${RUNS:-1}
fi
DURATION=${DURATION:-10}
RUNS=${RUNS:-5}
SCENARIOS=${SCENARIOS:-"h1 tls h2"}
CONNS=${CONNS:-50}
RATES=${RATES:-"25 50 75"}
MEASURES=${MEASURES:-"max c1 rates"}
H2_STREAMS=${H2_STREAMS:-10}
WORKERS=${WORKERS:-2}
BACKEND_WORKERS=${BACKEND_WORKERS:-1}
TARGETS=(direct nginx haproxy flotilla)

log() { printf '[bench-gateway] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
has() { case " $SCENARIOS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
wants() { case " $MEASURES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------------------------------------
# 1. Tools: Debian packages, then oha (constant-rate load with coordinated-omission correction).

install_packages() {
  local need=()
  command -v nginx >/dev/null 2>&1 || need+=(nginx)
  command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v python3 >/dev/null 2>&1 || need+=(python3)
  command -v timeout >/dev/null 2>&1 || need+=(coreutils)
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing ${need[*]}: install them (as root: apt-get install -y ${need[*]})"
  log "installing ${need[*]}"
  apt-get update -qq
  # Package scripts try to start the system services; policy-rc.d usually forbids it in
  # containers, and we never use them (every daemon here runs from its own config in $T).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

OHA=${OHA:-}
install_oha() {
  if [ "$OHA" = none ]; then
    OHA="" # forced fallback (testing)
    log "OHA=none: c=1 runs use wrk, fixed-rate runs h2load --h1 --rps (no coordinated-omission correction)"
  elif [ -n "$OHA" ]; then
    [ -x "$OHA" ] || die "OHA=$OHA is not executable"
  elif [ -x "$TOOLS/bin/oha" ]; then
    OHA=$TOOLS/bin/oha
  elif command -v oha >/dev/null 2>&1; then
    OHA=$(command -v oha)
  else
    log "building oha into $TOOLS (once; a few minutes)"
    if cargo install oha --locked --root "$TOOLS" >"$TOOLS.oha-install.log" 2>&1; then
      OHA=$TOOLS/bin/oha
    else
      log "warning: oha could not be built (see $TOOLS.oha-install.log); fixed-rate runs fall back"
      log "         to h2load --h1 --rps, whose latencies are not corrected for coordinated omission"
    fi
  fi
}

install_packages
mkdir -p "$TOOLS"
install_oha

# ---------------------------------------------------------------------------------------------
# 2. flotilla release build.

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building flotilla (release)"
  cargo build --release --locked --bins
fi
FLOTILLA=${FLOTILLA_BIN:-$ROOT/target/release/flotilla}
[ -x "$FLOTILLA" ] || die "$FLOTILLA is missing"

# ---------------------------------------------------------------------------------------------
# 3. A temporary directory for configs, logs and raw results; everything started is stopped on
#    exit.

T=$(mktemp -d /tmp/flotilla-bench-gw.XXXXXX)
mkdir -p "$T"/{backend/tmp,nginx/tmp,haproxy,flotilla,tls,raw}
RESULTS=$T/results.tsv
: >"$RESULTS"
PIDS=()
FAILED_RUNS=0

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Newest first: flotilla (started first) stops the backend it runs, within its grace period.
  local i pid
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    # flotilla on SIGINT stops its workloads (SIGTERM would leave the backend running).
    if [ "$pid" = "${FL_PID:-}" ]; then
      kill -INT "$pid" 2>/dev/null || true
    else
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do # at most 20 s each
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ "${KEEP:-0}" = 1 ] || [ "$status" -ne 0 ] || [ "$FAILED_RUNS" -gt 0 ]; then
    log "kept $T (configs, logs, raw load-generator output)"
  else
    rm -rf "$T"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Enough descriptors for every proxy (their configs ask for at most 16384).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# free_port, wait_http, make_cert.
source "$ROOT/scripts/bench/common.sh"

# ---------------------------------------------------------------------------------------------
# 4. Certificate (self-signed ECDSA P-256, for 127.0.0.1 and localhost), shared by all.

make_cert "$T/tls"
cat "$T/tls/cert.pem" "$T/tls/key.pem" >"$T/tls/haproxy.pem"

source "$ROOT/scripts/bench/gateway-configs.sh"

# ---------------------------------------------------------------------------------------------
# 5. flotilla up, running the backend as a service. Without TLS support in this build (the
#    `[gateway]` table is rejected), it is started again without TLS and the TLS runs skip it.

FL_API=$(free_port) FL_HTTP=$(free_port) FL_TLS=$(free_port) FL_METRICS=$(free_port)
write_backend_template

start_flotilla() { # $1: tls | plain | bare
  write_flotilla_file "$1"
  rm -rf "$T/flotilla/data"
  FLOTILLA_LOG=warn FLOTILLA_CONFIG_DIR=$T/flotilla/config \
    "$FLOTILLA" up -f "$T/flotilla/flotilla.toml" --node bench >"$T/flotilla/up.out" 2>"$T/flotilla/up.log" &
  FL_PID=$!
  local i
  for ((i = 0; i < 100; i++)); do # 10 s
    kill -0 "$FL_PID" 2>/dev/null || return 1
    grep -q "is up in" "$T/flotilla/up.out" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

FLOTILLA_TLS=1
if ! start_flotilla tls; then
  kill -INT "$FL_PID" 2>/dev/null || true
  wait "$FL_PID" 2>/dev/null || true
  # shellcheck disable=SC2016 # literal backticks in the error message
  if grep -q 'unknown field `gateway`' "$T/flotilla/up.log"; then
    log "flotilla rejected the [gateway] TLS table:"
    sed 's/^/    /' "$T/flotilla/up.log" >&2
    log "TLS: flotilla is SKIPPED in the TLS runs (this build has no gateway TLS); starting without it"
    FLOTILLA_TLS=0
    start_flotilla bare || die "flotilla up failed; see $T/flotilla/up.log"
  else
    die "flotilla up failed; see $T/flotilla/up.log"
  fi
fi
PIDS+=("$FL_PID")

# The backend's ports, from the API once its instance is ready (at most 30 s).
TOKEN=$(cat "$T/flotilla/data/admin.token")
B_PID="" B_HTTP=""
for ((i = 0; i < 300; i++)); do
  if curl -sf --max-time 2 -H "Authorization: Bearer $TOKEN" \
    "http://127.0.0.1:$FL_API/api/v1/instances?service=backend" >"$T/flotilla/instances.json"; then
    read -r B_PID B_HTTP B_H2C B_TLS < <($HELPER instance-ports "$T/flotilla/instances.json") || true
    [ -n "$B_HTTP" ] && break
  fi
  sleep 0.1
done
[ -n "$B_HTTP" ] || die "the backend service did not become ready; see $T/flotilla/up.log"
log "backend: nginx (pid $B_PID, $BACKEND_WORKERS worker) on :$B_HTTP (h1), :$B_H2C (h2c), :$B_TLS (TLS), run by flotilla"

# ---------------------------------------------------------------------------------------------
# 6. nginx and HAProxy in front of the same backend.

NGX_HTTP=$(free_port) NGX_H2C=$(free_port) NGX_TLS=$(free_port)
HA_HTTP=$(free_port) HA_H2C=$(free_port) HA_TLS=$(free_port)
write_nginx_conf
write_haproxy_conf
nginx -e stderr -p "$T/nginx" -c "$T/nginx/nginx.conf" -g 'daemon off;' 2>"$T/nginx/stderr.log" &
NGX_PID=$!
PIDS+=("$NGX_PID")
haproxy -db -f "$T/haproxy/haproxy.cfg" >"$T/haproxy/out.log" 2>&1 &
HA_PID=$!
PIDS+=("$HA_PID")

for url in "http://127.0.0.1:$B_HTTP/" "http://127.0.0.1:$NGX_HTTP/" "http://127.0.0.1:$HA_HTTP/" \
  "http://127.0.0.1:$FL_HTTP/"; do
  wait_http "$url" 15 || die "$url does not answer 200 (logs in $T)"
done

# URL of each target per protocol: h1 (cleartext), tls, h2c (prior knowledge), h2tls (ALPN).
declare -A URL
URL[h1.direct]=http://127.0.0.1:$B_HTTP/ URL[h1.nginx]=http://127.0.0.1:$NGX_HTTP/
URL[h1.haproxy]=http://127.0.0.1:$HA_HTTP/ URL[h1.flotilla]=http://127.0.0.1:$FL_HTTP/
URL[tls.direct]=https://127.0.0.1:$B_TLS/ URL[tls.nginx]=https://127.0.0.1:$NGX_TLS/
URL[tls.haproxy]=https://127.0.0.1:$HA_TLS/
URL[h2c.direct]=http://127.0.0.1:$B_H2C/ URL[h2c.nginx]=http://127.0.0.1:$NGX_H2C/
URL[h2c.haproxy]=http://127.0.0.1:$HA_H2C/ URL[h2c.flotilla]=http://127.0.0.1:$FL_HTTP/
if [ "$FLOTILLA_TLS" = 1 ]; then
  URL[tls.flotilla]=https://127.0.0.1:$FL_TLS/
fi

# Sanity: every TLS target answers and negotiates TLS 1.3.
if has tls || has h2; then
  for t in "${TARGETS[@]}"; do
    url=${URL[tls.$t]:-}
    [ -n "$url" ] || continue
    wait_http "$url" 10 || die "$url does not answer 200"
    port=${url##*:}
    port=${port%/}
    proto=$(openssl s_client -connect "127.0.0.1:$port" -brief </dev/null 2>&1 | sed -n 's/^Protocol version: //p' | head -1)
    [ "$proto" = TLSv1.3 ] || die "$t on :$port negotiated '${proto:-nothing}', not TLSv1.3"
  done
  log "TLS: all targets negotiate TLSv1.3"
fi
URL[h2tls.direct]=${URL[tls.direct]} URL[h2tls.nginx]=${URL[tls.nginx]}
URL[h2tls.haproxy]=${URL[tls.haproxy]} URL[h2tls.flotilla]=${URL[tls.flotilla]:-}

# ---------------------------------------------------------------------------------------------
# 7. Measurements. Each writes its raw output to $T/raw and `scenario target run metric value`
#    lines to $RESULTS. Targets are interleaved: every run visits all four, in an order rotated
#    by one each run, so slow phases of the shared machine spread over all of them.

# measure SCENARIO TARGET RUN PARSER COMMAND...
measure() {
  local scenario=$1 target=$2 run=$3 parser=$4
  shift 4
  local raw="$T/raw/$scenario.$target.$run.txt"
  local rc=0
  timeout $((DURATION + 30)) "$@" >"$raw" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    log "warning: $scenario/$target run $run failed (exit $rc); output in $raw"
    FAILED_RUNS=$((FAILED_RUNS + 1))
  fi
  local src=$raw
  [ "$parser" = h2log ] && src="$raw.log"
  $HELPER parse "$parser" "$src" | while IFS=$'\t' read -r metric value; do
    printf '%s\t%s\t%s\t%s\t%s\n' "$scenario" "$target" "$run" "$metric" "$value" >>"$RESULTS"
  done
}

# The processes of proxy $1 (nginx: master and workers).
proxy_pids() {
  case $1 in
  nginx) echo "$NGX_PID" && pgrep -P "$NGX_PID" || true ;;
  haproxy) echo "$HA_PID" ;;
  flotilla) echo "$FL_PID" ;;
  esac
}

# CPU time (user + system, in clock ticks) used so far by proxy $1's processes.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
  local total=0 pid
  for pid in $(proxy_pids "$1"); do
    [ -r "/proc/$pid/stat" ] || continue
    # Fields after the `(comm)` one: utime and stime are the 12th and 13th.
    total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}

# measure, plus the CPU time the proxy used and the wall time, for CPU per request.
measure_cpu() { # same arguments as measure
  local scenario=$1 target=$2 run=$3 c0 w0
  c0=$(cpu_ticks "$target")
  w0=$(date +%s%N)
  measure "$@"
  [ "$target" = direct ] && return 0
  printf '%s\t%s\t%s\t%s\t%s\n' "$scenario" "$target" "$run" cpu_s \
    "$(awk -v a="$c0" -v b="$(cpu_ticks "$target")" -v hz="$CLK_TCK" 'BEGIN { print (b - a) / hz }')" >>"$RESULTS"
  printf '%s\t%s\t%s\t%s\t%s\n' "$scenario" "$target" "$run" wall_s \
    "$(awk -v a="$w0" -v b="$(date +%s%N)" 'BEGIN { print (b - a) / 1e9 }')" >>"$RESULTS"
}

# The targets in run $1's order (rotated), skipping those without a URL for protocol $2.
order() {
  local run=$1 proto=$2 n=${#TARGETS[@]} i t
  for ((i = 0; i < n; i++)); do
    t=${TARGETS[$(((i + run) % n))]}
    [ -n "${URL[$proto.$t]:-}" ] && printf '%s\n' "$t"
  done
  return 0
}

insecure() { case $1 in https:*) printf -- '--insecure' ;; esac; }

# Closed loop: wrk, CONNS connections, 2 threads (one per core).
run_max() { # proto
  local proto=$1 run t
  for ((run = 1; run <= RUNS; run++)); do
    for t in $(order "$run" "$proto"); do
      measure_cpu "$proto.max" "$t" "$run" wrk wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "${URL[$proto.$t]}"
    done
  done
}

# One connection, one request at a time: oha (or wrk if oha is missing).
run_c1() { # proto
  local proto=$1 run t url
  for ((run = 1; run <= RUNS; run++)); do
    for t in $(order "$run" "$proto"); do
      url=${URL[$proto.$t]}
      if [ -n "$OHA" ]; then
        # shellcheck disable=SC2046
        measure "$proto.c1" "$t" "$run" oha "$OHA" --no-tui --output-format json -z "${DURATION}s" -c 1 $(insecure "$url") "$url"
      else
        measure "$proto.c1" "$t" "$run" wrk wrk -t1 -c1 -d"${DURATION}s" --latency "$url"
      fi
    done
  done
}

# Open loop at fixed rates (a share of nginx's median max from run_max), CONNS connections:
# oha -q with --latency-correction measures each request from when it was due, so a stall
# counts against every request it delays (no coordinated omission).
run_rates() { # proto
  local proto=$1 run t url pct rate max
  max=$($HELPER median "$RESULTS" "$proto.max" nginx rps)
  [ -n "$max" ] || { log "warning: no nginx max for $proto; fixed-rate runs skipped"; return 0; }
  for pct in $RATES; do
    rate=$((max * pct / 100))
    log "$proto: fixed rate $pct % of nginx's $max req/s = $rate req/s"
    for ((run = 1; run <= RUNS; run++)); do
      for t in $(order "$run" "$proto"); do
        url=${URL[$proto.$t]}
        printf '%s\t%s\t%s\t%s\t%s\n' "$proto.rate$pct" "$t" "$run" target_rps "$rate" >>"$RESULTS"
        if [ -n "$OHA" ]; then
          # shellcheck disable=SC2046
          measure "$proto.rate$pct" "$t" "$run" oha "$OHA" --no-tui --output-format json -z "${DURATION}s" \
            -c "$CONNS" -q "$rate" --latency-correction $(insecure "$url") "$url"
        else
          measure "$proto.rate$pct" "$t" "$run" h2log h2load --h1 -c "$CONNS" -t 2 \
            --rps $(((rate + CONNS - 1) / CONNS)) -D "$DURATION" --log-file "$T/raw/$proto.rate$pct.$t.$run.txt.log" "$url"
        fi
      done
    done
  done
}

# HTTP/2 with h2load: CONNS connections × H2_STREAMS streams, 2 threads.
run_h2() { # proto: h2c | h2tls
  local proto=$1 run t
  for ((run = 1; run <= RUNS; run++)); do
    for t in $(order "$run" "$proto"); do
      measure_cpu "$proto.max" "$t" "$run" h2load h2load -c "$CONNS" -m "$H2_STREAMS" -t 2 \
        --warm-up-time=1 -D "$DURATION" "${URL[$proto.$t]}"
    done
  done
}

warm_up() { # proto: 1 s of load on every target (connection pools, caches, page faults)
  local t
  for t in $(order 0 "$1"); do
    timeout 20 wrk -t2 -c"$CONNS" -d1s "${URL[$1.$t]}" >/dev/null 2>&1 || true
  done
}

# HTTP/1.1 scenarios (h1, tls): the measures MEASURES asks for.
run_http1() { # proto
  warm_up "$1"
  if wants max; then run_max "$1"; fi
  if wants c1; then run_c1 "$1"; fi
  if wants rates; then run_rates "$1"; fi
}

started=$(date +%s)
log "DURATION=${DURATION}s RUNS=$RUNS CONNS=$CONNS WORKERS=$WORKERS SCENARIOS='$SCENARIOS' MEASURES='$MEASURES' oha=${OHA:-none}"
if has h1; then
  log "HTTP/1.1 cleartext"
  run_http1 h1
fi
if has tls; then
  log "HTTP/1.1 over TLS 1.3"
  [ "$FLOTILLA_TLS" = 1 ] || log "TLS: flotilla skipped (no gateway TLS in this build)"
  run_http1 tls
fi
if has h2; then
  log "HTTP/2 (h2load)"
  run_h2 h2c
  run_h2 h2tls
fi
log "measured in $(($(date +%s) - started)) s"

# ---------------------------------------------------------------------------------------------
# 8. Report.

echo
echo "## Gateway benchmark — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, DURATION=${DURATION}s, RUNS=$RUNS"
echo
echo "flotilla $("$FLOTILLA" version 2>/dev/null | head -1 | awk '{print $2}') · $(nginx -v 2>&1 | sed 's/.*: //') · $(haproxy -v | head -1 | awk '{print "HAProxy", $3}') · backend nginx ($BACKEND_WORKERS worker) · $WORKERS workers per proxy · $CONNS connections"
echo
$HELPER report "$RESULTS"
