#!/usr/bin/env python3
"""Checks of deploy/monitoring that promtool alone does not make.

- rules/ holds only *.rules.yml (Prometheus loads rules/*.rules.yml; tests live in tests/);
- every alert has severity critical|warning, summary, description and a runbook annotation whose
  anchor is a section of RUNBOOK.md;
- a rule that reads a recording rule finds it earlier in the same group (groups run concurrently);
- every alert has a promtool test case in which it fires, and every recording rule is exercised by
  a test (as an expression under test or through an alert whose test fires);
- every dashboard query parses (promtool check rules on a scratch file) and every recording rule it
  names exists;
- every nid_* metric a rule or a dashboard query reads is registered somewhere in the Rust sources
  (a "nid_..." string literal; histograms also as _bucket, _count, _sum), but for the metrics in
  AWAITED, which rules watch ahead of the code and which must not be exported yet (once they are,
  drop them from AWAITED and check the rules against the real labels).
Exit 1 with one line per problem.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "monitoring"
REPO = ROOT.parents[1]
RECORD = re.compile(r"\bnid:[a-z0-9_:]+")
METRIC = re.compile(r"\bnid_[a-z0-9_]+")
EXPORTED = re.compile(r'"(nid_[a-z0-9_]+)"')
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Read by rules before any process exports them: name -> why.
AWAITED: dict[str, str] = {}


def exported_metrics():
    names = set()
    for top, dirs, files in os.walk(REPO):
        # Not into build output, deploy/ or hidden directories (.git, caches).
        dirs[:] = [d for d in dirs if d not in ("target", "deploy") and not d.startswith(".")]
        for name in files:
            if name.endswith(".rs"):
                names.update(EXPORTED.findall(Path(top, name).read_text(errors="replace")))
    return names


def unknown_metric(name, exported):
    if name in exported:
        return False
    return not any(name.endswith(s) and name[: -len(s)] in exported for s in HISTOGRAM_SUFFIXES)


def anchors(markdown):
    out = set()
    for line in markdown.splitlines():
        if line.startswith("## "):
            out.add(re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-"))
    return out


def main():
    problems = []
    rules_dir = ROOT / "rules"
    for f in sorted(rules_dir.iterdir()):
        if not f.name.endswith(".rules.yml"):
            problems.append(f"{f}: only *.rules.yml files belong in rules/ (Prometheus loads rules/*.rules.yml)")
    runbook = anchors((ROOT / "RUNBOOK.md").read_text())
    alerts, records = {}, {}
    exported = exported_metrics()
    read = {}  # metric -> where it is read
    for f in sorted(rules_dir.glob("*.rules.yml")):
        doc = yaml.safe_load(f.read_text())
        for group in doc["groups"]:
            seen = set()
            for rule in group["rules"]:
                used = set(RECORD.findall(rule["expr"]))
                for metric in METRIC.findall(rule["expr"]):
                    read.setdefault(metric, f"{f.name}: {rule.get('alert') or rule.get('record')}")
                for name in sorted(used - seen):
                    where = "another group or later" if name in records or name in {
                        r.get("record") for r in group["rules"]} else "nowhere"
                    problems.append(f"{f.name}: {rule.get('alert') or rule.get('record')} reads {name}, "
                                    f"defined {where}: define it earlier in group {group['name']}")
                if "record" in rule:
                    seen.add(rule["record"])
                    records[rule["record"]] = (f.name, group["name"])
                    continue
                name = rule["alert"]
                alerts[name] = (f.name, used)
                labels, ann = rule.get("labels", {}), rule.get("annotations", {})
                if labels.get("severity") not in ("critical", "warning"):
                    problems.append(f"{f.name}: {name}: severity must be critical or warning")
                for key in ("summary", "description", "runbook"):
                    if not ann.get(key):
                        problems.append(f"{f.name}: {name}: annotation {key} missing")
                link = ann.get("runbook", "")
                if "#" not in link or link.split("#", 1)[1] not in runbook:
                    problems.append(f"{f.name}: {name}: runbook {link!r} is not a section of RUNBOOK.md")

    fired, tested_exprs = set(), ""
    for f in sorted((ROOT / "tests").glob("*.yml")):
        doc = yaml.safe_load(f.read_text())
        for test in doc.get("tests", []):
            for case in test.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    fired.add(case["alertname"])
            for case in test.get("promql_expr_test", []):
                tested_exprs += " " + case["expr"]
    for name in sorted(set(alerts) - fired):
        problems.append(f"{alerts[name][0]}: alert {name} has no test case in which it fires")
    exercised = set(RECORD.findall(tested_exprs))
    for name, (_, used) in alerts.items():
        if name in fired:
            exercised |= used
    for name in sorted(set(records) - exercised):
        problems.append(f"{records[name][0]}: recording rule {name} is exercised by no test")

    queries = subprocess.run([sys.executable, str(ROOT / "dashboards" / "generate.py"), "--queries"],
                             check=True, capture_output=True, text=True).stdout.splitlines()
    queries = [json.loads(q) for q in queries]
    for q in queries:
        for name in RECORD.findall(q["expr"]):
            if name not in records:
                problems.append(f"dashboard panel {q['panel']!r} reads {name}, which no rule records")
    for q in queries:
        for metric in METRIC.findall(q["expr"]):
            read.setdefault(metric, f"dashboard panel {q['panel']!r}")
    for metric, where in sorted(read.items()):
        if metric in AWAITED:
            continue
        if unknown_metric(metric, exported):
            problems.append(f"{where} reads {metric}, which no Rust source registers (renamed or removed?)")
    for metric, why in sorted(AWAITED.items()):
        if not unknown_metric(metric, exported):
            problems.append(f"{metric} is exported now: remove it from AWAITED ({why}) and check its rules' labels")
    if len(exported) < 10:
        problems.append(f"found only {len(exported)} metric names in the Rust sources under {REPO}: is the search broken?")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "dashboard.rules.yml"
        scratch.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard_query_{i}", "expr": q["expr"]} for i, q in enumerate(queries)]}]}))
        r = subprocess.run(["promtool", "check", "rules", str(scratch)], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append("dashboard queries do not all parse:\n" + r.stdout + r.stderr)

    for p in problems:
        print(f"check_monitoring: {p}")
    print(f"check_monitoring: {len(alerts)} alerts, {len(records)} recording rules, "
          f"{len(queries)} dashboard queries, {len(read)} metrics read ({len(exported)} registered in the code), "
          f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
