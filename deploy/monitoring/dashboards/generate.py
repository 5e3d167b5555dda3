#!/usr/bin/env python3
"""Generates the nid Grafana dashboard (nid-overview.json beside this file) from code.

    generate.py                 write nid-overview.json
    generate.py --check         exit 1 when the committed JSON differs from what this script makes,
                                or when the dashboard's structure is wrong
    generate.py --queries       print every panel query as JSON lines: {"panel", "expr", "expect_data"},
                                with Grafana variables replaced so promtool and Prometheus accept them

Only the standard library: the output is plain Grafana dashboard JSON (schemaVersion 39).
expect_data is false for series that exist only after an event (a failure, a snapshot, a retry) or
that the binaries do not export yet; the compose test requires data from every other query.
"""
import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("nid-overview.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
CELL = 'job="nid-cell",cell=~"$cell"'
ROUTER = 'job="nid-router"'
CONTROL = 'job="nid-cell"'
# Client traffic: the router also counts grpc.health.v1.Health probes, grpc.reflection.* calls and
# calls to services it does not have (grpc_service="unknown"); request panels leave them out, as the
# SLO rules do.
CLIENT = ROUTER + r',grpc_service=~"nid\\.v1\\..*"'
RI = "$__rate_interval"
# What the variables become for promtool and for the compose Prometheus.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$cell": ".*"}


class Dashboard:
    def __init__(self):
        self.panels = []
        self.expectations = []
        self.y = 0
        self.x = 0
        self.row_height = 0

    def row(self, title):
        self._newline()
        self.panels.append({
            "type": "row", "title": title, "collapsed": False, "id": len(self.panels) + 1,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
        })
        self.y += 1

    def _newline(self):
        if self.x:
            self.y += self.row_height
            self.x = 0
            self.row_height = 0

    def panel(self, kind, title, targets, unit="short", width=8, height=8, description="", stack=False):
        """targets: (expr, legend) or (expr, legend, expect_data)."""
        if self.x + width > 24:
            self._newline()
        built = []
        for i, t in enumerate(targets):
            expr, legend = t[0], t[1]
            expect = t[2] if len(t) > 2 else True
            built.append({"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)})
            self.expectations.append({"panel": title, "expr": expr, "expect_data": expect})
        panel = {
            "type": kind, "title": title, "description": description, "id": len(self.panels) + 1,
            "datasource": DS, "targets": built,
            "gridPos": {"h": height, "w": width, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"]["custom"] = {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                "stacking": {"mode": "normal" if stack else "none"},
            }
            panel["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                                "tooltip": {"mode": "multi"}}
        if kind == "stat":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "area"}
        self.panels.append(panel)
        self.x += width
        self.row_height = max(self.row_height, height)


def build():
    d = Dashboard()

    d.row("Cluster overview")
    d.panel("stat", "Cells with a leader", [(f'count(max by (cell) (nid_raft_has_leader{{{CELL}}}) == 1)', "cells")], width=4, height=5,
            description="Cells (the control cell included) where some replica knows a leader.")
    d.panel("stat", "Cells without a leader", [(f'count(max by (cell) (nid_raft_has_leader{{{CELL}}}) == 0) or vector(0)', "cells")], width=4, height=5)
    d.panel("stat", "Replicas up", [(f'sum(up{{{CELL}}})', "up"), (f'count(up{{{CELL}}})', "configured")], width=4, height=5)
    d.panel("stat", "Routers up", [(f'sum(up{{{ROUTER}}})', "up")], width=4, height=5)
    d.panel("stat", "Requests / s", [(f'sum(rate(nid_router_requests_total{{{CLIENT}}}[{RI}]))', "req/s")], unit="reqps", width=4, height=5,
            description="Client requests (nid.v1 services) through the routers; health probes and reflection are not counted.")
    d.panel("stat", "Firing nid alerts", [('count(ALERTS{alertstate="firing",alertname=~"Nid.*"}) or vector(0)', "alerts")], width=4, height=5)
    d.panel("timeseries", "Availability SLO: error ratio (budget 0.1%)", [
        ("nid:router_request_errors:ratio_rate5m", "5m"),
        ("nid:router_request_errors:ratio_rate1h", "1h"),
        ("nid:router_request_errors:ratio_rate6h", "6h"),
    ], unit="percentunit", width=12)
    d.panel("timeseries", "Latency SLO: share slower than 250 ms (budget 1%)", [
        ("nid:router_request_slow:ratio_rate5m", "5m"),
        ("nid:router_request_slow:ratio_rate1h", "1h"),
        ("nid:router_request_slow:ratio_rate6h", "6h"),
    ], unit="percentunit", width=12)

    d.row("Raft, per cell")
    d.panel("timeseries", "Leaders", [(f'nid_raft_is_leader{{{CELL}}} == 1', "cell {{cell}} node {{node}} ({{zone}})")], width=8,
            description="One line per cell: its leader's node and zone; a gap is a cell without a leader.")
    d.panel("timeseries", "Term", [(f'max by (cell) (nid_raft_term{{{CELL}}})', "cell {{cell}}")], width=8)
    d.panel("timeseries", "Leader changes (15 min)", [(f'max by (cell) (increase(nid_raft_leader_changes_seen_total{{{CELL}}}[15m]))', "cell {{cell}}")], width=8)
    d.panel("timeseries", "Apply lag (entries behind the cell's commit index)", [("nid:raft_apply_lag:entries", "cell {{cell}} node {{node}}")], width=8)
    d.panel("timeseries", "Commits / s", [(f'max by (cell) (rate(nid_raft_commit_index{{{CELL}}}[{RI}]))', "cell {{cell}}")], unit="ops", width=8)
    d.panel("timeseries", "Proposals committed / failed", [
        (f'sum by (cell) (rate(nid_raft_proposals_committed_total{{{CELL}}}[{RI}]))', "cell {{cell}} committed"),
        (f'sum by (cell, reason) (rate(nid_raft_proposals_failed_total{{{CELL}}}[{RI}]))', "cell {{cell}} failed: {{reason}}", False),
    ], unit="ops", width=12)
    d.panel("timeseries", "Raft log entries (compaction keeps it short)", [(f'nid_raft_log_entries{{{CELL}}}', "cell {{cell}} node {{node}}")], width=8)
    d.panel("timeseries", "Client queue (proposals and reads waiting for the Raft loop)", [(f'nid_raft_client_queue{{{CELL}}}', "cell {{cell}} node {{node}}")], width=8)
    d.panel("timeseries", "Buckets per cell and state", [(f'max by (cell, state) (nid_buckets{{{CELL},state!="not_owned"}})', "cell {{cell}} {{state}}")], width=8)
    d.panel("timeseries", "Voters per cell", [(f'max by (cell) (nid_raft_voters{{{CELL}}})', "cell {{cell}}")], width=8)
    d.panel("timeseries", "Group commit: commands per entry (p50)", [
        (f'histogram_quantile(0.5, sum by (cell, le) (rate(nid_raft_batch_commands_bucket{{{CELL}}}[{RI}])))', "cell {{cell}}"),
    ], width=12)
    d.panel("timeseries", "Replicas per zone and role", [(f'count by (zone, role) (nid_replica_info{{{CELL}}})', "{{zone}} {{role}}")], width=12, stack=True,
            description="From nid_replica_info. The replica's own cell, node, zone and role are its exported_* labels "
                        "(Prometheus renames them beside the scrape's target labels of the same names).")

    d.row("Requests")
    d.panel("timeseries", "Router requests / s by method", [(f'sum by (grpc_service, grpc_method) (rate(nid_router_requests_total{{{CLIENT}}}[{RI}]))', "{{grpc_service}}/{{grpc_method}}")], unit="reqps", width=8, stack=True,
            description="Client requests (nid.v1 services); health probes and reflection are left out.")
    d.panel("timeseries", "Router requests / s by code", [(f'sum by (grpc_code) (rate(nid_router_requests_total{{{CLIENT}}}[{RI}]))', "{{grpc_code}}")], unit="reqps", width=8, stack=True,
            description="Client requests (nid.v1 services) by gRPC code (OK, InvalidArgument, Unavailable, DeadlineExceeded...).")
    d.panel("timeseries", "Router p99 by method", [(f'histogram_quantile(0.99, sum by (grpc_method, le) (rate(nid_router_request_duration_seconds_bucket{{{CLIENT}}}[{RI}])))', "{{grpc_method}}")], unit="s", width=8,
            description="Time to the response headers of client requests (nid.v1 services).")
    d.panel("timeseries", "Cell requests / s by method", [(f'sum by (grpc_service, grpc_method) (rate(nid_grpc_server_handled_total{{{CELL}}}[{RI}]))', "{{grpc_service}}/{{grpc_method}}")], unit="reqps", width=12, stack=True)
    d.panel("timeseries", "Cell p99 by method", [(f'histogram_quantile(0.99, sum by (grpc_service, grpc_method, le) (rate(nid_grpc_server_handling_seconds_bucket{{{CELL}}}[{RI}])))', "{{grpc_service}}/{{grpc_method}}")], unit="s", width=12)

    d.row("Authentication")
    d.panel("timeseries", "Decisions / s: yes and no", [
        (f'sum by (result) (rate(nid_auth_decisions_total{{{CELL}}}[{RI}]))', "{{result}}"),
        (f'sum(rate(nid_auth_repeated_answers_total{{{CELL}}}[{RI}]))', "repeated (retry answered)", False),
    ], unit="ops", width=8, stack=True)
    d.panel("timeseries", "Partner calls refused at the router, by code", [
        (f'sum by (grpc_code) (rate(nid_router_requests_total{{{ROUTER},grpc_service="nid.v1.Authentication",grpc_method="Authenticate",grpc_code!="OK"}}[{RI}]))', "{{grpc_code}}", False),
    ], unit="reqps", width=8,
        description="Authenticate calls that ended without a decision: Unauthenticated and PermissionDenied are bad or revoked API keys.")
    d.panel("timeseries", "Share of no", [("nid:auth_decisions_no:ratio_rate10m", "no / all")], unit="percentunit", width=8)
    d.panel("timeseries", "No decisions / s by reason", [
        (f'sum by (reason) (rate(nid_auth_decisions_total{{{CELL},result="no"}}[{RI}]))', "{{reason}}", False),
    ], unit="ops", width=12, stack=True,
        description="The first reason of each no (PIN_MISMATCH, UNKNOWN_ID, TOO_MANY_FAILURES, AUTH_TYPE_LOCKED...).")
    d.panel("timeseries", "Unknown identifiers / s by partner", [
        (f'sum by (partner) (rate(nid_auth_unknown_identity_total{{{CELL}}}[{RI}]))', "{{partner}}", False),
    ], unit="ops", width=12, stack=True,
        description="Authentications of identifiers no identity has, per partner id: a broken integration or enumeration.")

    d.row("Storage and latency inside the cell")
    d.panel("timeseries", "Raft log fsync p99 / p50", [
        ("nid:raft_fsync_duration_seconds:p99_rate5m", "p99 cell {{cell}} node {{node}}"),
        (f'histogram_quantile(0.5, sum by (cell, node, le) (rate(nid_raft_fsync_duration_seconds_bucket{{{CELL}}}[{RI}])))', "p50 cell {{cell}} node {{node}}"),
    ], unit="s", width=8)
    d.panel("timeseries", "Apply p99 per Ready", [
        (f'histogram_quantile(0.99, sum by (cell, node, le) (rate(nid_raft_apply_duration_seconds_bucket{{{CELL}}}[{RI}])))', "cell {{cell}} node {{node}}"),
    ], unit="s", width=8)
    d.panel("timeseries", "RocksDB size", [(f'nid_rocksdb_size_bytes{{{CELL}}}', "cell {{cell}} node {{node}}")], unit="bytes", width=8)
    d.panel("timeseries", "Log entries compacted / s", [(f'sum by (cell, node) (rate(nid_raft_log_compacted_entries_total{{{CELL}}}[{RI}]))', "cell {{cell}} node {{node}}")], unit="ops", width=8)
    d.panel("timeseries", "Snapshots by operation", [(f'sum by (cell, op) (increase(nid_raft_snapshots_total{{{CELL}}}[{RI}]))', "cell {{cell}} {{op}}", False)], width=8)
    d.panel("timeseries", "Data disk free", [("nid:disk_available:ratio", "cell {{cell}} node {{node}}")], unit="percentunit", width=8,
            description="nid_disk_available_bytes / nid_disk_capacity_bytes of the filesystem holding the data directory.")
    d.panel("timeseries", "Sweeps: expired entries deleted / s", [
        (f'sum by (cell) (rate(nid_swept_entries_total{{{CELL}}}[{RI}]))', "cell {{cell}} entries"),
        (f'sum by (cell) (rate(nid_sweeps_total{{{CELL}}}[{RI}]))', "cell {{cell}} sweeps"),
    ], unit="ops", width=8,
        description="Replay markers and request records past their window deleted by the leader's sweeps (nid_swept_entries_total), and the sweeps (nid_sweeps_total).")

    d.row("Router")
    d.panel("timeseries", "Forwarding retries / s by reason", [(f'sum by (reason) (rate(nid_router_retries_total{{{ROUTER}}}[{RI}]))', "{{reason}}", False)], unit="ops", width=8, stack=True,
            description="not_leader (a follower answered; elections), wrong_owner (a bucket moved; the table is refreshed), "
                        "retry_later (the cell asked to wait), overloaded (the cell shed load), timeout (an attempt ran out; the replica is probed), "
                        "unavailable (replica down or unreachable; the next one is tried).")
    d.panel("timeseries", "Retries per client request", [
        (f'sum(rate(nid_router_retries_total{{{ROUTER}}}[{RI}])) / sum(rate(nid_router_requests_total{{{CLIENT}}}[{RI}]))', "retries / request", False),
    ], unit="percentunit", width=8)
    d.panel("timeseries", "Routing-table version", [(f'nid_router_table_version{{{ROUTER}}}', "{{instance}}")], width=8)
    d.panel("timeseries", "Per-cell concurrency limit (adaptive)", [
        (f'max by (cell) (nid_router_cell_concurrency_limit{{{ROUTER}}})', "cell {{cell}}"),
    ], width=12,
        description="Requests each router forwards to a cell at once (max over routers): it shrinks when the cell's mean round trip "
                    "exceeds --cell-latency-target-ms and grows back while the limit is in use and the cell keeps up.")
    d.panel("timeseries", "Requests refused at a cell's limit / s", [
        (f'sum by (cell, why) (rate(nid_router_cell_refused_total{{{ROUTER}}}[{RI}]))', "cell {{cell}} {{why}}", False),
    ], unit="ops", width=12, stack=True,
        description="RESOURCE_EXHAUSTED / OVERLOADED answers because the cell was at its limit: waited (no permit within 4x the "
                    "target for a burst, a third of it once the cell is congested) or queue_full (4x the limit waiting). Sustained: the "
                    "cell lacks capacity (NidCellOverloaded).")

    # The rebalancer's metrics come from every control replica, only the leader's move: max or sum
    # over the instances, not filtered by $cell (the control cell is cell 0).
    d.row("Rebalance")
    d.panel("timeseries", "Buckets per data cell: owned vs desired", [
        (f'max by (exported_cell, kind) (nid_rebalance_cell_buckets{{{CONTROL},exported_cell=~"$cell"}})', "cell {{exported_cell}} {{kind}}"),
    ], width=12,
        description="From the control leader: buckets each data cell owns in the routing table (owned) and would own under the "
                    "desired placement (desired). The metric's own cell label is exported_cell (the scrape's cell label is the control cell's, 0).")
    d.panel("timeseries", "Misplaced buckets", [(f'max(nid_rebalance_misplaced_buckets{{{CONTROL}}})', "misplaced")], width=6,
            description="Buckets whose owner differs from the desired placement: non-zero while a rebalance is pending or running.")
    d.panel("timeseries", "Moves in flight (paused = 1)", [
        (f'max(nid_rebalance_in_flight{{{CONTROL}}})', "moves in flight"),
        (f'max(nid_rebalance_paused{{{CONTROL}}})', "paused"),
    ], width=6, description="Moves (batches of up to 64 buckets) in flight; paused is 1 while an operator paused the rebalancer.")
    d.panel("timeseries", "Copy rate", [
        ('nid:migration_bytes:rate5m{cell=~"$cell"}', "cell {{cell}} {{direction}}", False),
        (f'sum(rate(nid_rebalance_copied_bytes_total{{{CONTROL}}}[{RI}]))', "moves ended (control leader)"),
    ], unit="Bps", width=8,
        description="Bytes of bucket data the data cells export and import for moves, as the chunks go (5-minute rate), and the bytes "
                    "of the moves the control leader finished (counted when a move ends).")
    d.panel("timeseries", "Buckets moved / s: committed, aborted by reason", [
        (f'sum(rate(nid_rebalance_moves_total{{{CONTROL},result="committed"}}[{RI}]))', "committed", False),
        (f'sum by (reason) (rate(nid_rebalance_moves_total{{{CONTROL},result="aborted"}}[{RI}]))', "aborted: {{reason}}", False),
    ], width=8,
        description="Counted in buckets (a move carries up to 64). Aborted moves are undone and planned again; reasons: unreachable, "
                    "checksum, owner_changed, refused, unknown_cell.")
    d.panel("timeseries", "Freeze p50 / p99 (15 min)", [
        ("nid:rebalance_freeze_seconds:p99_rate15m", "p99", False),
        (f'histogram_quantile(0.5, sum by (le) (rate(nid_rebalance_freeze_seconds_bucket{{{CONTROL}}}[15m])))', "p50", False),
    ], unit="s", width=8,
        description="How long a moved batch refused writes (they wait in the routers meanwhile); target p99 250 ms or less. "
                    "Over 15 minutes: there is one freeze per move.")

    return d


def dashboard_json(d):
    return {
        "uid": "nid-overview",
        "title": "nid overview",
        "description": "Generated by deploy/monitoring/dashboards/generate.py; do not edit by hand.",
        "tags": ["nid"],
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "utc",
        "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
             "current": {}, "hide": 0},
            {"name": "cell", "type": "query", "label": "Cell", "datasource": DS,
             "query": {"query": 'label_values(nid_raft_term{job="nid-cell"}, cell)', "refId": "cell"},
             "definition": 'label_values(nid_raft_term{job="nid-cell"}, cell)',
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}, "hide": 0},
        ]},
        "panels": d.panels,
    }


