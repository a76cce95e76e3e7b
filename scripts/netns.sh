#!/usr/bin/env bash
# The network-namespace topology of raftlb's VIP tests, demo and failover
# comparison: one "switch" namespace with a bridge, and one namespace per host
# (three balancer nodes, two backends, a client), each with an eth0 on the
# bridge. Addresses are from 192.0.2.0/24 and 2001:db8::/64 and exist only
# inside these namespaces. Needs root.
#
#   scripts/netns.sh up PREFIX     build it (namespaces PREFIX-sw, PREFIX-n1..n3, PREFIX-b1, PREFIX-b2, PREFIX-c)
#   scripts/netns.sh down PREFIX   remove it (also what is left of a half-built one)
#   scripts/netns.sh backends PREFIX DIR
#       an HTTP server (python3) on port 8000 of each backend host, logs in DIR
#   scripts/netns.sh cluster PREFIX DIR SPEC
#       lbnode (from target/ci) on each node host at 192.0.2.1N:7001, data and
#       logs in DIR/nN, formed into a cluster, with the spec file SPEC applied
#
# Host    namespace   IPv4           IPv6
# node N  PREFIX-nN   192.0.2.1N     2001:db8::1N
# backend PREFIX-bN   192.0.2.2N     2001:db8::2N
# client  PREFIX-c    192.0.2.50     2001:db8::50
# VIPs to use: 192.0.2.100/24, 2001:db8::100/64
set -euo pipefail

hosts=(n1:11 n2:12 n3:13 b1:21 b2:22 c:50)

up() {
    local p=$1
    ip netns add "$p-sw"
    ip -n "$p-sw" link add br0 type bridge
    # Forward at once: a bridge port's learning state would swallow the first frames.
    ip -n "$p-sw" link set br0 type bridge forward_delay 0
    ip -n "$p-sw" link set br0 up
    for h in "${hosts[@]}"; do
        local name=${h%%:*} last=${h##*:} ns="$p-${h%%:*}"
        ip netns add "$ns"
        ip link add "$p-$name-h" type veth peer name "$p-$name-s"
        ip link set "$p-$name-h" netns "$ns"
        ip -n "$ns" link set "$p-$name-h" name eth0
        ip link set "$p-$name-s" netns "$p-sw"
        ip -n "$p-sw" link set "$p-$name-s" master br0 up
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.eth0.accept_dad=0
        # Take gratuitous ARP as an update of an address the host already knows.
        ip netns exec "$ns" sysctl -qw net.ipv4.conf.eth0.arp_accept=1 net.ipv4.conf.all.arp_accept=1
        ip -n "$ns" addr add "192.0.2.$last/24" dev eth0
        ip -n "$ns" addr add "2001:db8::$last/64" dev eth0 nodad
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

down() {
    local p=$1
    for h in "${hosts[@]}" sw:0; do
        local ns="$p-${h%%:*}"
        if ip netns pids "$ns" >/dev/null 2>&1; then
            # Whatever still runs in there goes with it.
            for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
}

backends() {
    local p=$1 dir=$2
    for b in 1 2; do
        mkdir -p "$dir/www$b" && echo "hello from backend $b" >"$dir/www$b/index.html"
        ip netns exec "$p-b$b" python3 -m http.server 8000 --bind "192.0.2.2$b" --directory "$dir/www$b" \
            >"$dir/b$b.log" 2>&1 &
    done
}

cluster() {
    local p=$1 dir=$2 spec=$3
    local bin
    bin="$(cd "$(dirname "$0")/.." && pwd)/target/ci"
    for n in 1 2 3; do
        ip netns exec "$p-n$n" "$bin/lbnode" --id "$n" --listen "192.0.2.1$n:7001" --data-dir "$dir/n$n" \
            >"$dir/n$n.log" 2>&1 &
    done
    ctl() { ip netns exec "$p-n1" "$bin/lbctl" --endpoint 192.0.2.11:7001 "$@" >/dev/null; }
    for _ in $(seq 50); do ctl cluster status --local 2>/dev/null && break; sleep 0.1; done
    ctl cluster init
    ctl node add 2 192.0.2.12:7001
    ctl node add 3 192.0.2.13:7001
    ctl config apply -f "$spec"
}

case "${1:-}" in
    up) down "${2:?prefix}"; up "$2" ;;
    down) down "${2:?prefix}" ;;
    backends) backends "${2:?prefix}" "${3:?dir}" ;;
    cluster) cluster "${2:?prefix}" "${3:?dir}" "${4:?spec file}" ;;
    *) echo "usage: $0 up|down PREFIX, backends PREFIX DIR, cluster PREFIX DIR SPEC" >&2; exit 2 ;;
esac
