#!/usr/bin/env bash
# Sluice next to nginx, HAProxy and Caddy on this machine: the same upstream, equivalent configs
# (written below), one worker each, driven in turn with the same load, rounds interleaved
# (A B C D, then D C B A). Loopback only; every step is bounded in time.
#
#   bench/run.sh [scenario] [rounds]     scenario: all (default) | plain | tls | handshake | split | idle
#                                         rounds: default 5, 5 s of load each
#
# Primary figure: proxy CPU µs per request = Δ(utime+stime of the proxy's processes, /proc) ÷
# requests served, for every proxy in the same run (absolute requests/s swing several-fold on a
# shared machine; CPU per request does not). Also requests/s (median), peak RSS, and each proxy's
# ratio to Sluice. With 2+ cores the load generator runs on core 0, upstream and proxies on core 1
# (`taskset`), so the load generator never competes with what it measures.
#
# Scenarios: plain — HTTP/1.1 keep-alive, 64 connections, 2-byte answers (and direct to the upstream:
# the ceiling); tls — the same over TLS 1.3, HTTP/1.1 and HTTP/2; handshake — a new TLS connection
# per request (openssl s_time -new), CPU per handshake; idle — memory per idle keep-alive
# connection (8,000 connections held open by bench/idle.py after one request each); split — a
# 90/10 weighted route (Sluice only: the share each version got, from Sluice's own metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-all}
rounds=${2:-5}
seconds=5
# HAProxy sizes its connection table from the descriptor limit; the idle-connection scenarios need many.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

