"""Shipped monitoring config must only name metrics that exist."""

from __future__ import annotations

import re
from pathlib import Path

from dedupe_consumer.observability import Metrics

REPO = Path(__file__).resolve().parents[2]


def exported_names() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type in ("counter",):
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def test_alert_rules_name_only_real_metrics() -> None:
    lines = (REPO / "config" / "prometheus-alerts.yaml").read_text().splitlines()
    exprs = [line for line in lines if line.strip().startswith("expr:")]
    used = {name for line in exprs for name in re.findall(r"\b(dedupe_[a-z_]+)\b", line)}
    assert used, "no metric found in the alert rules"
    assert used <= exported_names(), used - exported_names()


def test_no_metric_is_labelled_by_event_id() -> None:
    for family in Metrics().registry.collect():
        for sample in family.samples:
            assert not {"id", "event_id", "event"} & set(sample.labels), family.name
