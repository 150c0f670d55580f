#!/usr/bin/env python3
"""Writes the Grafana dashboards of this folder from the panel lists below.

    python3 dashboards/grafana/generate.py [DIR]   # rewrites dashboards/grafana/*.json (or DIR/*.json)

The JSON files are generated: edit this file and rerun it (a test checks that the committed
JSON matches the generator's output). Dashboards target Grafana 10/11 (schemaVersion 39), take
the Prometheus datasource as the `${DS_PROMETHEUS}` import input, and have a `replica`
variable (`replica_id` values) that every query filters on. Only metrics that vsrscope exports
appear: the seed phases without metrics yet (clock, repair budgets, scrubbing,
reconfiguration, standby) are left out instead of being shown empty.
"""

import json
import sys
from pathlib import Path

R = 'replica_id=~"$replica"'
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def timeseries(title, targets, unit="short", description="", stack=False):
    panel = {
        "type": "timeseries",
        "title": title,
        "description": description,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"stacking": {"mode": "normal" if stack else "none"}, "fillOpacity": 10},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": targets,
    }
    return panel


def stat(title, targets, unit="short", description="", mappings=None):
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or []}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "textMode": "value_and_name"},
        "targets": targets,
    }


def heatmap(title, expr, description=""):
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "options": {"calculate": False, "yAxis": {"unit": "ms"}, "cellGap": 1},
        "fieldConfig": {"defaults": {}, "overrides": []},
        "targets": [{"expr": expr, "format": "heatmap", "legendFormat": "{{le}}", "refId": "A"}],
    }


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def target(expr, legend, ref="A"):
    return {"expr": expr, "legendFormat": legend, "refId": ref}


def targets(*pairs):
    return [target(expr, legend, chr(ord("A") + index)) for index, (expr, legend) in enumerate(pairs)]


STATUS_MAPPINGS = [
    {"type": "value", "options": {
        "-1": {"text": "down", "color": "red"},
        "0": {"text": "normal", "color": "green"},
        "1": {"text": "view change", "color": "orange"},
        "2": {"text": "recovering", "color": "orange"},
        "3": {"text": "state transfer", "color": "orange"},
    }},
]


def latency_quantiles(name, title):
    return timeseries(
        title,
        targets(
            (f'{name}_p50{{{R}}}', "p50 replica {{replica_id}}"),
            (f'{name}_p95{{{R}}}', "p95 replica {{replica_id}}"),
            (f'{name}_p99{{{R}}}', "p99 replica {{replica_id}}"),
        ),
        unit="ms",
        description=f"From vsrscope's fine-grained histogram over its sliding window ({name}).",
    )


def histogram_quantile(name, title):
    return timeseries(
        title,
        targets(
            (f'histogram_quantile(0.5, sum by (le, replica_id) (rate({name}_bucket{{{R}}}[$__rate_interval])))', "p50 replica {{replica_id}}"),
            (f'histogram_quantile(0.99, sum by (le, replica_id) (rate({name}_bucket{{{R}}}[$__rate_interval])))', "p99 replica {{replica_id}}"),
        ),
        unit="ms",
        description=f"From the seed buckets of {name}.",
    )


