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


def test_retention_alert_matches_its_topic_series_with_the_retention_gauge() -> None:
    """``DedupeRetentionTooShort`` compares a ``{topic}`` series with the label-less
    ``dedupe_retention_seconds``. A PromQL matching modifier belongs to the operator it
    follows: in ``A > 0.8 * on() group_left() max(R)`` it modifies ``*``, between a
    scalar and a vector, where Prometheus drops it silently (promql/parser checkAST:
    no matching labels, so no error, ``VectorMatching = nil``). What is left,
    ``A{topic="x"} > {}``, matches on all labels, never matches, and the alert can
    never fire. It must be ``A > on() group_left() (0.8 * max(R))``."""
    text = (REPO / "config" / "prometheus-alerts.yaml").read_text()
    rule = text[text.index("alert: DedupeRetentionTooShort") :]
    expr = next(line for line in rule.splitlines() if line.strip().startswith("expr:"))
    assert re.search(r">\s*on\(\s*\)\s*group_left", expr), (
        f"the comparison has no on() group_left(): it never matches a topic series: {expr}"
    )
    assert not re.search(r"[0-9.]+\s*\*\s*on\(", expr), f"matching on a scalar product: {expr}"
