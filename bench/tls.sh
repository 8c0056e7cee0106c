#!/usr/bin/env bash
# TLS benchmark: Sluice next to nginx, both terminating the same certificate and proxying to the same
# upstream, measured in the same run, interleaved (nginx, Sluice, nginx, Sluice…).
#
#   bench/tls.sh [rounds]          (default 3 rounds; about 1 minute per round)
#
# Reports per proxy: full TLS handshakes per second (openssl s_time, a new connection each time) and
# HTTPS requests per second over keep-alive (h2load, HTTP/1.1 and HTTP/2), medians of the rounds,
# and Sluice's ratio to nginx. Loopback only; every run is bounded in time. Both proxies get one
# worker; with two or more cores the load generator is pinned to core 0 and the proxies and upstream
# to core 1, so they do not compete with it for CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}

source bench/lib.sh

upstream=18401 nginx_tls=18402 sluice_tls=18403 admin=18404
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench.test \
  -addext subjectAltName=DNS:bench.test -keyout "$work/bench.key" -out "$work/bench.crt" 2>/dev/null

start_upstream $upstream
# The nginx under test: TLS with the same certificate, a keep-alive pool to the upstream.
start_nginx nginx "  access_log off;
  upstream app { server 127.0.0.1:$upstream; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_tls ssl http2;
    ssl_certificate $work/bench.crt;
    ssl_certificate_key $work/bench.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 1000000;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"

{ sluice_gateway sluice $admin; cat <<EOF
  - port: {number: $sluice_tls, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: $work/bench.crt, privateKey: $work/bench.key}
EOF
} > "$work/sluice.yaml"
sluice_app_routes $upstream >> "$work/sluice.yaml"
start_sluice sluice "$work/sluice.yaml" "https://127.0.0.1:$sluice_tls/"

handshakes() { # connections per second over 5 s, a full handshake each
  $load openssl s_time -connect "127.0.0.1:$1" -new -time 5 2>/dev/null \
    | awk '/connections in .* real seconds/ { n=$1; for (i=1;i<=NF;i++) if ($i=="in") t=$(i+1); printf "%.0f", n/t; exit }'
}

declare -A results
for round in $(seq "$rounds"); do
  for proxy in nginx sluice; do
    port=$nginx_tls; [[ $proxy == sluice ]] && port=$sluice_tls
    results[$proxy,hs]+="$(handshakes $port) "
    results[$proxy,h1]+="$(requests "https://127.0.0.1:$port/" --h1) "
    results[$proxy,h2]+="$(requests "https://127.0.0.1:$port/") "
  done
  echo "round $round/$rounds done" >&2
done

printf '\n%-34s %12s %12s %8s\n' "metric (median of $rounds)" nginx sluice ratio
for metric in hs h1 h2; do
  case $metric in hs) label="TLS handshakes/s (new connection)";; h1) label="HTTPS req/s, HTTP/1.1 keep-alive";; h2) label="HTTPS req/s, HTTP/2";; esac
  n=$(echo "${results[nginx,$metric]}" | median); s=$(echo "${results[sluice,$metric]}" | median)
  printf '%-34s %12.0f %12.0f %8s\n' "$label" "$n" "$s" "$(ratio "$s" "$n")"
done
echo
echo "machine: $(nproc) cores, $(uname -r); nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'); pinned: ${load:-no}"
