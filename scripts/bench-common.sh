# Sourced by scripts/bench.sh and scripts/bench-instructions.sh: the packages,
# the release build, a work folder removed at exit with every process the
# script started, the nginx backend, and HAProxy's HTTP configuration.

# bench_setup PACKAGE...: installs the packages that are missing, builds the
# release binaries (as nodes run in production; a few minutes the first time),
# makes $work and starts nginx on $backend. Processes started go in $pids.
bench_setup() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  cargo build --release --bins --quiet
  LBNODE=${LBNODE:-target/release/lbnode}

  work=$(mktemp -d /tmp/raftlb-bench.XXXXXX)
  pids=()
  trap bench_cleanup EXIT

  backend=127.0.0.1:28080
  cat >"$work/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 8192; }
http {
  access_log off;
  keepalive_requests 10000000;
  server { listen $backend; location / { return 200 "hello from nginx\n"; } }
}
CONF
  nginx -p "$work" -c "$work/nginx.conf" &
  pids+=($!)
}

bench_cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# bench_haproxy_http THREADS [CPUS]: HAProxy's configuration with THREADS
# threads (thread N on the Nth CPU of the list CPUS, like 0-1, if given) and
# an HTTP frontend on 127.0.0.1:28101 that keeps client and server connections.
bench_haproxy_http() {
  cat <<CONF
global
  nbthread $1
  ${2:+cpu-map auto:1/1-$1 $2}
  maxconn 8000
defaults
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend http
  mode http
  bind 127.0.0.1:28101
  option http-keep-alive
  default_backend http
backend http
  mode http
  http-reuse always
  server s1 $backend
CONF
}

lbctl() { target/release/lbctl --endpoint 127.0.0.1:28200 "$@"; }

# bench_lbnode_spec SPEC: once the lbnode started on 127.0.0.1:28200 answers,
# makes it a one-node cluster and applies the spec file SPEC.
bench_lbnode_spec() {
  for _ in $(seq 600); do lbctl cluster status >/dev/null 2>&1 && break; sleep 0.1; done
  lbctl cluster init >/dev/null
  lbctl config apply -f "$1" >/dev/null
}
