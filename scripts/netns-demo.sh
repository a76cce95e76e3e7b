#!/usr/bin/env bash
# Three lbnodes, two backends and a client in network namespaces (the
# topology of scripts/netns.sh), a cluster formed and a spec with a VIP
# applied. Prints what to try, then waits; Ctrl-C tears everything down.
# Needs root. Builds lbnode and lbctl first.
set -euo pipefail
cd "$(dirname "$0")/.."
p=${PREFIX:-rlbdemo}
cargo build --profile ci --bins -q
bin=$PWD/target/ci
dir=$(mktemp -d)
cleanup() {
    echo "tearing down"
    bash scripts/netns.sh down "$p"
    rm -rf "$dir"
}
trap cleanup EXIT
bash scripts/netns.sh up "$p"
inns() { local ns=$1; shift; ip netns exec "$p-$ns" "$@"; }

bash scripts/netns.sh backends "$p" "$dir"
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
    health_check: { type: http, path: /, interval: 1s }
    servers:
      - { name: b1, address: "192.0.2.21:8000" }
      - { name: b2, address: "192.0.2.22:8000" }
SPEC
bash scripts/netns.sh cluster "$p" "$dir" "$dir/spec.yaml"
ctl() { inns n1 "$bin/lbctl" --endpoint 192.0.2.11:7001 "$@"; }
sleep 1
ctl vip list
cat <<EOT

The client reaches the VIP:
  ip netns exec $p-c curl -s http://192.0.2.100/
Watch it every 100 ms in another shell:
  while :; do ip netns exec $p-c curl -s -m 0.1 http://192.0.2.100/ || echo FAIL; sleep 0.1; done
Move the VIP on purpose:
  ip netns exec $p-n1 $bin/lbctl --endpoint 192.0.2.11:7001 vip move 192.0.2.100 2
Cut the holder's link (N is the holder), then bring it back:
  ip -n $p-nN link set eth0 down; ip -n $p-nN link set eth0 up
Which node holds it, and what the client's ARP cache says:
  ip netns exec $p-n1 $bin/lbctl --endpoint 192.0.2.11:7001 vip list
  ip -n $p-c neigh show 192.0.2.100
Node logs: $dir/n1.log $dir/n2.log $dir/n3.log

Ctrl-C stops everything and removes the namespaces.
EOT
wait
