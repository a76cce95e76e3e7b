#!/usr/bin/env bash
# The same outage, measured for Keepalived + HAProxy and for raftlb in one run:
# three balancer hosts, two backends and a client in network namespaces
# (scripts/netns.sh), the VIP 192.0.2.100 on the first host, and its link cut.
# A client in its own namespace sends GET / to the VIP every 10 ms, each with a
# 100 ms limit; the outage is from the cut to the first answer to a probe begun
# after the last probe that got none.
#
#   sudo bash scripts/failover-compare.sh [ROUNDS]     (default 3 rounds each)
#
# Keepalived uses VRRP unicast peers at its default timers (advert_int 1);
# HAProxy binds the VIP on every host (ip_nonlocal_bind). Needs root; installs
# keepalived and haproxy from Debian's packages; builds lbnode and lbctl.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
p=${PREFIX:-rlbcmp}

need=()
for pkg in keepalived haproxy python3; do command -v "$pkg" >/dev/null || need+=("$pkg"); done
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --profile ci --bins -q
bin=$PWD/target/ci
dir=$(mktemp -d)
cleanup() {
    bash scripts/netns.sh down "$p"
    # KEEP=1 keeps the logs of every daemon.
    if [[ -n ${KEEP:-} ]]; then echo "logs kept in $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT
inns() { local ns=$1; shift; ip netns exec "$p-$ns" "$@"; }

# The client: probes until told to stop, then prints the outage after the cut.
# Times are the wall clock (time.time(), bash's EPOCHREALTIME), read where
# they happen: a probe's answer is timed when it arrives, not when the probe
# began, as a connection attempt made while the VIP moves can wait for the
# new holder's address and be answered by it. The outage ends with the first
# answer to a probe begun after the last probe that failed.
cat >"$dir/probe.py" <<'PY'
import os, socket, sys, threading, time
vip, cut_file, stop_file = sys.argv[1], sys.argv[2], sys.argv[3]
log, lock = [], threading.Lock()
def probe():
    began, ok = time.time(), False
    try:
        with socket.create_connection((vip, 80), timeout=0.1) as s:
            s.settimeout(max(0.001, 0.1 - (time.time() - began)))
            s.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
            ok = s.recv(12).startswith(b"HTTP/1")
    except OSError:
        pass
    with lock:
        log.append((began, time.time(), ok))
nxt = time.monotonic()
while not os.path.exists(stop_file):
    threading.Thread(target=probe, daemon=True).start()
    nxt += 0.01
    time.sleep(max(0, nxt - time.monotonic()))
time.sleep(0.15)
cut = float(open(cut_file).read())
with lock:
    after = [e for e in log if e[0] >= cut]
last_failed = max((began for began, _, ok in after if not ok), default=None)
if last_failed is None:
    print(0)
else:
    back = min((ended for began, ended, ok in after if ok and began > last_failed), default=None)
    print("never" if back is None else round((back - cut) * 1000))
PY

holder() {
    for n in 1 2 3; do
        if ip -n "$p-n$n" -o addr show dev eth0 | grep -q "192.0.2.100/"; then echo "$n"; return; fi
    done
}

# One outage: probe, cut the holder's link, wait, stop probing, restore the link.
measure() {
    local h=$1 settle=$2
    rm -f "$dir/cut" "$dir/stop"
    inns c python3 "$dir/probe.py" 192.0.2.100 "$dir/cut" "$dir/stop" >"$dir/outage" &
    local prober=$!
    sleep 0.5
    # With a decimal point whatever the locale, for Python to read.
    local cut=${EPOCHREALTIME/,/.}
    ip -n "$p-n$h" link set eth0 down
    echo "$cut" >"$dir/cut"
    sleep "$settle"
    touch "$dir/stop"
    wait "$prober"
    ip -n "$p-n$h" link set eth0 up
    cat "$dir/outage"
}

haproxy_cfg() {
    cat <<CFG
global
    maxconn 1000
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend web
    bind 192.0.2.100:80
    default_backend app
backend app
    server b1 192.0.2.21:8000
    server b2 192.0.2.22:8000
CFG
}

keepalived_cfg() {
    local n=$1 prio=$2 peers=""
    for o in 1 2 3; do [[ $o == "$n" ]] || peers+="        192.0.2.1$o"$'\n'; done
    cat <<CFG
global_defs {
    router_id n$n
    enable_script_security
}
vrrp_instance VI_1 {
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority $prio
    advert_int 1
    unicast_src_ip 192.0.2.1$n
    unicast_peer {
$peers    }
    virtual_ipaddress {
        192.0.2.100/24 dev eth0
    }
}
CFG
}

bash scripts/netns.sh up "$p"
bash scripts/netns.sh backends "$p" "$dir"

echo "== Keepalived + HAProxy (VRRP unicast, advert_int 1)"
ka=()
for n in 1 2 3; do
    inns "n$n" sysctl -qw net.ipv4.ip_nonlocal_bind=1
    haproxy_cfg >"$dir/haproxy-n$n.cfg"
    inns "n$n" haproxy -q -f "$dir/haproxy-n$n.cfg" -p "$dir/haproxy-n$n.pid" -D
    keepalived_cfg "$n" $((200 - n * 50)) >"$dir/keepalived-n$n.conf"
    inns "n$n" keepalived --dont-fork --log-console -f "$dir/keepalived-n$n.conf" \
        -p "$dir/ka-n$n.pid" -r "$dir/ka-vrrp-n$n.pid" >"$dir/keepalived-n$n.log" 2>&1 &
    ka+=($!)
done
ka_results=()
for r in $(seq "$rounds"); do
    for _ in $(seq 100); do [[ -n $(holder) ]] && break; sleep 0.1; done
    h=$(holder)
    sleep 3
    out=$(measure "$h" 6)
    echo "round $r: node $h's link cut: outage ${out} ms"
    ka_results+=("$out")
    sleep 4
done
kill "${ka[@]}" 2>/dev/null || true
for n in 1 2 3; do kill "$(cat "$dir/haproxy-n$n.pid")" 2>/dev/null || true; done
wait "${ka[@]}" 2>/dev/null || true
for n in 1 2 3; do ip -n "$p-n$n" addr del 192.0.2.100/24 dev eth0 2>/dev/null || true; done

echo "== raftlb (default timers)"
cat >"$dir/spec.yaml" <<'SPEC'
vips:
  - address: 192.0.2.100/24
frontends:
  - name: web
    bind: ["192.0.2.100:80"]
    mode: http
    default_backend: app
backends:
  - name: app
    servers:
      - { name: b1, address: "192.0.2.21:8000" }
      - { name: b2, address: "192.0.2.22:8000" }
SPEC
bash scripts/netns.sh cluster "$p" "$dir" "$dir/spec.yaml"
# Every node follows the same leader, and that leader holds the VIP.
settled() {
    local leaders=""
    for n in 1 2 3; do
        leaders+=$(inns "n$n" "$bin/lbctl" --endpoint "192.0.2.1$n:7001" --json cluster status --local 2>/dev/null |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])' 2>/dev/null)" "
    done
    read -r a b c <<<"$leaders"
    [[ $a == "$b" && $b == "$c" && $a == "$(holder)" ]]
}
rl_results=()
for r in $(seq "$rounds"); do
    for _ in $(seq 100); do settled && break; sleep 0.1; done
    sleep 2
    h=$(holder)
    out=$(measure "$h" 3)
    echo "round $r: node $h's link cut: outage ${out} ms"
    rl_results+=("$out")
done

echo
echo "outage after the holder's link is cut (ms), per round:"
echo "  keepalived + haproxy: ${ka_results[*]}"
echo "  raftlb:               ${rl_results[*]}"