DASHBOARDS = {
    "vsr-cluster-overview": ("VSR cluster overview", [
        row("Cluster"),
        # A down replica has no status gauge; a stat panel would show its last one as current.
        stat("Replica status", targets((f'(vsr_replica_status{{{R}}} + 0) or (vsr_replica_up{{{R}}} - 1)', "replica {{replica_id}}")),
             mappings=STATUS_MAPPINGS,
             description="-1 down (process gone or its snapshots stale: vsr_replica_up 0), 0 normal, 1 view change, "
                         "2 recovering, 3 state transfer."),
        stat("Replicas up / cluster size / quorum", targets(
            ("sum(vsr_replica_up)", "up"), ("max(vsr_cluster_size)", "cluster size"), ("max(vsr_quorum_size)", "quorum")),
             description="Fewer replicas up than the quorum: writes stall (Quorum Lost)."),
        stat("Quorum votes of the newest op", targets(("max(vsr_prepare_ok_votes)", "votes")),
             description="The primary's PrepareOk votes; below the quorum, writes stall (Quorum Lost)."),
        timeseries("View and commit progress", targets(
            (f'vsr_view_number{{{R}}}', "view replica {{replica_id}}"),
            (f'vsr_commit_number{{{R}}}', "commit replica {{replica_id}}"))),
        timeseries("Operations per second", targets(
            (f'sum by (replica_id, status) (rate(vsr_operations_total{{{R}}}[$__rate_interval]))', "replica {{replica_id}} {{status}}")),
            unit="ops"),
        timeseries("Pending requests", targets((f'vsr_pending_requests{{{R}}}', "replica {{replica_id}}"))),
        row("Latency"),
        latency_quantiles("vsr_client_latency_ms", "Client latency p50 / p95 / p99"),
        heatmap("Client latency heatmap", f'sum by (le) (rate(vsr_client_latency_ms_bucket{{{R}}}[$__rate_interval]))',
                description="Requests per second in each seed bucket of vsr_client_latency_ms."),
        latency_quantiles("vsr_prepare_latency_ms", "Prepare latency p50 / p95 / p99"),
        latency_quantiles("vsr_commit_latency_ms", "Commit latency p50 / p95 / p99"),
        histogram_quantile("vsr_client_latency_ms", "Client latency from buckets (p50, p99)"),
    ]),
    "vsr-replication-repair": ("VSR replication and repair", [
        row("Replication"),
        timeseries("Lag per replica", targets((f'vsr_replica_lag_operations{{{R}}}', "replica {{replica_id}}")), unit="short",
                   description="Ops the cluster committed that the replica has not executed (Replica Lag alert at 1000)."),
        timeseries("PrepareOk votes", targets((f'vsr_prepare_ok_votes{{{R}}}', "replica {{replica_id}}"))),
        timeseries("Op and commit numbers", targets(
            (f'vsr_op_number{{{R}}}', "op replica {{replica_id}}"),
            (f'vsr_commit_number{{{R}}}', "commit replica {{replica_id}}"))),
        timeseries("Messages sent per second by type", targets(
            (f'sum by (message_type) (rate(vsr_messages_sent_total{{{R}}}[$__rate_interval]))', "{{message_type}}"))),
        timeseries("Log size", targets((f'vsr_log_size_bytes{{{R}}}', "replica {{replica_id}}")), unit="bytes"),
        stat("State transfers", targets((f'sum(vsr_state_transfer_latency_ms_count{{{R}}})', "state transfers")),
             description="Checkpoints fetched from a peer by replicas that fell behind what the peers' journals hold (status 3 meanwhile)."),
        histogram_quantile("vsr_state_transfer_latency_ms", "State transfer latency from buckets (p50, p99)"),
        row("Repair"),
        timeseries("Repairs per second", targets(
            (f'sum by (replica_id, status) (rate(vsr_repairs_total{{{R}}}[$__rate_interval]))', "replica {{replica_id}} {{status}}"))),
        timeseries("Repairs in flight", targets((f'vsr_repair_inflight_count{{{R}}}', "replica {{replica_id}}"))),
        latency_quantiles("vsr_repair_latency_ms", "Repair latency p50 / p95 / p99"),
        row("Client sessions"),
        timeseries("Active client sessions", targets((f'vsr_client_sessions_active{{{R}}}', "replica {{replica_id}}"))),
        timeseries("Session evictions and duplicate requests per second", targets(
            (f'sum by (replica_id) (rate(vsr_client_sessions_evicted_total{{{R}}}[$__rate_interval]))', "evicted replica {{replica_id}}"),
            (f'sum by (replica_id) (rate(vsr_duplicate_requests_total{{{R}}}[$__rate_interval]))', "duplicates replica {{replica_id}}"))),
    ]),
    "vsr-failures": ("VSR failures", [
        row("View changes"),
        timeseries("View changes by reason", targets(
            (f'sum by (reason) (increase(vsr_view_changes_total{{{R}}}[$__rate_interval]))', "{{reason}}"))),
        latency_quantiles("vsr_view_change_latency_ms", "View change latency p50 / p95 / p99"),
        row("Integrity"),
        timeseries("Checksum failures by component", targets(
            (f'sum by (replica_id, component) (vsr_checksum_failures_total{{{R}}})', "replica {{replica_id}} {{component}}"))),
        timeseries("Byzantine rejections by reason", targets(
            (f'sum by (reason) (increase(vsr_byzantine_rejections_total{{{R}}}[$__rate_interval]))', "{{reason}}"))),
        timeseries("Scrub tours and corruptions found", targets(
            (f'sum by (replica_id) (increase(vsr_scrub_tours_completed_total{{{R}}}[$__rate_interval]))', "tours replica {{replica_id}}"),
            (f'sum by (replica_id) (increase(vsr_scrub_corruptions_detected_total{{{R}}}[$__rate_interval]))', "corruptions replica {{replica_id}}")),
            description="The background scrubber reads back every committed journal record kept, the checkpoint and the superblock copies once per tour."),
        timeseries("Scrub throughput", targets((f'vsr_scrub_throughput_ops_per_sec{{{R}}}', "replica {{replica_id}}")), unit="ops"),
        row("Recovery"),
        latency_quantiles("vsr_recovery_latency_ms", "Recovery latency p50 / p95 / p99"),
        stat("Recoveries", targets((f'sum(vsr_recovery_latency_ms_count{{{R}}})', "recoveries"))),
    ]),
    "vsr-resources": ("VSR resources and vsrscope", [
        row("Replica processes"),
        timeseries("Memory", targets((f'vsr_memory_used_bytes{{{R}}}', "replica {{replica_id}}")), unit="bytes"),
        timeseries("CPU", targets((f'vsr_cpu_utilization_percent{{{R}}}', "replica {{replica_id}}")), unit="percent"),
        timeseries("Network", targets((f'vsr_network_bandwidth_bytes_per_sec{{{R}}}', "replica {{replica_id}}")), unit="Bps"),
        timeseries("Disk IOPS", targets((f'vsr_disk_iops{{{R}}}', "replica {{replica_id}}")), unit="iops"),
        timeseries("Disk bandwidth", targets((f'vsr_disk_bandwidth_bytes_per_sec{{{R}}}', "replica {{replica_id}}")), unit="Bps"),
        timeseries("Bytes written to the log per second", targets(
            (f'sum by (replica_id) (rate(vsr_bytes_written_total{{{R}}}[$__rate_interval]))', "replica {{replica_id}}")), unit="Bps"),
        row("vsrscope"),
        stat("Attached probe sites", targets(("vsrscope_attached_sites", "sites"))),
        timeseries("Probe hits per second by program", targets(
            ("sum by (program) (rate(vsrscope_program_hits_total[$__rate_interval]))", "{{program}}"))),
        timeseries("Lost events and map read errors", targets(
            ("sum by (cause) (increase(vsrscope_lost_events_total[$__rate_interval]))", "lost {{cause}}"),
            ("increase(vsrscope_map_read_errors_total[$__rate_interval])", "map read errors"))),
        timeseries("Scrape duration", targets(("vsrscope_scrape_duration_seconds", "scrape")), unit="s"),
        timeseries("Pushes and failed pushes (OTLP, StatsD)", targets(
            ("sum by (exporter) (rate(vsrscope_pushes_total[$__rate_interval]))", "pushes {{exporter}}"),
            ("sum by (exporter) (increase(vsrscope_push_failures_total[$__rate_interval]))", "failed {{exporter}}"))),
    ]),
}


