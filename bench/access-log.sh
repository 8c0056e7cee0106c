#!/usr/bin/env bash
# Access-log cost: requests per second through Sluice with the access log off, on as JSON lines, and
# on with a format string (both to a file), next to nginx with its access log off and on (buffered, as
# Sluice writes it), all in the same run, interleaved, proxying plain HTTP/1.1 keep-alive to one
# shared upstream.
#
#   bench/access-log.sh [rounds]   (default 3 rounds; about 1 minute per round)
#
# Reports medians of the rounds and each logging setup's ratio to the same proxy with logging off.
# Loopback only; every run is bounded in time (h2load -D 10).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}

source bench/lib.sh

# The access logs get their own directory: Sluice watches the directory of its config.
mkdir -p "$work/logs"
upstream=18411 nginx_off=18412 nginx_on=18413 sluice_off=18414 sluice_json=18415 sluice_format=18416
start_upstream $upstream
nginx_server() { # PORT ACCESS-LOG-DIRECTIVE
  echo "  server { listen 127.0.0.1:$1; keepalive_requests 1000000; $2
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
}
start_nginx nginx "  upstream app { server 127.0.0.1:$upstream; keepalive 64; }
$(nginx_server $nginx_off 'access_log off;')
$(nginx_server $nginx_on "access_log $work/logs/nginx-access.log combined buffer=64k flush=1s;")"

# sluice_config PORT ADMIN-PORT ACCESS-LOG-YAML
sluice_config() {
  sluice_gateway "$1" "$2" "$3"
  cat <<EOF
  - port: {number: $1, name: http, protocol: HTTP}
    hosts: ["*"]
EOF
  sluice_app_routes $upstream
}
sluice_config $sluice_off 18424 "" > "$work/off.yaml"
sluice_config $sluice_json 18425 "  accessLog: {path: $work/logs/sluice-json.log}" > "$work/json.yaml"
sluice_config $sluice_format 18426 "  accessLog:
    path: $work/logs/sluice-format.log
    format: '%START_TIME% %CLIENT_ADDRESS% \"%METHOD% %PATH% %PROTOCOL%\" %STATUS% %RESPONSE_FLAGS% %DURATION%ms'" \
  > "$work/format.yaml"
for setup in off json format; do
  port_var=sluice_$setup
  start_sluice "sluice-$setup" "$work/$setup.yaml" "http://127.0.0.1:${!port_var}/"
done

declare -A results
setups=(nginx_off nginx_on sluice_off sluice_json sluice_format)
for round in $(seq "$rounds"); do
  for setup in "${setups[@]}"; do
    results[$setup]+="$(requests "http://127.0.0.1:${!setup}/" --h1) "
  done
  echo "round $round/$rounds done" >&2
done

printf '\n%-36s %12s %14s\n' "req/s, HTTP/1.1 (median of $rounds)" "req/s" "vs log off"
for setup in "${setups[@]}"; do
  value=$(echo "${results[$setup]}" | median)
  off=$(echo "${results[${setup%%_*}_off]}" | median)
  printf '%-36s %12.0f %14s\n' "$setup" "$value" "$(ratio "$value" "$off")"
done
dropped=$(curl -s http://127.0.0.1:18425/metrics | awk '/^sluice_access_log_dropped_total/ { print $2 }')
echo
echo "JSON log: $(wc -l < "$work/logs/sluice-json.log") lines, ${dropped:-?} dropped (sluice_access_log_dropped_total)"
echo "machine: $(nproc) cores, $(uname -r); nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'); pinned: ${load:-no}"
