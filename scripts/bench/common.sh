# shellcheck shell=bash
# Helpers shared by the benchmark scripts (sourced, not run).

# A free port on 127.0.0.1 (the kernel picks it; racy in theory, fine on a quiet loopback).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Polls `curl URL` until it answers 200, at most $2 seconds; each try waits at most $3 s (1).
wait_http() {
  local url=$1 limit=$2 per_try=${3:-1} i
  for ((i = 0; i < limit * 10; i++)); do
    [ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time "$per_try" "$url" || true)" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}

# A self-signed ECDSA P-256 certificate for 127.0.0.1 and localhost: $1/cert.pem, $1/key.pem.
make_cert() { # dir
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}