def layout(panels):
    """Rows span the width; other panels fill rows of three."""
    x, y, laid = 0, 0, []
    for index, panel in enumerate(panels):
        panel = dict(panel, id=index + 1)
        if panel["type"] != "row":
            panel["datasource"] = DATASOURCE
            for item in panel["targets"]:
                item["datasource"] = DATASOURCE
        if panel["type"] == "row":
            if x:
                x, y = 0, y + 8
            panel["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
            y += 1
        else:
            panel["gridPos"] = {"h": 8, "w": 8, "x": x, "y": y}
            x += 8
            if x >= 24:
                x, y = 0, y + 8
        laid.append(panel)
    return laid


def dashboard(uid, title, panels):
    return {
        "__inputs": [{
            "name": "DS_PROMETHEUS", "label": "Prometheus", "description": "Prometheus scraping vsrscope serve",
            "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus",
        }],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "uid": uid,
        "title": title,
        "tags": ["vsr", "vsrscope"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{
            "name": "replica", "label": "Replica", "type": "query", "datasource": DATASOURCE,
            # vsr_replica_up keeps a series for a down replica, whose other gauges are gone.
            "query": {"query": "label_values(vsr_replica_up, replica_id)", "refId": "replica"},
            "definition": "label_values(vsr_replica_up, replica_id)",
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 3,
        }]},
        "annotations": {"list": []},
        "links": [{"title": "Runbook", "type": "link", "url": "docs/runbook.md", "targetBlank": True}],
        "panels": layout(panels),
    }


def main():
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for uid, (title, panels) in DASHBOARDS.items():
        text = json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
        (folder / f"{uid}.json").write_text(text)


if __name__ == "__main__":
    main()
