#!/usr/bin/env bash
# What an idle cluster costs: three lbnode processes on loopback form a
# cluster and do nothing else for DURATION; prints each node's CPU time
# (user + system, every thread, from /proc/PID/stat) and context switches
# (voluntary and not, every thread) per second. Run by hand; no root needed.
#
#   scripts/bench-idle.sh                    # DURATION=20 (seconds)
#   LBNODE=path/to/lbnode scripts/bench-idle.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-20}
cargo build --release --bins --quiet
LBNODE=${LBNODE:-target/release/lbnode}
work=$(mktemp -d /tmp/raftlb-idle.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

lbctl() { target/release/lbctl --endpoint 127.0.0.1:28301 "$@"; }
for id in 1 2 3; do
  RUST_LOG=warn "$LBNODE" --id "$id" --listen "127.0.0.1:2830$id" --data-dir "$work/n$id" --threads 2 --cpus none \
    2>"$work/n$id.log" &
  pids+=($!)
done
for _ in $(seq 100); do lbctl cluster status >/dev/null 2>&1 && break; sleep 0.1; done
lbctl cluster init >/dev/null
lbctl node add 2 127.0.0.1:28302 >/dev/null
lbctl node add 3 127.0.0.1:28303 >/dev/null
sleep 3
leader=$(lbctl --json cluster status | python3 -c 'import json, sys; print(json.load(sys.stdin)["leader"])')

# ticks PID: CPU clock ticks and context switches of every thread, summed.
ticks() {
  local t cpu=0 cs=0
  for t in /proc/"$1"/task/*; do
    cpu=$((cpu + $(awk '{ print $14 + $15 }' "$t/stat")))
    cs=$((cs + $(awk '/ctxt_switches/ { s += $2 } END { print s }' "$t/status")))
  done
  echo "$cpu $cs"
}
declare -a before
for i in 0 1 2; do before[i]=$(ticks "${pids[i]}"); done
sleep "$DURATION"
hz=$(getconf CLK_TCK)
printf 'idle cluster of three lbnode processes, %s s\n' "$DURATION"
for i in 0 1 2; do
  read -r cpu0 cs0 <<<"${before[i]}"
  read -r cpu1 cs1 < <(ticks "${pids[i]}")
  role=follower
  [ "$((i + 1))" = "$leader" ] && role=leader
  awk -v id=$((i + 1)) -v role=$role -v cpu=$((cpu1 - cpu0)) -v cs=$((cs1 - cs0)) -v d="$DURATION" -v hz="$hz" \
    'BEGIN { printf "node %s (%-8s) %5.2f%% of a core %7.1f context switches/s\n", id, role, 100 * cpu / hz / d, cs / d }'
done
