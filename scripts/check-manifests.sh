#!/usr/bin/env bash
# Static checks of what cannot run here (no cluster, no docker), for `make test`:
# 1. built-in kinds of config/ validate against the Kubernetes OpenAPI schemas (PyPI
#    kubernetes-validate, in a venv under target/), both the kustomize output (when a kustomize
#    or kubectl binary can build it) and each file the kustomization lists;
# 2. the moat CRs of config/samples validate against the generated CRD schemas (jsonschema);
# 3. shellcheck on scripts/*.sh (warnings and errors fail; info/style notes are shown);
# 4. every COPY source of the Dockerfile exists;
# 5. the alerting rules (config/prometheus/prometheusrule.yaml) pass `promtool check rules` and
#    their unit tests (config/prometheus/alerts-test.yaml, `promtool test rules`).
# Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.33.0}
VENV=target/manifest-venv
failed=0
finding() { echo "check-manifests: $*" >&2; failed=1; }

# python3-venv, shellcheck and promtool (prometheus), when the script runs outside `make test`.
scripts/debs.sh

if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  echo "check-manifests: installing kubernetes-validate into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r scripts/manifest-requirements.txt
fi
PY="$VENV/bin/python"

# 1. Built-in kinds.
files=$("$PY" - <<'PYEOF'
import yaml
k = yaml.safe_load(open("config/kustomization.yaml"))
for r in k.get("resources", []):
    print("config/" + r)
PYEOF
)
builtin=()
for f in $files; do
  [ -e "$f" ] || { finding "config/kustomization.yaml lists $f, which does not exist"; continue; }
  case "$f" in config/crd/*) ;; *) builtin+=("$f") ;; esac
done
# Samples of built-in kinds too (the moat CRs are checked against the CRD schemas below).
builtin+=(config/samples/starwars-networkpolicy.yaml)
if ! "$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${builtin[@]}" config/crd/*.yaml; then
  finding "built-in kinds do not validate against Kubernetes $K8S_VERSION"
fi
built=""
if command -v kustomize >/dev/null 2>&1; then
  built=$(kustomize build config) || finding "kustomize build config failed"
elif command -v kubectl >/dev/null 2>&1; then
  built=$(kubectl kustomize config) || finding "kubectl kustomize config failed"
else
  echo "check-manifests: no kustomize/kubectl here: validated each file of config/kustomization.yaml instead"
fi
if [ -n "$built" ]; then
  tmp=$(mktemp -d)
  printf '%s\n' "$built" > "$tmp/built.yaml"
  "$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "$tmp/built.yaml" \
    || finding "the kustomize output does not validate"
  rm -rf "$tmp"
fi

# 2. moat CRs against the CRD schemas, and the kustomization/monitoring files' own shape.
"$PY" scripts/check_crs.py || finding "moat custom resources or monitoring manifests are invalid"

# 3. shellcheck.
# Info and style notes are shown; warnings and errors fail.
shellcheck --severity=style scripts/*.sh || true
shellcheck --severity=warning scripts/*.sh || finding "shellcheck found problems in scripts/"

# 4. Dockerfile COPY sources (not --from=stage copies).
while read -r src; do
  [ -e "$src" ] || finding "Dockerfile copies $src, which does not exist"
done < <(awk 'toupper($1)=="COPY" && $0 !~ /--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' Dockerfile)

# 5. Alerting rules: promtool checks the PrometheusRule's groups and runs their unit tests.
rules_dir=$(mktemp -d)
if "$PY" - "$rules_dir/moat-rules.yaml" <<'PYEOF'
import sys
import yaml
rule = yaml.safe_load(open("config/prometheus/prometheusrule.yaml"))
if (rule.get("apiVersion"), rule.get("kind")) != ("monitoring.coreos.com/v1", "PrometheusRule"):
    sys.exit("config/prometheus/prometheusrule.yaml is not a monitoring.coreos.com/v1 PrometheusRule")
with open(sys.argv[1], "w") as f:
    yaml.safe_dump(rule["spec"], f)
PYEOF
then
  cp config/prometheus/alerts-test.yaml "$rules_dir/"
  promtool check rules "$rules_dir/moat-rules.yaml" >/dev/null \
    || finding "promtool check rules: config/prometheus/prometheusrule.yaml is invalid"
  (cd "$rules_dir" && promtool test rules alerts-test.yaml) \
    || finding "promtool test rules: config/prometheus/alerts-test.yaml fails"
else
  finding "config/prometheus/prometheusrule.yaml cannot be read"
fi
rm -rf "$rules_dir"

if [ "$failed" != 0 ]; then
  echo "check-manifests: FAILED" >&2
  exit 1
fi
echo "check-manifests: ok"
