#!/usr/bin/env python3
"""Tests the tests: plants one mistake at a time in a scratch copy of the repository and checks
that deploy-check.sh fails on each, naming the check that should catch it. Not run by CI (about
20 s per mistake); run it after changing the checks:  python3 deploy/scripts/plant-mistakes.py
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def replace(path, old, new):
    def apply(root):
        p = root / path
        text = p.read_text()
        assert old in text, f"{path}: {old!r} not found"
        p.write_text(text.replace(old, new, 1))
    return apply


def rename(path, new):
    return lambda root: (root / path).rename(root / new)


MISTAKES = [
    ("a test file named like a rules file in rules/", rename("deploy/monitoring/tests/tls.test.yml", "deploy/monitoring/rules/tls.test.yml"), "rule hygiene"),
    ("an alert threshold its test does not expect", replace("deploy/monitoring/rules/cell.rules.yml", "nid:raft_apply_lag:entries > 1000", "nid:raft_apply_lag:entries > 5000"), "promtool test rules"),
    ("an alert reading a recording rule of another group", replace("deploy/monitoring/rules/cell.rules.yml",
        "expr: nid:raft_leader_changes:increase15m > 3", "expr: nid:cell_replicas_up:sum > 3"), "rule hygiene"),
    ("an alert whose runbook section does not exist", replace("deploy/monitoring/rules/cell.rules.yml", "RUNBOOK.md#nidfsyncslow", "RUNBOOK.md#nidfsynctooslow"), "rule hygiene"),
    ("invalid PromQL in a rule", replace("deploy/monitoring/rules/router.rules.yml", 'sum(rate(nid_auth_decisions_total{job="nid-cell",result="no"}[10m])) > 1', 'sum(rate(nid_auth_decisions_total{job="nid-cell",result="no"}[10m]) > 1'), "promtool check rules"),
    ("the dashboard JSON edited by hand", replace("deploy/monitoring/dashboards/nid-overview.json", '"title": "nid overview"', '"title": "nid overview (edited)"'), "dashboard JSON is fresh"),
    ("invalid PromQL in a dashboard panel", replace("deploy/monitoring/dashboards/generate.py", "sum by (grpc_method) (rate(nid_router_requests_total", "sum by (grpc_method) (rate(nid_router_requests_total{"), "dashboard PromQL parse"),
    ("a misspelt StatefulSet field (replica: 3)", replace("deploy/k8s/base/cell/statefulset.yaml", "  replicas: 3\n", "  replica: 3\n"), "kubernetes-validate"),
    ("routers' policy selector rewritten (the includeSelectors trap)", replace("deploy/k8s/base/policies/networkpolicies.yaml",
        "              app.kubernetes.io/component: router\n        - podSelector:", "              app.kubernetes.io/component: router\n              nid.example/cell: \"1\"\n        - podSelector:"), "structure test"),
    ("the control cell's egress policy turned into an ingress policy", replace("deploy/k8s/base/policies/networkpolicies.yaml", "      nid.example/role: control\n  policyTypes: [Egress]", "      nid.example/role: control\n  policyTypes: [Ingress]"), "structure test"),
    ("the zone spread made soft", replace("deploy/k8s/base/cell/statefulset.yaml", "whenUnsatisfiable: DoNotSchedule", "whenUnsatisfiable: ScheduleAnyway"), "structure test"),
    ("a cell's peers naming another cell's pods", replace("deploy/k8s/cells/cell-2/kustomization.yaml", "1=cell-2-0.cell-2:7000", "1=cell-1-0.cell-1:7000"), "structure test"),
    ("a container allowed to write its root filesystem", replace("deploy/k8s/base/router/deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"), "structure test"),
    ("a Dockerfile running as root", replace("deploy/images/Dockerfile.router", "USER 10001:10001", "USER root"), "hadolint"),
    ("an unquoted variable in a script", replace("deploy/compose/gen-secrets.sh", 'rm -rf "$dir"', "rm -rf $dir"), "shellcheck"),
    ("an unknown key in the compose file", replace("deploy/compose/docker-compose.yml", "stop_grace_period: 30s", "stop_grace_periods: 30s"), "docker-compose config"),
    ("a YAML indentation slip", replace("deploy/k8s/base/router/hpa.yaml", "  minReplicas: 2", "   minReplicas: 2"), "yamllint"),
    ("a Vector sink reading an undefined transform", replace("deploy/logging/vector-k8s.yaml", "inputs: [nid_parsed]", "inputs: [nid_parse]"), "logging configs"),
    ("the compose Prometheus config with a bad scrape interval", replace("deploy/compose/prometheus.yml", "scrape_interval: 5s", "scrape_interval: 5 seconds"), "promtool check config (compose)"),
]


def main():
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for what, plant, catcher in MISTAKES:
            root = Path(tmp) / "repo"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".git", ".out", "target", ".nid"))
            plant(root)
            r = subprocess.run(["bash", str(root / "deploy/scripts/deploy-check.sh")], capture_output=True, text=True)
            failed_lines = [l for l in r.stdout.splitlines() if l.startswith("FAIL")]
            caught = r.returncode != 0 and any(catcher in l for l in failed_lines)
            results.append(caught)
            names = "; ".join(l[6:].split("  ")[0].strip() for l in failed_lines)
            print(f"{'caught ' if caught else 'MISSED '} {what}: {names or 'no check failed'}")
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
