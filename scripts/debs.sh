#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use, only those missing.
set -euo pipefail
wanted=(iproute2 iputils-ping nftables iptables iperf3 wrk nginx jq prometheus shellcheck python3-venv)
missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "debs: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
