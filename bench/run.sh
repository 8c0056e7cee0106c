#!/usr/bin/env bash
# Sluice next to nginx, HAProxy, Caddy and a bare Pingora proxy on this machine: the same upstream,
# equivalent configs (written below), one worker each, driven in turn with the same load, rounds
# interleaved (A B C D…, then …D C B A). Loopback only; every step is bounded in time.
#
#   bench/run.sh [scenario] [rounds]    rounds: default 5, each run 5 s of load (gate: 3 s)
#
# Scenarios (all = every one but gate):
#   plain     (a) HTTP/1.1 keep-alive, 64 connections, 2-byte answers; and direct to the upstream
#   tls       (b) the same over TLS 1.3, HTTP/1.1 and HTTP/2
#   handshake (c) a new TLS connection per request (openssl s_time -new): CPU per handshake
#   hosts     (d) 10,000 hosts × 10 routes loaded, requests spread over all of them (wrk + Lua),
#             against the same wrk load on the one-route config: the cost of route lookup
#   split     (e) a 90/10 weighted route over 100,000 requests (Sluice, from its own metrics; nginx's
#             split_clients and HAProxy's server weights, from the upstreams' request counts)
#   idle      (f) memory per idle keep-alive connection (8,000 held open after one request each,
#             then 1,000 over TLS) and Sluice's RSS at idle with the built-in demo config
#   rate      (g) latency at one fixed request rate for every proxy (h2load --rps, connections
#             started 1 ms apart): p50/p99/p99.9 added over direct to the upstream; also over TLS
#   reload    the 10,000-host config edited under load: time from the file write to the new route
#             answering, and failed requests during the reloads
#   gate      CI's check: a short (a) with nginx, bare Pingora (both allocators) and Sluice; fails
#             when Sluice's CPU per request leaves the bounds below
#
# Primary figure: proxy CPU µs per request = Δ(utime+stime of the proxy's processes, /proc) ÷
# requests served, for every proxy in the same run (absolute requests/s swing several-fold on a
# shared machine; CPU per request does not). With 2+ cores the load generator runs on core 0,
# upstream and proxies on core 1 (`taskset`), so the load generator never competes with what it
# measures. "bare Pingora" (pingora) is gateway/sluice/examples/bare_pingora.rs: Pingora's proxy with
# no filters, the floor Sluice builds on; pingora-mi is the same on mimalloc, Sluice's allocator.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-all}
case $scenario in
  all|plain|tls|handshake|hosts|split|idle|rate|reload|gate) rounds=${2:-5};;
  *) echo "unknown scenario: $scenario" >&2; sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2;;
esac
seconds=5
# The gate's bounds, as ratios of Sluice's CPU per request (same run). The issue's target is
# ≤ 1.2× nginx; BENCHMARKS.md explains why Pingora's own proxy path cannot meet it on this machine,
# so CI holds what Sluice itself controls (its cost over bare Pingora on the same allocator) and a
# ceiling against nginx.
gate_vs_pingora=${GATE_VS_PINGORA:-1.35}
gate_vs_nginx=${GATE_VS_NGINX:-3.5}
# The fixed rate for scenario (g): well below the saturation of Caddy, the slowest peer (~13,000/s here).
rate=${RATE:-5000}
# HAProxy sizes its connection table from the descriptor limit; the idle-connection scenarios need many.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

bench_packages="haproxy caddy wrk"
source bench/lib.sh
# The packaged services are not what is measured.
systemctl stop caddy haproxy nginx 2>/dev/null || true

want() { [[ $scenario == "$1" || ($scenario == all && $1 != gate) ]]; }
if want gate; then seconds=3; fi