need_peer=()
for pkg in haproxy caddy; do dpkg -s "$pkg" >/dev/null 2>&1 || need_peer+=("$pkg"); done
if ((${#need_peer[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_peer[@]}" >/dev/null
fi
source bench/lib.sh
# The packaged services are not what is measured.
systemctl stop caddy haproxy nginx 2>/dev/null || true

upstream=18501 admin=18502 canary=18503 split=18515
declare -A plain=([nginx]=18511 [haproxy]=18512 [caddy]=18513 [sluice]=18514)
declare -A tls=([nginx]=18521 [haproxy]=18522 [caddy]=18523 [sluice]=18524)
proxies=(nginx haproxy caddy sluice)

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench.test \
  -addext subjectAltName=DNS:bench.test -keyout "$work/bench.key" -out "$work/bench.crt" 2>/dev/null
cat "$work/bench.crt" "$work/bench.key" > "$work/bench.pem"

for port in $upstream $admin $canary $split "${plain[@]}" "${tls[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is in use (a proxy left from an earlier run?): stop it first" >&2; exit 1
  fi
done
start_upstream $upstream
# The canary version of the upstream, for the weighted split (same answer, another port).
start_nginx canary "  access_log off;
  server { listen 127.0.0.1:$canary; keepalive_requests 1000000; location / { return 200 \"ok\"; } }"

start_nginx nginx "  access_log off;
  upstream app { server 127.0.0.1:$upstream; keepalive 64; }
  server {
    listen 127.0.0.1:${plain[nginx]};
    listen 127.0.0.1:${tls[nginx]} ssl http2;
    ssl_certificate $work/bench.crt;
    ssl_certificate_key $work/bench.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 1000000;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"

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
backend app
  server app 127.0.0.1:$upstream
EOF
$serve haproxy -f "$work/haproxy.cfg" -D -p "$work/haproxy.pid"
# HAProxy daemonizes, out of reach of the job cleanup: a leftover one would share the port
# (SO_REUSEPORT) with the next run's and take part of its load.
trap 'kill $(cat "$work/haproxy.pid" 2>/dev/null) 2>/dev/null; cleanup' EXIT

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
  - {address: 127.0.0.1, ports: {http: $upstream}, labels: {version: v1}}
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

for proxy in nginx haproxy caddy; do
  for try in $(seq 51); do
    curl -sf -o /dev/null "http://127.0.0.1:${plain[$proxy]}/" && curl -skf -o /dev/null "https://127.0.0.1:${tls[$proxy]}/" && break
    ((try == 51)) && { echo "$proxy did not start (see $work)" >&2; cat "$work"/*.log "$work"/nginx/logs/error.log >&2 2>/dev/null; exit 1; }
    sleep 0.1
  done
done

# pids PROXY: the processes whose CPU counts for PROXY (nginx: master and worker).
pids() {
  case $1 in
    nginx) local master; master=$(cat "$work/nginx/nginx.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')";;
    haproxy) cat "$work/haproxy.pid";;
    caddy) echo "$caddy_pid";;
    sluice) pgrep -f "target/release/sluice run --config $work/sluice.yaml" | head -1;;
    upstream) local master; master=$(cat "$work/upstream/nginx.pid"); echo "$master $(pgrep -P "$master" | tr '\n' ' ')";;
  esac
}
ticks() { local t=0; for pid in $(pids "$1"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done; echo $t; }
peak_rss_kib() { local m=0; for pid in $(pids "$1"); do v=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status"); ((v > m)) && m=$v; done; echo $m; }
hz=$(getconf CLK_TCK)

# load URL [h2load options…]: "requests-succeeded requests/s"
load() {
  local url=$1; shift
  $load h2load "$@" -D $seconds "$url" 2>/dev/null | awk '
    /^finished in/ { gsub(/,/, ""); for (i=1;i<=NF;i++) if ($i=="req/s") rps=$(i-1) }
    /^requests:/ { for (i=1;i<=NF;i++) if ($i=="succeeded,") ok=$(i-1) }
    END { print ok+0, rps+0 }'
}

declare -A cpu rps
# measure KEY PROXY URL [h2load options…]: one run, CPU µs per request and req/s recorded under KEY.
# A short unmeasured run first, so every proxy is measured with warm connection pools.
measure() {
  local key=$1 proxy=$2 url=$3; shift 3
  local before after result ok rate
  $load h2load "$@" -D 1 "$url" >/dev/null 2>&1 || true
  before=$(ticks "$proxy")
  result=$(load "$url" "$@")
  after=$(ticks "$proxy")
  read -r ok rate <<<"$result"
  cpu[$key,$proxy]+="$(awk -v t=$((after - before)) -v hz="$hz" -v n="$ok" 'BEGIN { if (n>0) printf "%.2f", t/hz*1e6/n; else print "nan" }') "
  rps[$key,$proxy]+="$rate "
}

# handshakes KEY PROXY PORT: CPU µs per full TLS handshake (openssl s_time, new connection each).
handshakes() {
  local key=$1 proxy=$2 port=$3 before after count
  before=$(ticks "$proxy")
  count=$($load openssl s_time -connect "127.0.0.1:$port" -new -time $seconds 2>/dev/null \
    | awk '/connections in .* real seconds/ { print $1; exit }')
  after=$(ticks "$proxy")
  cpu[$key,$proxy]+="$(awk -v t=$((after - before)) -v hz="$hz" -v n="${count:-0}" 'BEGIN { if (n>0) printf "%.2f", t/hz*1e6/n; else print "nan" }') "
  rps[$key,$proxy]+="$(awk -v n="${count:-0}" -v s=$seconds 'BEGIN { printf "%.0f", n/s }') "
}

keys=()
want() { [[ $scenario == all || $scenario == "$1" ]]; }
want plain && keys+=(plain)
want tls && keys+=(tls-h1 tls-h2)
want handshake && keys+=(handshake)

# Memory per idle keep-alive connection: RSS (all the proxy's processes) with IDLE connections open,
# each having served one request, minus RSS before, divided by IDLE. Once per proxy (RSS does not
# need rounds); the connections are plain HTTP/1.1.
idle=8000
rss_kib() { local t=0; for pid in $(pids "$1"); do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$pid/status"))); done; echo $t; }
declare -A per_connection
if want idle; then
  for proxy in "${proxies[@]}"; do
    before=$(rss_kib "$proxy")
    coproc holder { $load python3 bench/idle.py "${plain[$proxy]}" $idle; }
    read -r -t 120 ready count <&"${holder[0]}" || { echo "$proxy: idle connections not ready" >&2; exit 1; }
    after=$(rss_kib "$proxy")
    per_connection[$proxy]=$(awk -v a="$after" -v b="$before" -v n="$count" 'BEGIN { printf "%.1f", (a-b)/n }')
    exec {holder[1]}>&-
    wait "$holder_PID" 2>/dev/null || true
    echo "idle: $proxy done" >&2
  done
fi

for round in $(seq "$rounds"); do
  order=("${proxies[@]}")
  ((round % 2 == 0)) && order=(sluice caddy haproxy nginx)
  for proxy in "${order[@]}"; do
    want plain && measure plain "$proxy" "http://127.0.0.1:${plain[$proxy]}/" --h1 -c 64 -m 1
    want tls && measure tls-h1 "$proxy" "https://127.0.0.1:${tls[$proxy]}/" --h1 -c 64 -m 1
    want tls && measure tls-h2 "$proxy" "https://127.0.0.1:${tls[$proxy]}/" -c 64 -m 1
    want handshake && handshakes handshake "$proxy" "${tls[$proxy]}"
  done
  want plain && { r=$(load "http://127.0.0.1:$upstream/" --h1 -c 64 -m 1); rps[plain,direct]+="${r#* } "; }
  echo "round $round/$rounds done" >&2
done

spread() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END { printf "%s–%s", a[1], a[NR] }'; }
echo
((${#keys[@]})) && printf '%-10s %-8s %14s %12s %18s %10s %12s\n' scenario proxy "CPU µs/req" "vs Sluice" "min–max" "req/s" "peak RSS MiB"
for key in "${keys[@]}"; do
  s=$(echo "${cpu[$key,sluice]}" | median)
  for proxy in "${proxies[@]}"; do
    c=$(echo "${cpu[$key,$proxy]}" | median)
    printf '%-10s %-8s %14.1f %12s %18s %10.0f %12.1f\n' "$key" "$proxy" "$c" "$(ratio "$c" "$s")" \
      "$(echo "${cpu[$key,$proxy]}" | spread)" "$(echo "${rps[$key,$proxy]}" | median)" \
      "$(awk -v k="$(peak_rss_kib "$proxy")" 'BEGIN { print k/1024 }')"
  done
  [[ $key == plain ]] && printf '%-10s %-8s %14s %12s %18s %10.0f\n' plain direct - - - "$(echo "${rps[plain,direct]}" | median)"
done
if want split; then
  # 100,000 requests through the 90/10 split, counted by Sluice's own metrics per version.
  $load h2load --h1 -c 64 -m 1 -D 1 "http://127.0.0.1:$split/" >/dev/null 2>&1 || true
  before=$(curl -s "http://127.0.0.1:$admin/metrics")
  t0=$(ticks sluice)
  served=$($load h2load --h1 -c 64 -m 1 -n 100000 "http://127.0.0.1:$split/" 2>/dev/null \
    | awk '/^requests:/ { for (i=1;i<=NF;i++) if ($i=="succeeded,") print $(i-1) }')
  t1=$(ticks sluice)
  cpu[split,sluice]=$(awk -v t=$((t1 - t0)) -v hz="$hz" -v n="${served:-0}" 'BEGIN { if (n>0) printf "%.2f", t/hz*1e6/n; else print "nan" }')
  sleep 0.5 # metrics are recorded after each response is sent
  after=$(curl -s "http://127.0.0.1:$admin/metrics")
  count() { echo "$1" | awk -v v="destination_version=\"$2\"" 'index($0, "istio_requests_total{") == 1 && index($0, v) { n += $NF } END { print n+0 }'; }
  v1=$(( $(count "$after" v1) - $(count "$before" v1) )); v2=$(( $(count "$after" v2) - $(count "$before" v2) ))
  echo
  awk -v a="$v1" -v b="$v2" -v c="$(echo "${cpu[split,sluice]}" | median)" -v p="$(echo "${cpu[plain,sluice]:-}" | median)" 'BEGIN {
    printf "split      sluice   90/10 over %d requests: v1 %.2f%%, v2 %.2f%% (target 90 ± 1); CPU %.1f µs/req", a+b, 100*a/(a+b), 100*b/(a+b), c
    if (p > 0) printf " (plain: %.1f)", p; print "" }'
fi
if want idle; then
  echo
  printf '%-10s %-8s %20s\n' scenario proxy "KiB per idle conn"
  for proxy in "${proxies[@]}"; do printf '%-10s %-8s %20s\n' idle "$proxy" "${per_connection[$proxy]}"; done
fi
echo
echo "“vs Sluice” is the peer's CPU per request ÷ Sluice's: above 1 means Sluice uses less CPU."
echo "handshake: CPU µs per full TLS handshake; req/s column = handshakes/s."
echo "machine: $(nproc) cores, $(uname -r); nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), $(haproxy -v | head -1 | awk '{print "HAProxy " $3}'), Caddy $(caddy version | awk '{print $1}'); pinned: ${load:-no}; $rounds rounds × $seconds s"
