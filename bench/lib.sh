# Shared by the bench scripts: installs the peers, builds Sluice (release), makes a work directory
# removed on exit, pins load and servers to different cores, and starts the upstream every proxy
# under test shares. Source it from a script that has `set -euo pipefail` and is in the repo root.

# The peers and load generators, from Debian; a script may add to bench_packages before sourcing.
need=()
for pkg in nginx-light nghttp2-client openssl curl ${bench_packages:-}; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
scripts/setup
# Sluice, and the bare Pingora proxy measured beside it (gateway/sluice/examples/bare_pingora.rs), on
# the system allocator as Pingora ships and on mimalloc as Sluice runs.
cargo build --release -q -p sluice --bin sluice --example bare_pingora --example bare_pingora_mimalloc

work=$(mktemp -d)
nginx_prefixes=()
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  for prefix in "${nginx_prefixes[@]}"; do nginx -p "$work/$prefix" -c nginx.conf -s stop 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# With two or more cores the load generator gets core 0 and everything it measures core 1.
if (( $(nproc) >= 2 )); then load="taskset -c 0"; serve="taskset -c 1"; else load=""; serve=""; fi

# start_nginx NAME HTTP-BLOCK: an nginx with one worker under $work/NAME.
start_nginx() {
  mkdir -p "$work/$1/logs"
  cat > "$work/$1/nginx.conf" <<EOF
worker_processes 1;
pid $work/$1/nginx.pid;
error_log $work/$1/logs/error.log warn;
events { worker_connections 16384; }
http {
$2
}
EOF
  $serve nginx -p "$work/$1" -c nginx.conf
  nginx_prefixes+=("$1")
}

# start_upstream PORT: a fixed 2-byte answer, in its own process so every proxy under test pays the
# same cross-process hop.
start_upstream() {
  start_nginx upstream "  access_log off;
  server { listen 127.0.0.1:$1; keepalive_requests 1000000; location / { return 200 \"ok\"; } }"
}

# start_sluice NAME CONFIG-FILE URL: runs Sluice in the background and waits until URL answers.
start_sluice() {
  RUST_LOG=warn $serve target/release/sluice run --config "$2" 2>"$work/$1.log" &
  for _ in $(seq 100); do curl -sk -o /dev/null "$3" && return 0; sleep 0.1; done
  echo "$1 did not start:" >&2; cat "$work/$1.log" >&2; return 1
}

# start_pingora NAME PORT UPSTREAM-PORT: the bare Pingora proxy (no filters, Pingora's own listener),
# to tell Pingora's cost from Sluice's. NAME pingora runs it on the system allocator, pingora-mi on
# mimalloc. Sets pingora_pids[NAME].
declare -A pingora_pids
start_pingora() {
  local binary=bare_pingora
  [[ $1 == pingora-mi ]] && binary=bare_pingora_mimalloc
  RUST_LOG=warn $serve "target/release/examples/$binary" "127.0.0.1:$2" "127.0.0.1:$3" 2>"$work/$1.log" &
  pingora_pids[$1]=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$2/" && return 0; sleep 0.1; done
  echo "$1 did not start:" >&2; cat "$work/$1.log" >&2; return 1
}

# sluice_gateway NAME ADMIN-PORT [SPEC-LINES]: GatewaySettings (loopback, one worker, its own
# certs dir under $work) and a Gateway `gw` up to `servers:`; the caller appends the servers.
sluice_gateway() {
  cat <<EOF
apiVersion: sluice.dev/v1alpha1
kind: GatewaySettings
metadata: {name: bench}
spec:
  bindAddress: 127.0.0.1
  threads: 1
  admin: {address: "127.0.0.1:$2"}
  certsDir: "$work/certs-$1"
  upgradeSocket: "$work/upgrade-$1.sock"
${3:-}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
EOF
}

# sluice_app_service UPSTREAM-PORT: the ServiceEntry `app.bench` for the shared upstream.
sluice_app_service() {
  cat <<EOF
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app}
spec:
  hosts: [app.bench]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: $1}}]
EOF
}

# sluice_app_routes UPSTREAM-PORT: config documents sending every host to the shared upstream.
sluice_app_routes() {
  sluice_app_service "$1"
  cat <<EOF
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{destination: {host: app.bench}}]
EOF
}

# sluice_many_hosts DIR HOSTS ROUTES: VirtualServices for hosts h0…h(HOSTS-1).bench.test with
# ROUTES prefix routes each (/r0/ … /rN/, to app.bench), in four files hosts-0…hosts-3.yaml.
sluice_many_hosts() {
  awk -v dir="$1" -v hosts="$2" -v routes="$3" 'BEGIN {
    for (h = 0; h < hosts; h++) {
      file = dir "/hosts-" (h % 4) ".yaml"
      if (h >= 4) print "---" > file
      printf "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: h%d}\n", h > file
      printf "spec: {hosts: [h%d.bench.test], gateways: [gw], http: [", h > file
      for (r = 0; r < routes; r++)
        printf "%s{match: [{uri: {prefix: /r%d/}}], route: [{destination: {host: app.bench}}]}", (r ? ", " : ""), r > file
      print "]}" > file
    } }'
}

# requests URL [--h1]: requests per second, 16 keep-alive connections for 10 s.
requests() {
  $load h2load ${2:-} -D 10 -c 16 -m 1 "$1" 2>/dev/null \
    | awk '/^finished in/ { gsub(/,/, ""); for (i=1;i<=NF;i++) if ($i=="req/s") print $(i-1) }' | head -1
}

# percentiles FILE: "p50 p99 p99.9" in ms of an h2load --log-file (third column: µs per request).
percentiles() {
  cut -f3 "$1" | sort -n | awk '{ d[NR] = $1 } END {
    if (NR == 0) { print "nan nan nan"; exit }
    printf "%.2f %.2f %.2f\n", d[int(NR*0.5)+1]/1000, d[int(NR*0.99)+1]/1000, d[int(NR*0.999)+1]/1000 }'
}

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END { if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b>0) printf "%.2f", a/b; else print "n/a" }'; }