upstream=18501 admin=18502 stable=18504 canary=18503 split=18515 hosts_admin=18506
declare -A plain=([nginx]=18511 [haproxy]=18512 [caddy]=18513 [sluice]=18514 [pingora]=18516 [pingora-mi]=18517)
declare -A tls=([nginx]=18521 [haproxy]=18522 [caddy]=18523 [sluice]=18524)
declare -A splits=([nginx]=18531 [haproxy]=18532 [sluice]=$split)
declare -A many=([nginx]=18541 [haproxy]=18542 [sluice]=18544)
if want gate; then proxies=(nginx pingora pingora-mi sluice); else proxies=(nginx haproxy caddy pingora pingora-mi sluice); fi
has() { local p; for p in "${proxies[@]}"; do [[ $p == "$1" ]] && return 0; done; return 1; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench.test \
  -addext subjectAltName=DNS:bench.test -keyout "$work/bench.key" -out "$work/bench.crt" 2>/dev/null
cat "$work/bench.crt" "$work/bench.key" > "$work/bench.pem"

for port in $upstream $admin $stable $canary $hosts_admin "${plain[@]}" "${tls[@]}" "${splits[@]}" "${many[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use (a proxy left from an earlier run?): stop it first" >&2; exit 1
  fi
done
# The upstream every proxy shares, without a log: logging would be part of every round trip. The
# weighted splits have their own two versions, stable and canary, each counting its requests in a
# buffered access log.
upstream_block() { # PORT ACCESS-LOG-DIRECTIVE
  echo "  log_format bench \$status;
  $2
  server { listen 127.0.0.1:$1; keepalive_requests 1000000; location / { return 200 \"ok\"; } }"
}
start_nginx upstream "$(upstream_block $upstream "access_log off;")"
start_nginx stable "$(upstream_block $stable "access_log $work/stable.log bench buffer=64k flush=1s;")"
start_nginx canary "$(upstream_block $canary "access_log $work/canary.log bench buffer=64k flush=1s;")"

# Every scenario's nginx in one process: the plain and TLS ports, the 90/10 split, the 10,000 hosts.
nginx_hosts=""
if want hosts; then
  nginx_hosts=$(awk -v port="${many[nginx]}" -v hosts=10000 -v routes=10 'BEGIN {
    print "  server_names_hash_max_size 32768; server_names_hash_bucket_size 128;"
    for (h = 0; h < hosts; h++) {
      printf "  server { listen 127.0.0.1:%d; server_name h%d.bench.test;", port, h
      for (r = 0; r < routes; r++) printf " location /r%d/ { proxy_pass http://app; }", r
      print " }"
    } }')
fi
start_nginx nginx "  access_log off;
  upstream app { server 127.0.0.1:$upstream; keepalive 64; }
  upstream app_v1 { server 127.0.0.1:$stable; keepalive 64; }
  upstream app_v2 { server 127.0.0.1:$canary; keepalive 64; }
  split_clients \"\$request_id\" \$version { 90% app_v1; * app_v2; }
  proxy_http_version 1.1;
  proxy_set_header Connection \"\";
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:${plain[nginx]};
    listen 127.0.0.1:${tls[nginx]} ssl http2;
    ssl_certificate $work/bench.crt;
    ssl_certificate_key $work/bench.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://app; }
  }
  server { listen 127.0.0.1:${splits[nginx]}; location / { proxy_pass http://\$version; } }
$nginx_hosts"

if has haproxy; then
  # The 10,000 hosts × 10 routes as HAProxy users write them: one map from host + path prefix to a
  # backend (map_beg looks prefixes up in a tree). No default backend, so a miss answers 503.
  if want hosts; then
    awk -v hosts=10000 -v routes=10 'BEGIN {
      for (h = 0; h < hosts; h++) for (r = 0; r < routes; r++) printf "h%d.bench.test/r%d/ app\n", h, r }' > "$work/hosts.map"
  fi
  cat > "$work/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $(( ($(ulimit -n) - 100) / 2 ))
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend plain
  bind 127.0.0.1:${plain[haproxy]}
  default_backend app
frontend tls
  bind 127.0.0.1:${tls[haproxy]} ssl crt $work/bench.pem alpn h2,http/1.1
  default_backend app
frontend split
  bind 127.0.0.1:${splits[haproxy]}
  default_backend split
$(want hosts && echo "frontend many
  bind 127.0.0.1:${many[haproxy]}
  use_backend %[base,map_beg($work/hosts.map)]")
backend app
  server app 127.0.0.1:$upstream
backend split
  balance random
  server v1 127.0.0.1:$stable weight 90
  server v2 127.0.0.1:$canary weight 10
EOF
  $serve haproxy -f "$work/haproxy.cfg" -D -p "$work/haproxy.pid"
  # HAProxy daemonizes, out of reach of the job cleanup: a leftover one would share the port
  # (SO_REUSEPORT) with the next run's and take part of its load.
  trap 'kill $(cat "$work/haproxy.pid" 2>/dev/null) 2>/dev/null; cleanup' EXIT
fi

if has caddy; then
  cat > "$work/Caddyfile" <<EOF
{
  admin off
  auto_https off
  default_sni bench.test
  log {
    output discard
  }
}
http://:${plain[caddy]} {
  bind 127.0.0.1
  reverse_proxy 127.0.0.1:$upstream
}
https://:${tls[caddy]} {
  bind 127.0.0.1
  tls $work/bench.crt $work/bench.key
  reverse_proxy 127.0.0.1:$upstream
}
EOF
  GOMAXPROCS=1 XDG_DATA_HOME="$work/caddy" XDG_CONFIG_HOME="$work/caddy" \
    $serve caddy run --config "$work/Caddyfile" --adapter caddyfile >"$work/caddy.log" 2>&1 &
  caddy_pid=$!
fi

for proxy in pingora pingora-mi; do start_pingora $proxy "${plain[$proxy]}" $upstream; done

{ sluice_gateway sluice $admin; cat <<EOF
  - port: {number: ${plain[sluice]}, name: http, protocol: HTTP}
    hosts: ["*"]
  - port: {number: ${tls[sluice]}, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, serverCertificate: $work/bench.crt, privateKey: $work/bench.key}
EOF
} > "$work/sluice.yaml"
sluice_app_routes $upstream >> "$work/sluice.yaml"
# The 90/10 split: its own port and Gateway, two subsets of one service.
cat >> "$work/sluice.yaml" <<EOF
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: split}
spec:
  servers:
  - port: {number: $split, name: http-split, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.bench]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints:
  - {address: 127.0.0.1, ports: {http: $stable}, labels: {version: v1}}
  - {address: 127.0.0.1, ports: {http: $canary}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews.bench
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: split}
spec:
  hosts: ["*"]
  gateways: [split]
  http:
  - route:
    - {destination: {host: reviews.bench, subset: v1}, weight: 90}
    - {destination: {host: reviews.bench, subset: v2}, weight: 10}
EOF
start_sluice sluice "$work/sluice.yaml" "http://127.0.0.1:${plain[sluice]}/"

# The 10,000-host Sluice (scenarios hosts and reload): a directory of files, as a large installation
# keeps it; one of them is the one edited under load.
if want hosts || want reload; then
  mkdir -p "$work/many"
  { sluice_gateway many $hosts_admin; cat <<EOF
  - port: {number: ${many[sluice]}, name: http, protocol: HTTP}
    hosts: ["*"]
EOF
  } > "$work/many/gateway.yaml"
  sluice_app_service $upstream >> "$work/many/gateway.yaml"
  sluice_many_hosts "$work/many" 10000 10
  RUST_LOG=warn,sluice::reload=info $serve target/release/sluice run --config "$work/many" 2>"$work/many.log" &
  many_pid=$!
  for try in $(seq 300); do
    curl -s -o /dev/null -H "Host: h1.bench.test" "http://127.0.0.1:${many[sluice]}/r1/" && break
    ((try == 300)) && { echo "the 10,000-host Sluice did not start:" >&2; cat "$work/many.log" >&2; exit 1; }
    sleep 0.1
  done
fi

for proxy in nginx haproxy caddy; do
  has "$proxy" || continue
  for try in $(seq 51); do
    curl -sf -o /dev/null "http://127.0.0.1:${plain[$proxy]}/" && curl -skf -o /dev/null "https://127.0.0.1:${tls[$proxy]}/" && break
    ((try == 51)) && { echo "$proxy did not start (see $work)" >&2; cat "$work"/*.log "$work"/nginx/logs/error.log >&2 2>/dev/null; exit 1; }
    sleep 0.1
  done
done

# pids PROXY: the processes whose CPU counts for PROXY (nginx: master and worker).
nginx_pids() { local master; master=$(cat "$work/$1/nginx.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')"; }
pids() {
  case $1 in
    nginx) nginx_pids nginx;;
    haproxy) cat "$work/haproxy.pid";;
    caddy) echo "$caddy_pid";;
    pingora|pingora-mi) echo "${pingora_pids[$1]}";;
    sluice) pgrep -f "target/release/sluice run --config $work/sluice.yaml" | head -1;;
    sluice-many) echo "$many_pid";;
    upstream) nginx_pids upstream;;
  esac
}
ticks() { local t=0; for pid in $(pids "$1"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done; echo $t; }
peak_rss_kib() { local m=0; for pid in $(pids "$1"); do v=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status"); ((v > m)) && m=$v; done; echo $m; }
rss_kib() { local t=0; for pid in $(pids "$1"); do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$pid/status"))); done; echo $t; }
hz=$(getconf CLK_TCK)
per_request() { awk -v t="$1" -v hz="$hz" -v n="$2" 'BEGIN { if (n>0) printf "%.2f", t/hz*1e6/n; else print "nan" }'; }

# load URL [h2load options…]: "requests-succeeded requests/s p50 p99 p99.9" (latencies in ms). Runs
# for $seconds unless the options give a request count (-n).
load() {
  local url=$1; shift
  local summary length=(-D "$seconds")
  [[ " $* " == *" -n "* ]] && length=()
  # h2load appends to its log file: each run starts a new one. The log has its own directory: Sluice
  # watches the directory of its config, and a file written on every request there would add the
  # watcher's work to Sluice's CPU (a deployment keeps its config directory for config).
  mkdir -p "$work/load"
  rm -f "$work/load/latency.log"
  summary=$($load h2load "$@" "${length[@]}" --log-file="$work/load/latency.log" "$url" 2>/dev/null | awk '
    /^finished in/ { gsub(/,/, ""); for (i=1;i<=NF;i++) if ($i=="req/s") rps=$(i-1) }
    /^requests:/ { for (i=1;i<=NF;i++) if ($i=="succeeded,") ok=$(i-1) }
    END { print ok+0, rps+0 }')
  echo "$summary $(percentiles "$work/load/latency.log")"
}

declare -A cpu rps p50 p99 p999
# record KEY PROXY CPU-TICKS REQUESTS RATE [P50 P99 P99.9]: one run's figures, kept per round.
record() {
  cpu[$1,$2]+="$(per_request "$3" "$4") "
  rps[$1,$2]+="$5 "
  p50[$1,$2]+="${6:-} "; p99[$1,$2]+="${7:-} "; p999[$1,$2]+="${8:-} "
}

# measure KEY PROXY URL [h2load options…]: one run. A short unmeasured run first, so every proxy is
# measured with warm connection pools.
measure() {
  local key=$1 proxy=$2 url=$3; shift 3
  local before after ok rate a b c
  $load h2load "$@" -D 1 "$url" >/dev/null 2>&1 || true
  before=$(ticks "$proxy")
  read -r ok rate a b c <<<"$(load "$url" "$@")"
  after=$(ticks "$proxy")
  record "$key" "$proxy" $((after - before)) "$ok" "$rate" "$a" "$b" "$c"
}

# handshakes KEY PROXY PORT: CPU µs per full TLS handshake (openssl s_time, new connection each).
handshakes() {
  local key=$1 proxy=$2 port=$3 before after count
  before=$(ticks "$proxy")
  count=$($load openssl s_time -connect "127.0.0.1:$port" -new -time $seconds 2>/dev/null \
    | awk '/connections in .* real seconds/ { print $1; exit }')
  after=$(ticks "$proxy")
  record "$key" "$proxy" $((after - before)) "${count:-0}" "$(awk -v n="${count:-0}" -v s=$seconds 'BEGIN { printf "%.0f", n/s }')"
}

# spread_load KEY PROXY PORT [PROCESS]: wrk with bench/spread.lua (requests over 10,000 hosts × 10 routes); any
# answer other than 2xx fails the run, so a lookup that misses cannot pass for a fast one.
spread_load() {
  local key=$1 proxy=$2 port=$3 process=${4:-$2} before after out ok bad
  HOSTS=10000 ROUTES=10 $load wrk -t1 -c64 -d1s -s bench/spread.lua "http://127.0.0.1:$port" >/dev/null 2>&1 || true
  before=$(ticks "$process")
  out=$(HOSTS=10000 ROUTES=10 $load wrk -t1 -c64 -d${seconds}s -s bench/spread.lua "http://127.0.0.1:$port" 2>&1)
  after=$(ticks "$process")
  ok=$(echo "$out" | awk '/requests in/ { print $1 }')
  bad=$(echo "$out" | awk '/Non-2xx/ { print $NF }')
  if [[ -n $bad ]]; then echo "$proxy on port $port answered $bad requests with non-2xx:" >&2; echo "$out" >&2; exit 1; fi
  record "$key" "$proxy" $((after - before)) "${ok:-0}" "$(awk -v n="${ok:-0}" -v s=$seconds 'BEGIN { printf "%.0f", n/s }')"
}

# at_rate KEY PROXY URL: h2load at $rate requests/s over 64 connections; latency percentiles only. The
# connections start 1 ms apart: h2load paces each connection by its own timer, and 64 timers started
# together send 64 requests at once, so the latency measured would be the wait behind that burst.
at_rate() {
  local key=$1 proxy=$2 url=$3 ok r a b c
  $load h2load --h1 -c 64 -m 1 -D 1 "$url" >/dev/null 2>&1 || true
  read -r ok r a b c <<<"$(load "$url" --h1 -c 64 -m 1 -r 1 --rate-period=1ms -n $((rate * seconds)) --rps=$(( (rate + 63) / 64 )))"
  record "$key" "$proxy" 0 "$ok" "$r" "$a" "$b" "$c"
}

keys=()
declare -A members
want plain && { keys+=(plain); members[plain]="${proxies[*]}"; }
want gate && { keys+=(plain); members[plain]="${proxies[*]}"; }
want tls && { keys+=(tls-h1 tls-h2); members[tls-h1]="nginx haproxy caddy sluice"; members[tls-h2]=${members[tls-h1]}; }
want handshake && { keys+=(handshake); members[handshake]="nginx haproxy caddy sluice"; }
# Caddy is not in (d): each of its reverse_proxy handlers has its own upstream connection pool, so
# 100,000 routes would measure 100,000 pools opening connections, not route lookup.
hosts_proxies=(); for proxy in nginx haproxy sluice; do has $proxy && hosts_proxies+=($proxy); done
want hosts && { keys+=(hosts-1 hosts-10k); members[hosts-1]="${hosts_proxies[*]}"; members[hosts-10k]="${hosts_proxies[*]}"; }

# Memory per idle keep-alive connection: RSS (all the proxy's processes) with IDLE connections open,
# each having served one request, minus RSS before, divided by IDLE. Once per proxy (RSS does not
# need rounds): plain HTTP/1.1, then, with those still open, IDLE_TLS TLS 1.3 (HTTP/1.1) connections
# where the proxy has a TLS port (fewer: HAProxy's maxconn follows the descriptor limit, 20,000 here).
idle=8000 idle_tls=1000
declare -A per_connection per_tls_connection
if want idle; then
  for proxy in "${proxies[@]}"; do
    before=$(rss_kib "$proxy")
    coproc holder { $load python3 bench/idle.py $idle "${plain[$proxy]}" ${tls[$proxy]:+$idle_tls ${tls[$proxy]}}; }
    read -r -t 120 ready count <&"${holder[0]}" || { echo "$proxy: idle connections not ready" >&2; exit 1; }
    after=$(rss_kib "$proxy")
    per_connection[$proxy]=$(awk -v a="$after" -v b="$before" -v n="$count" 'BEGIN { printf "%.1f", (a-b)/n }')
    if [[ -n ${tls[$proxy]:-} ]]; then
      echo >&"${holder[1]}"
      read -r -t 120 ready count <&"${holder[0]}" || { echo "$proxy: idle TLS connections not ready" >&2; exit 1; }
      with_tls=$(rss_kib "$proxy")
      per_tls_connection[$proxy]=$(awk -v a="$with_tls" -v b="$after" -v n="$count" 'BEGIN { printf "%.1f", (a-b)/n }')
    fi
    exec {holder[1]}>&-
    wait "$holder_PID" 2>/dev/null || true
    echo "idle: $proxy done" >&2
  done
  # The built-in demo, idle: what a fresh appliance costs.
  demo_dir=$(mktemp -d -p "$work")
  (cd "$demo_dir" && RUST_LOG=warn exec "$OLDPWD/target/release/sluice" demo --port 18509 >/dev/null 2>&1) &
  demo_pid=$!
  sleep 3
  demo_rss=$(awk '/VmRSS/ {print $2}' "/proc/$demo_pid/status" 2>/dev/null || echo 0)
  kill "$demo_pid" 2>/dev/null || true
fi

for round in $(seq "$rounds"); do
  order=("${proxies[@]}")
  ((round % 2 == 0)) && order=($(printf '%s\n' "${proxies[@]}" | tac))
  for proxy in "${order[@]}"; do
    if want plain || want gate; then measure plain "$proxy" "http://127.0.0.1:${plain[$proxy]}/" --h1 -c 64 -m 1; fi
    want rate && at_rate rate "$proxy" "http://127.0.0.1:${plain[$proxy]}/"
    [[ -n ${tls[$proxy]:-} ]] || continue
    want rate && at_rate rate-tls "$proxy" "https://127.0.0.1:${tls[$proxy]}/"
    want tls && measure tls-h1 "$proxy" "https://127.0.0.1:${tls[$proxy]}/" --h1 -c 64 -m 1
    want tls && measure tls-h2 "$proxy" "https://127.0.0.1:${tls[$proxy]}/" -c 64 -m 1
    want handshake && handshakes handshake "$proxy" "${tls[$proxy]}"
  done
  want rate && at_rate rate direct "http://127.0.0.1:$upstream/"
  if want plain; then read -r _ r _ <<<"$(load "http://127.0.0.1:$upstream/" --h1 -c 64 -m 1)"; rps[plain,direct]+="$r "; fi
  if want hosts; then
    # The same wrk load on both configs of each proxy: one host with one catch-all route (hosts-1),
    # and 10,000 hosts × 10 routes (hosts-10k).
    hosts_order=("${hosts_proxies[@]}"); ((round % 2 == 0)) && hosts_order=($(printf '%s\n' "${hosts_proxies[@]}" | tac))
    for proxy in "${hosts_order[@]}"; do
      spread_load hosts-1 "$proxy" "${plain[$proxy]}"
      spread_load hosts-10k "$proxy" "${many[$proxy]}" "$( [[ $proxy == sluice ]] && echo sluice-many || echo "$proxy")"
    done
  fi
  echo "round $round/$rounds done" >&2
done

spread() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END { printf "%s–%s", a[1], a[NR] }'; }
column_median() { local -n table=$1; echo "${table[$2,$3]:-}" | median; }
echo
if ((${#keys[@]})); then
  printf '%-10s %-10s %11s %10s %14s %9s %21s %9s\n' scenario proxy "CPU µs/req" "÷ Sluice" "min–max" "req/s" "p50/p99/p99.9 ms" "peak MiB"
  for key in "${keys[@]}"; do
    s=$(column_median cpu "$key" sluice)
    for proxy in ${members[$key]}; do
      process=$proxy
      [[ $key == hosts-10k && $proxy == sluice ]] && process=sluice-many
      c=$(column_median cpu "$key" "$proxy")
      latency="-"
      [[ -n ${p50[$key,$proxy]// /} ]] && latency="$(column_median p50 "$key" "$proxy")/$(column_median p99 "$key" "$proxy")/$(column_median p999 "$key" "$proxy")"
      printf '%-10s %-10s %11.1f %10s %14s %9.0f %21s %9.1f\n' "$key" "$proxy" "$c" "$(ratio "$c" "$s")" \
        "$(echo "${cpu[$key,$proxy]}" | spread)" "$(column_median rps "$key" "$proxy")" "$latency" \
        "$(awk -v k="$(peak_rss_kib "$process")" 'BEGIN { print k/1024 }')"
    done
    [[ $key == plain && -n ${rps[plain,direct]:-} ]] && printf '%-10s %-10s %11s %10s %14s %9.0f\n' plain direct - - - "$(echo "${rps[plain,direct]}" | median)"
  done
fi
if want hosts; then
  echo
  for proxy in "${hosts_proxies[@]}"; do
    a=$(column_median cpu hosts-1 "$proxy"); d=$(column_median cpu hosts-10k "$proxy")
    echo "hosts      $proxy: CPU per request with 10,000 hosts × 10 routes ÷ with one route: $(ratio "$d" "$a") (target for Sluice ≤ 1.10)"
  done
fi
if want rate; then
  echo
  echo "rate       $rate requests/s, 64 connections (rate-tls: HTTP/1.1 over TLS 1.3; a handshake is not"
  echo "           part of a request's latency); ms; added = proxy − direct (plain HTTP to the upstream)"
  d50=$(column_median p50 rate direct); d99=$(column_median p99 rate direct); d999=$(column_median p999 rate direct)
  printf '%-10s %-10s %8s %8s %8s %12s %12s\n' scenario proxy p50 p99 p99.9 "added p50" "added p99"
  for key in rate rate-tls; do
    for proxy in direct "${proxies[@]}"; do
      [[ -n ${p50[$key,$proxy]:-} ]] || continue
      a=$(column_median p50 "$key" "$proxy"); b=$(column_median p99 "$key" "$proxy"); c=$(column_median p999 "$key" "$proxy")
      printf '%-10s %-10s %8.2f %8.2f %8.2f %12s %12s\n' "$key" "$proxy" "$a" "$b" "$c" \
        "$(awk -v x="$a" -v y="$d50" 'BEGIN { printf "%.2f", x-y }')" "$(awk -v x="$b" -v y="$d99" 'BEGIN { printf "%.2f", x-y }')"
    done
  done
fi
if want split; then
  # 100,000 requests through each proxy's 90/10 split. Sluice's shares come from its own metrics;
  # nginx's and HAProxy's from the two versions' access logs (flushed before counting).
  count_log() { nginx -p "$work/$1" -c nginx.conf -s reopen 2>/dev/null; sleep 1.2; wc -l < "$work/$1.log" 2>/dev/null || echo 0; }
  echo
  for proxy in sluice nginx haproxy; do
    $load h2load --h1 -c 64 -m 1 -D 1 "http://127.0.0.1:${splits[$proxy]}/" >/dev/null 2>&1 || true
    before=$(curl -s "http://127.0.0.1:$admin/metrics"); v1_before=$(count_log stable); v2_before=$(count_log canary)
    t0=$(ticks "$proxy")
    served=$($load h2load --h1 -c 64 -m 1 -n 100000 "http://127.0.0.1:${splits[$proxy]}/" 2>/dev/null \
      | awk '/^requests:/ { for (i=1;i<=NF;i++) if ($i=="succeeded,") print $(i-1) }')
    t1=$(ticks "$proxy")
    sleep 0.5 # metrics are recorded after each response is sent
    if [[ $proxy == sluice ]]; then
      after=$(curl -s "http://127.0.0.1:$admin/metrics")
      count() { echo "$1" | awk -v v="destination_version=\"$2\"" 'index($0, "istio_requests_total{") == 1 && index($0, v) { n += $NF } END { print n+0 }'; }
      v1=$(( $(count "$after" v1) - $(count "$before" v1) )); v2=$(( $(count "$after" v2) - $(count "$before" v2) ))
    else
      v1=$(( $(count_log stable) - v1_before )); v2=$(( $(count_log canary) - v2_before ))
    fi
    awk -v p="$proxy" -v a="$v1" -v b="$v2" -v c="$(per_request $((t1 - t0)) "${served:-0}")" 'BEGIN {
      printf "split      %-8s 90/10 over %d requests: v1 %.2f%%, v2 %.2f%%; CPU %.1f µs/req\n", p, a+b, 100*a/(a+b), 100*b/(a+b), c }'
  done
  echo "           target for Sluice: v1 90 ± 1 %"
fi
if want idle; then
  echo
  printf '%-10s %-10s %20s %12s\n' scenario proxy "KiB per idle conn" "over TLS"
  for proxy in "${proxies[@]}"; do printf '%-10s %-10s %20s %12s\n' idle "$proxy" "${per_connection[$proxy]}" "${per_tls_connection[$proxy]:--}"; done
  echo "idle       sluice demo (built-in config), RSS at idle: $(awk -v k="$demo_rss" 'BEGIN { printf "%.1f", k/1024 }') MiB (target < 30)"
fi
if want reload; then
  # Edits of the 10,000-host config while wrk keeps 64 connections busy on it, timed from the write
  # to the new host's first 200. Two kinds: a VirtualService for a new host appended to one file
  # (only it is validated and compiled), and a file written with a DestinationRule of the service
  # every host routes to and a VirtualService routing to its new subset (the DestinationRule
  # changed: what looked up the changed subsets is validated again).
  HOSTS=10000 ROUTES=10 $load wrk -t1 -c64 -d$((rounds * 6 + 10))s -s bench/spread.lua \
    "http://127.0.0.1:${many[sluice]}" >"$work/reload-load.txt" 2>&1 &
  wrk_pid=$!
  sleep 2
  # until_served HOST: ms from now until HOST answers 200 (5,000 tries at most).
  until_served() {
    local t0; t0=$(date +%s%N)
    for _ in $(seq 5000); do
      [[ $(curl -s -o /dev/null -w '%{http_code}' -H "Host: $1" "http://127.0.0.1:${many[sluice]}/") == 200 ]] && break
      sleep 0.002
    done
    echo $(( ($(date +%s%N) - t0) / 1000000 ))
  }
  times=() rule_times=()
  for edit in $(seq "$rounds"); do
    cat >> "$work/many/hosts-3.yaml" <<EOF
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: added-$edit}
spec: {hosts: [added-$edit.bench.test], gateways: [gw], http: [{route: [{destination: {host: app.bench}}]}]}
EOF
    times+=("$(until_served "added-$edit.bench.test")")
    sleep 2
    cat > "$work/many/release.yaml.tmp" <<EOF
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app}
spec: {host: app.bench, subsets: [{name: r$edit}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: release}
spec: {hosts: [release-$edit.bench.test], gateways: [gw], http: [{route: [{destination: {host: app.bench, subset: r$edit}}]}]}
EOF
    # Renamed into place, as editors and config management write files.
    mv "$work/many/release.yaml.tmp" "$work/many/release.yaml"
    rule_times+=("$(until_served "release-$edit.bench.test")")
    sleep 2
  done
  wait "$wrk_pid" || true
  echo
  echo "reload     10,000 hosts × 10 routes under load, write → new route serving, ms (target < 250):"
  echo "reload       a VirtualService added: ${times[*]} (median $(echo "${times[*]}" | median))"
  echo "reload       a DestinationRule changed: ${rule_times[*]} (median $(echo "${rule_times[*]}" | median))"
  echo "reload     load during the edits: $(awk '/requests in/ { print $1 " requests" } /Socket errors/ { print "; socket errors: " $0 } /Non-2xx/ { print "; non-2xx: " $NF }' "$work/reload-load.txt" | tr -d '\n')"
  grep -h "reload" "$work/many.log" | tail -$((rounds * 2)) >&2 || true
fi
echo
echo "“÷ Sluice” is the peer's CPU per request ÷ Sluice's: above 1 means Sluice uses less CPU."
echo "handshake: CPU µs per full TLS handshake; req/s column = handshakes/s."
echo "machine: $(nproc) cores, $(uname -r); nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}'), Caddy $(caddy version | awk '{print $1}'); pinned: ${load:-no}; $rounds rounds × $seconds s"
if want gate; then
  s=$(column_median cpu plain sluice); m=$(column_median cpu plain pingora-mi); n=$(column_median cpu plain nginx)
  vs_pingora=$(ratio "$s" "$m"); vs_nginx=$(ratio "$s" "$n")
  echo "gate: Sluice CPU per request = ${vs_pingora}× bare Pingora on mimalloc (bound $gate_vs_pingora), $(ratio "$s" "$(column_median cpu plain pingora)")× stock bare Pingora, ${vs_nginx}× nginx (bound $gate_vs_nginx; the issue's target 1.2× is not met, see BENCHMARKS.md)"
  awk -v a="$vs_pingora" -v b="$gate_vs_pingora" -v c="$vs_nginx" -v d="$gate_vs_nginx" 'BEGIN { exit !(a <= b && c <= d) }' \
    || { echo "gate: FAILED" >&2; exit 1; }
  echo "gate: passed"
fi
