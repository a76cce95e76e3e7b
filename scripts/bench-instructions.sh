#!/usr/bin/env bash
# Instructions per HTTP request, lbnode against HAProxy, counted by callgrind:
# unlike requests per second on a shared machine, the count barely moves from
# one run to the next, so it tells whether a change made the proxy's own work
# per request smaller. User space only: system calls are counted as one
# instruction each, whatever the kernel does for them. Also counts the
# atomic read-modify-write instructions per request (scripts/count-atomics.py):
# about 20 cycles each, however uncontended.
#
#   scripts/bench-instructions.sh              # keep-alive, 8 s of load
#   MODE=close DURATION=8s scripts/bench-instructions.sh
#
# Each proxy runs under valgrind with 2 threads in front of one nginx; wrk
# warms it up, the counters are zeroed, wrk runs DURATION with 8 connections
# (one thread), and the count since the zeroing is divided by the requests
# served. Run by hand, as root on Debian (installs valgrind, haproxy,
# nginx-light, wrk, python3 and binutils if they are missing). LBNODE=path measures another build.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${MODE:-keepalive}
DURATION=${DURATION:-8s}

# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh
bench_setup valgrind haproxy nginx-light wrk python3 binutils
bench_haproxy_http 2 >"$work/haproxy.cfg"
cat >"$work/spec.yaml" <<SPEC
defaults:
  maxconn: 8000
frontends:
  - { name: http, bind: ["127.0.0.1:28201"], mode: http, default_backend: http }
backends:
  - name: http
    http_reuse: always
    servers: [{ name: s1, address: "$backend" }]
SPEC

wrk_args=(-t1 -c8)
[ "$MODE" = close ] && wrk_args+=(-H "Connection: close")

# measure NAME URL: the proxy under valgrind must be the last process started.
measure() {
  local name=$1 url=$2 vg=${pids[-1]}
  for _ in $(seq 150); do curl -sf "$url" >/dev/null && break; sleep 0.2; done
  curl -sf "$url" >/dev/null || { echo "$name does not serve $url; see $work" >&2; exit 1; }
  wrk "${wrk_args[@]}" -d3s "$url" >/dev/null
  callgrind_control -z "$vg" >/dev/null 2>&1
  local requests
  requests=$(wrk "${wrk_args[@]}" -d"$DURATION" "$url" | awk '/requests in/ { print $1 }')
  callgrind_control -d "$vg" >/dev/null 2>&1
  local dump
  for _ in $(seq 50); do
    dump=$(ls "$work/$name".cg.*.1 2>/dev/null | head -1) && [ -n "$dump" ] && grep -q '^summary:' "$dump" && break
    sleep 0.2
  done
  local total
  total=$(awk '/^summary:/ { print $2 }' "$dump")
  printf '%-8s %10s requests %14s instructions %8s per request\n' "$name" "$requests" "$total" "$((total / requests))"
  python3 scripts/count-atomics.py "$dump" "$requests" | sed 's/^/  /'
}

printf 'raftlb instructions per request (%s, %s of load, 8 connections)\n' "$MODE" "$DURATION"
valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$work/haproxy.cg.%p" \
  haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" &
pids+=($!)
measure haproxy http://127.0.0.1:28101/

RUST_LOG=warn valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file="$work/lbnode.cg.%p" \
  "$LBNODE" --threads 2 --id 1 --listen 127.0.0.1:28200 --data-dir "$work/lbnode" 2>"$work/lbnode.log" &
pids+=($!)
bench_lbnode_spec "$work/spec.yaml"
measure lbnode http://127.0.0.1:28201/
