"""The Grafana dashboard in the repository queries only metrics the suite and the emulator export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from azure_iot_emulator.metrics import EmulatorMetrics
from provkit.prometheus_metrics import PrometheusMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "src" / "devprov_demo" / "grafana" / "devprov-dashboard.json"
_NAME = re.compile(r"\b(?:devprov|iot_emulator|grpc_server)_[a-z0-9_]+\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def test_every_panel_queries_exported_metrics() -> None:
    emulator = EmulatorMetrics()
    emulator.watch(lambda: {"hub-a": 0}, lambda: [])
    known = exported(PrometheusMetrics().registry) | exported(emulator.registry)
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        for name in _NAME.findall(target["expr"])
    }
    assert len(queried) >= 15
    assert queried <= known, sorted(queried - known)
    # what the README's three examples are built on
    examples = {"devprov_enrollments_total", "devprov_refusals_total", "devprov_outbox_oldest_age_seconds"}
    assert examples <= queried
    # the fleet's certificates: by days to expiry, and renewals issued and refused (README: renewal)
    renewal = {
        "devprov_certificates_expiring",
        "devprov_renewals_issued_total",
        "devprov_renewals_refused_total",
    }
    assert renewal <= queried


def test_the_renewal_panels_group_by_the_labels_the_metrics_carry() -> None:
    labels = {
        "devprov_certificates_expiring": "within",
        "devprov_renewals_issued_total": "outcome",
        "devprov_renewals_refused_total": "reason",
    }
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    for metric, label in labels.items():
        expr = next(e for e in exprs if metric in e)
        assert f"by ({label})" in expr, expr
        assert f"{{{{{label}}}}}" in json.dumps(dashboard), label  # shown in the legend
