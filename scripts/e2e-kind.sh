#!/usr/bin/env bash
# `make e2e-kind`: moat's end-to-end suite on a kind cluster (e2e/kind). Exits 2, saying what
# is missing, when docker's engine is unreachable or kind/kubectl are not installed: never a
# silent pass. MOAT_E2E_KEEP=1 keeps the cluster and the test namespaces afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if ! command -v docker >/dev/null 2>&1; then
  missing+=("docker (not installed)")
elif ! docker info >/dev/null 2>&1; then
  missing+=("a reachable docker engine (\`docker info\` fails)")
fi
command -v kind >/dev/null 2>&1 || missing+=("kind (https://kind.sigs.k8s.io)")
command -v kubectl >/dev/null 2>&1 || missing+=("kubectl")
if [ ${#missing[@]} -gt 0 ]; then
  echo "e2e-kind: cannot run, missing:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  exit 2
fi

export MOAT_E2E_KIND=1
cluster=${MOAT_E2E_CLUSTER:-moat-e2e}
status=0
# One test at a time: they share the namespaces x, y, z and the agents.
cargo test --release -p moat-e2e-kind -- --test-threads=1 --nocapture || status=$?
if [ "${MOAT_E2E_KEEP:-0}" != 1 ]; then
  kind delete cluster --name "$cluster" || true
else
  echo "e2e-kind: MOAT_E2E_KEEP=1, keeping cluster $cluster (kubectl --context kind-$cluster ...)"
fi
exit "$status"