def structure_errors(dash):
    errors = []
    ids = [p["id"] for p in dash["panels"]]
    if len(ids) != len(set(ids)):
        errors.append("panel ids are not unique")
    for p in dash["panels"]:
        g = p["gridPos"]
        if g["x"] < 0 or g["w"] <= 0 or g["x"] + g["w"] > 24:
            errors.append(f"panel {p['title']!r}: gridPos outside the 24 columns")
        if p["type"] == "row":
            continue
        if not p.get("targets"):
            errors.append(f"panel {p['title']!r}: no query")
        for t in p.get("targets", []):
            if not t.get("expr") or not t.get("refId") or t.get("datasource") != DS:
                errors.append(f"panel {p['title']!r}: a target lacks expr, refId or the datasource variable")
    titles = [p["title"] for p in dash["panels"]]
    if len(titles) != len(set(titles)):
        errors.append("panel titles are not unique")
    return errors


def render(dash):
    return json.dumps(dash, indent=2, sort_keys=True) + "\n"


def substitute(expr):
    for k, v in SUBSTITUTIONS.items():
        expr = expr.replace(k, v)
    return expr


def main(argv):
    d = build()
    dash = dashboard_json(d)
    errors = structure_errors(dash)
    if errors:
        for e in errors:
            print(f"dashboard: {e}", file=sys.stderr)
        return 1
    text = render(dash)
    if argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"dashboard: {OUT.name} is stale or edited by hand; run {Path(__file__).name} and commit the result",
                  file=sys.stderr)
            return 1
        # The committed file must also be what Grafana would load: parse it back.
        json.loads(OUT.read_text())
        return 0
    if argv[1:] == ["--queries"]:
        for e in d.expectations:
            print(json.dumps({**e, "expr": substitute(e["expr"])}))
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
