#!/usr/bin/env python3
"""Checks of deploy/monitoring that promtool alone does not make.

- rules/ holds only *.rules.yml (Prometheus loads rules/*.rules.yml; tests live in tests/);
- every alert has severity critical|warning, summary, description and a runbook annotation whose
  anchor is a section of RUNBOOK.md;
- a rule that reads a recording rule finds it earlier in the same group (groups run concurrently);
- every alert has a promtool test case in which it fires, and every recording rule is exercised by
  a test (as an expression under test or through an alert whose test fires);
- every dashboard query parses (promtool check rules on a scratch file) and every recording rule it
  names exists.
Exit 1 with one line per problem.
"""
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "monitoring"
RECORD = re.compile(r"\bnid:[a-z0-9_:]+")


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
    for f in sorted(rules_dir.glob("*.rules.yml")):
        doc = yaml.safe_load(f.read_text())
        for group in doc["groups"]:
            seen = set()
            for rule in group["rules"]:
                used = set(RECORD.findall(rule["expr"]))
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
          f"{len(queries)} dashboard queries, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
