#!/usr/bin/env python3
"""Structural check of the Vector configs in deploy/logging (Vector itself cannot be installed
here; see deploy/logging/README.md): every component's inputs exist, every source and transform
feeds something, every sink has inputs, and the remap programs read the fields nid writes."""
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1] / "logging"
NID_FIELDS = ("timestamp", "level", "message")


def main():
    problems = []
    files = sorted(ROOT.glob("vector-*.yaml"))
    if not files:
        problems.append("no vector-*.yaml in deploy/logging")
    for f in files:
        doc = yaml.safe_load(f.read_text())
        sources, transforms, sinks = (doc.get(k) or {} for k in ("sources", "transforms", "sinks"))
        if not sources or not sinks:
            problems.append(f"{f.name}: needs sources and sinks")
        producers = set(sources) | set(transforms)
        consumed = set()
        for kind, comps in (("transform", transforms), ("sink", sinks)):
            for name, comp in comps.items():
                if not comp.get("type"):
                    problems.append(f"{f.name}: {kind} {name} has no type")
                inputs = comp.get("inputs") or []
                if not inputs:
                    problems.append(f"{f.name}: {kind} {name} has no inputs")
                for i in inputs:
                    consumed.add(i)
                    if i not in producers:
                        problems.append(f"{f.name}: {kind} {name} reads {i}, which is not defined")
                if comp.get("type") == "remap":
                    program = comp.get("source", "")
                    if "parse_json(.message)" not in program:
                        problems.append(f"{f.name}: remap {name} does not parse nid's JSON lines")
                    for field in NID_FIELDS:
                        if f".{field}" not in program:
                            problems.append(f"{f.name}: remap {name} never reads .{field}")
        for name in sorted(producers - consumed):
            problems.append(f"{f.name}: {name} feeds nothing")
    for p in problems:
        print(f"check_logging: {p}")
    print(f"check_logging: {len(files)} configs, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
