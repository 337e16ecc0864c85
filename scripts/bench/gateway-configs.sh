# shellcheck shell=bash
# Configuration files for scripts/bench-gateway.sh (sourced, not run). Every function writes into
# the run's temporary directory "$T" and listens on 127.0.0.1 only.
#
# Fairness rules shared by the three proxies:
#   - the same backend (one nginx serving a small fixed body), HTTP/1.1 keep-alive to it;
#   - $WORKERS worker processes/threads each (flotilla: `[gateway] workers`);
#   - no access log; client keep-alive without a request limit; X-Forwarded-For added
#     (flotilla always adds X-Forwarded-For/-Proto/-Host and Forwarded);
#   - TLS 1.3 only, the same ECDSA P-256 certificate.

# The backend: nginx answering `GET /` with a 29-byte body from memory. flotilla runs it as a
# service (see write_flotilla_file); its ports are only known once the instance starts, so the
# service's command fills them into this template (@HTTP@, @H2C@, @TLS@) and execs nginx.
write_backend_template() {
  cat >"$T/backend/nginx.conf.in" <<EOF
user root root;
worker_processes $BACKEND_WORKERS;
pid $T/backend/nginx-@HTTP@.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $T/backend/tmp;
  http2_max_concurrent_streams 1024;
  server {
    listen 127.0.0.1:@HTTP@ backlog=4096;
    listen 127.0.0.1:@H2C@ http2 backlog=4096;
    listen 127.0.0.1:@TLS@ ssl http2 backlog=4096;
    ssl_certificate $T/tls/cert.pem;
    ssl_certificate_key $T/tls/key.pem;
    ssl_protocols TLSv1.3;
    default_type text/plain;
    location / { return 200 "hello from the bench backend\n"; }
  }
}
EOF
}

# nginx as a reverse proxy: upstream keep-alive pool, worker_processes = $WORKERS.
# nginx 1.22 (Debian 12) has no `http2 on;`: HTTP/2 is a flag on `listen` (cleartext h2 with
# prior knowledge on its own port; h2 by ALPN on the TLS port, next to HTTP/1.1).
write_nginx_conf() {
  cat >"$T/nginx/nginx.conf" <<EOF
user root root;
worker_processes $WORKERS;
worker_rlimit_nofile 16384;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path $T/nginx/tmp;
  proxy_temp_path $T/nginx/tmp;
  http2_max_concurrent_streams 1024;
  upstream backend {
    server 127.0.0.1:$B_HTTP;
    keepalive 256;
    keepalive_requests 10000000;
  }
  server {
    listen 127.0.0.1:$NGX_HTTP backlog=4096;
    listen 127.0.0.1:$NGX_H2C http2 backlog=4096;
    listen 127.0.0.1:$NGX_TLS ssl http2 backlog=4096;
    ssl_certificate $T/tls/cert.pem;
    ssl_certificate_key $T/tls/key.pem;
    ssl_protocols TLSv1.3;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
EOF
}

# HAProxy in http mode: keep-alive on both sides, server connections reused (`http-reuse safe`,
# the default), nbthread = $WORKERS. Cleartext h2 with prior knowledge is `proto h2` on its own
# bind; the TLS bind offers h2 and http/1.1 by ALPN. The PEM holds certificate and key.
write_haproxy_conf() {
  cat >"$T/haproxy/haproxy.cfg" <<EOF
global
  nbthread $WORKERS
  maxconn 4096
  ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
  mode http
  option http-keep-alive
  option forwardfor
  http-reuse safe
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 300s
frontend fe
  bind 127.0.0.1:$HA_HTTP
  bind 127.0.0.1:$HA_H2C proto h2
  bind 127.0.0.1:$HA_TLS ssl crt $T/tls/haproxy.pem alpn h2,http/1.1
  default_backend be
backend be
  server backend 127.0.0.1:$B_HTTP
EOF
}

# flotilla: `flotilla up` running the backend as a service (readiness probe on `/`), with a
# catch-all route to it. Its gateway ($WORKERS workers, like the other proxies) listens on
# $FL_HTTP (HTTP/1.1 and prior-knowledge h2) and, when $1 is "tls", on $FL_TLS with the same
# certificate. $1 = "bare" writes no [gateway] table, for builds that predate it.
write_flotilla_file() {
  local with_tls=$1
  {
    cat <<EOF
[up]
api = "127.0.0.1:$FL_API"
gateway = "127.0.0.1:$FL_HTTP"
metrics = "127.0.0.1:$FL_METRICS"
data_dir = "data"

EOF
    if [ "$with_tls" != bare ]; then
      printf '[gateway]\nworkers = %s\n' "$WORKERS"
    fi
    if [ "$with_tls" = tls ]; then
      cat <<EOF
tls_listen = "127.0.0.1:$FL_TLS"

[[gateway.certificates]]
cert = "$T/tls/cert.pem"
key = "$T/tls/key.pem"
default = true

EOF
    fi
    cat <<EOF
[service.backend]
command = "sh"
args = ["-c", "sed -e s/@HTTP@/\${PORT_HTTP}/ -e s/@H2C@/\${PORT_H2C}/ -e s/@TLS@/\${PORT_TLS}/ $T/backend/nginx.conf.in > $T/backend/nginx-\${PORT_HTTP}.conf && exec nginx -e stderr -p $T/backend -c $T/backend/nginx-\${PORT_HTTP}.conf -g 'daemon off;'"]
ports = ["http", "h2c", "tls"]
stop = { grace_period = "3s" }
probes = { readiness = { http = { path = "/" }, period = "1s" } }
routes = [{ path = "/" }]
EOF
  } >"$T/flotilla/flotilla.toml"
}
