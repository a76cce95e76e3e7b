#!/usr/bin/env bash
# HAProxy and lbnode side by side on loopback, with the same backend (nginx)
# and the same load generator (wrk): HTTP keep-alive, HTTP with a new
# connection per request, and TCP mode. Prints requests/s, p50 and p99 for
# each, and the ratio lbnode / HAProxy. Run by hand, as root on Debian (it
# installs haproxy, nginx-light and wrk if they are missing):
#
#   scripts/bench.sh                      # 10 s per run, 3 rounds, 64 connections, 2 threads
#   DURATION=30s CONNS=128 scripts/bench.sh
#
# Each scenario runs ROUNDS times per proxy (default 3), alternating which
# proxy goes first so a machine that speeds up or slows down during the run
# favours neither; the table shows each proxy's medians and the ratio of the
# median req/s, then every round's own ratio (one run on two shared cores
# varies by about 5%). The last column is the proxy's own CPU time (user +
# system, all its threads) per request: on a machine where the proxy, the
# backend and wrk share the cores, req/s follows what a request costs them
# all, and this column is what it costs the proxy alone.
# Both proxies get THREADS threads (HAProxy nbthread, lbnode --threads),
# each thread on a CPU of its own (HAProxy cpu-map, lbnode --cpus) while
# there are CPUs enough; PIN=no leaves both to the kernel's placement.
# LBNODE=path runs another lbnode binary (to compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
WRK_THREADS=${WRK_THREADS:-2}
PIN=${PIN:-yes}
ROUNDS=${ROUNDS:-3}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a whole number of 1 or more, not '$ROUNDS'" >&2; exit 2; }
cpus=""
[ "$PIN" = yes ] && [ "$THREADS" -le "$(nproc)" ] && cpus="0-$((THREADS - 1))"

# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh
bench_setup haproxy nginx-light wrk

{
  bench_haproxy_http "$THREADS" "$cpus"
  cat <<CONF
frontend tcp
  mode tcp
  bind 127.0.0.1:28102
  default_backend tcp
backend tcp
  mode tcp
  server s1 $backend
CONF
} >"$work/haproxy.cfg"
haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" &
pids+=($!)

RUST_LOG=warn "$LBNODE" --threads "$THREADS" --cpus "${cpus:-none}" --id 1 --listen 127.0.0.1:28200 --data-dir "$work/lbnode" 2>"$work/lbnode.log" &
pids+=($!)
hpid=${pids[1]} lpid=${pids[2]}
cat > "$work/spec.yaml" <<SPEC
defaults:
  maxconn: 8000
frontends:
  - { name: http, bind: ["127.0.0.1:28201"], mode: http, default_backend: http }
  - { name: tcp, bind: ["127.0.0.1:28202"], mode: tcp, default_backend: tcp }
backends:
  - name: http
    http_reuse: always
    servers: [{ name: s1, address: "$backend" }]
  - name: tcp
    servers: [{ name: s1, address: "$backend" }]
SPEC
bench_lbnode_spec "$work/spec.yaml"
for port in 28101 28102 28201 28202; do
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
  curl -sf "http://127.0.0.1:$port/" >/dev/null || { echo "nothing serves on 127.0.0.1:$port; see $work" >&2; exit 1; }
done

# wrk's latency in ms, whatever unit it printed.
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.2f", n }'; }

# cpu_ticks PID: the process's user + system time so far, in clock ticks
# (the fields after the command name, which may hold spaces).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
tick_us=$(awk -v hz="$(getconf CLK_TCK)" 'BEGIN { print 1e6 / hz }')

# run URL PID [wrk args...]: prints "rps p50 p99 cpu", cpu being the process
# PID's CPU time per request in microseconds.
run() {
  local url=$1 pid=$2; shift 2
  wrk -t"$WRK_THREADS" -c"$CONNS" -d2s "$@" "$url" >/dev/null 2>&1 # warm-up
  local out t0 t1
  t0=$(cpu_ticks "$pid")
  out=$(wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency "$@" "$url")
  t1=$(cpu_ticks "$pid")
  local rps p50 p99 cpu errors
  rps=$(awk '/^Requests\/sec/ { printf "%d", $2 }' <<<"$out")
  cpu=$(awk -v t=$((t1 - t0)) -v us="$tick_us" '/ requests in / { printf "%.2f", t * us / $1 }' <<<"$out")
  p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
  p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
  errors=$(awk '/Non-2xx|Socket errors/ { print }' <<<"$out" | tr '\n' ' ')
  [ -z "$errors" ] || echo "  ($url: $errors)" >&2
  echo "$rps $p50 $p99 $cpu"
}

# median VALUE...: the middle value (the mean of the two middle ones for an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { m = int((NR + 1) / 2); printf "%s", (NR % 2 ? v[m] : (v[m] + v[m + 1]) / 2) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

printf 'raftlb benchmark: %s per run, %s rounds, %s connections, %s wrk threads, %s proxy threads (CPUs: %s), %s cores\n' "$DURATION" "$ROUNDS" "$CONNS" "$WRK_THREADS" "$THREADS" "${cpus:-not pinned}" "$(nproc)"
printf '%s\n\n' "$(haproxy -v | head -1 | cut -d' ' -f1-3); lbnode $("$LBNODE" --version | cut -d' ' -f2); $(nginx -v 2>&1 | cut -d' ' -f3) backend"
printf '%-22s %-8s %10s %9s %9s %11s\n' scenario proxy "req/s" "p50 ms" "p99 ms" "CPU us/req"
for scenario in "http-keepalive|28101|28201|" "http-close|28101|28201|-H Connection: close" "tcp|28102|28202|"; do
  IFS='|' read -r name hport lport extra <<<"$scenario"
  args=()
  [ -z "$extra" ] || args=(-H "${extra#-H }")
  hr=() h50=() h99=() hc=() lr=() l50=() l99=() lc=() rounds=()
  haproxy_run() { read -r r a b c < <(run "http://127.0.0.1:$hport/" "$hpid" "${args[@]}"); hr+=("$r") h50+=("$a") h99+=("$b") hc+=("$c"); }
  lbnode_run() { read -r r a b c < <(run "http://127.0.0.1:$lport/" "$lpid" "${args[@]}"); lr+=("$r") l50+=("$a") l99+=("$b") lc+=("$c"); }
  for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then haproxy_run; lbnode_run; else lbnode_run; haproxy_run; fi
    rounds+=("$(ratio "${lr[-1]}" "${hr[-1]}")")
  done
  hm=$(median "${hr[@]}") lm=$(median "${lr[@]}") h99m=$(median "${h99[@]}") l99m=$(median "${l99[@]}")
  hcm=$(median "${hc[@]}") lcm=$(median "${lc[@]}")
  printf '%-22s %-8s %10.0f %9.2f %9.2f %11.2f\n' "$name" haproxy "$hm" "$(median "${h50[@]}")" "$h99m" "$hcm"
  printf '%-22s %-8s %10.0f %9.2f %9.2f %11.2f   ratio %s, p99 %s, CPU per request %s; rounds %s\n' \
    "$name" lbnode "$lm" "$(median "${l50[@]}")" "$l99m" "$lcm" \
    "$(ratio "$lm" "$hm")" \
    "$(awk -v a="$l99m" -v b="$h99m" 'BEGIN { print (a <= b ? "no worse" : "worse") }')" \
    "$(ratio "$lcm" "$hcm")" "${rounds[*]}"
done
