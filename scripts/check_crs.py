"""Static checks for scripts/check-manifests.sh that kubernetes-validate cannot do:

- every moat custom resource in config/samples validates against the openAPIV3Schema of the
  generated CRD (config/crd) for its kind and version;
- the kustomization lists no sample and no monitoring extra (they need CRDs or choices the base
  install must not impose);
- the ServiceMonitor selects the metrics Service's labels and port name;
- the Grafana dashboard parses and queries only moat metrics that DESIGN.md names.

Exits 1 on any finding, printing each.
"""
import glob
import json
import sys

import jsonschema
import yaml

findings = []


def find(msg):
    findings.append(msg)
    print(f"check_crs: {msg}", file=sys.stderr)


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


schemas = {}
for crd_file in sorted(glob.glob("config/crd/*.yaml")):
    for crd in docs(crd_file):
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schemas[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
if not schemas:
    find("no CRD schema found in config/crd")

checked = 0
for sample in sorted(glob.glob("config/samples/*.yaml")):
    for i, doc in enumerate(docs(sample), 1):
        key = (doc.get("apiVersion"), doc.get("kind"))
        if not str(key[0]).startswith("moat.dev/"):
            continue
        schema = schemas.get(key)
        if schema is None:
            find(f"{sample} document {i}: no CRD for {key[0]} {key[1]}")
            continue
        validator = jsonschema.Draft7Validator(schema)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            path = "/".join(str(p) for p in err.path)
            find(f"{sample} document {i} ({key[1]} {doc.get('metadata', {}).get('name')}): {path}: {err.message}")
        checked += 1
if checked == 0:
    find("no moat custom resource found in config/samples")

kust = docs("config/kustomization.yaml")[0]
for r in kust.get("resources", []):
    if r.startswith(("samples", "prometheus", "grafana")):
        find(f"config/kustomization.yaml must not install {r}")

svc = docs("config/agent/service.yaml")[0]
sm = docs("config/prometheus/servicemonitor.yaml")[0]
if sm.get("kind") != "ServiceMonitor" or sm.get("apiVersion") != "monitoring.coreos.com/v1":
    find("config/prometheus/servicemonitor.yaml is not a monitoring.coreos.com/v1 ServiceMonitor")
sel = sm["spec"]["selector"]["matchLabels"]
labels = svc["metadata"].get("labels", {})
if any(labels.get(k) != v for k, v in sel.items()):
    find(f"ServiceMonitor selector {sel} does not match the Service labels {labels}")
ports = {p.get("name") for p in svc["spec"]["ports"]}
for ep in sm["spec"]["endpoints"]:
    if ep.get("port") not in ports:
        find(f"ServiceMonitor endpoint port {ep.get('port')} is not a port of the Service ({ports})")

known = {
    "moat_verdicts_total", "moat_policy_rule_packets_total", "moat_policy_rule_bytes_total",
    "moat_l7_requests_total", "moat_endpoints", "moat_identities", "moat_map_entries",
    "moat_map_capacity", "moat_reconcile_duration_seconds_bucket",
    "moat_policy_apply_latency_seconds_bucket", "moat_build_info",
}
import re

with open("config/grafana/moat-dashboard.json") as f:
    dash = json.load(f)
used = set()
for panel in dash.get("panels", []):
    for t in panel.get("targets", []):
        used.update(re.findall(r"\bmoat_[a-z0-9_]+", t.get("expr", "")))
for v in dash.get("templating", {}).get("list", []):
    used.update(re.findall(r"\bmoat_[a-z0-9_]+", json.dumps(v.get("query", ""))))
for name in sorted(used - known):
    find(f"the Grafana dashboard queries {name}, which DESIGN.md does not name")
titles = " ".join(p.get("title", "") for p in dash.get("panels", [])).lower()
for want in ["verdict", "drops", "dropping policies", "l7", "map fill"]:
    if want not in titles:
        find(f"the Grafana dashboard has no panel about {want!r}")

sys.exit(1 if findings else 0)
