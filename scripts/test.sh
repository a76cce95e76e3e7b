#!/usr/bin/env bash
# Runs every test of the workspace, exactly as CI does (.ci/run calls this).
# Installs what the build and the tests need first; run it as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the build and the tests use (the VIP tests build network
# namespaces with iproute2 and partition them with iptables). protoc is not
# among them: it comes from the protoc-bin-vendored crate.
packages=(gcc libc6-dev iproute2 iptables)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# One optimised profile for everything: the end-to-end tests start the very
# lbnode and lbctl binaries built here.
cargo fmt --all -- --check
cargo build --profile ci --locked --bins
cargo clippy --profile ci --locked --all-targets -- -D warnings
cargo test --profile ci --locked --workspace
