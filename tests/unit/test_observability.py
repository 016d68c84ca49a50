"""Shipped monitoring config must only name metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dedupe_consumer.models import DeadLetterReason, Decision
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
    never fire. It must be ``A > on(job) group_left() (0.8 * max by (job) (R))``: each
    consumer (job) against its own retention, not the longest of all the jobs scraped."""
    text = (REPO / "config" / "prometheus-alerts.yaml").read_text()
    rule = text[text.index("alert: DedupeRetentionTooShort") :]
    expr = next(line for line in rule.splitlines() if line.strip().startswith("expr:"))
    assert re.search(r">\s*on\(\s*job\s*\)\s*group_left", expr), (
        f"the comparison has no on() group_left(): it never matches a topic series: {expr}"
    )
    assert not re.search(r"[0-9.]+\s*\*\s*on\(", expr), f"matching on a scalar product: {expr}"


DASHBOARDS = sorted((REPO / "config" / "grafana").glob("*.json"))


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every panel target of every dashboard."""
    found: list[tuple[str, str, str]] = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            found.extend((path.name, panel["title"], t["expr"]) for t in panel["targets"])
    return found


def test_dashboards_name_only_real_metrics() -> None:
    assert [p.name for p in DASHBOARDS] == ["debug.json", "on-call.json", "overview.json"]
    exported = exported_names()
    for dashboard, title, expr in dashboard_targets():
        used = set(re.findall(r"\b(dedupe_[a-z_]+)\b", expr))
        assert used, f"{dashboard} / {title}: no dedupe metric in {expr}"
        assert used <= exported, f"{dashboard} / {title}: unknown {used - exported} in {expr}"


def test_dashboards_are_importable() -> None:
    """What Grafana's import needs, and what the panels rely on."""
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36, path
        assert board["uid"] and board["title"], path
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["topic"]["type"] == "query"
        assert variables["topic"]["definition"].startswith("label_values(dedupe_")
        ids: set[int] = set()
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            assert panel["id"] not in ids, (path.name, panel["title"])
            ids.add(panel["id"])
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, (path.name, panel["title"])
            taken = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not taken & cells, f"{path.name} / {panel['title']} overlaps another panel"
            cells |= taken
            assert panel["targets"], (path.name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"
                if "topic" in target["expr"] and "{" in target["expr"]:
                    assert 'topic=~"$topic"' in target["expr"], target["expr"]


def test_every_decision_and_reason_is_a_series_once_a_topic_is_assigned() -> None:
    """Conflicts and dead letters show 0, not "no data", before the first one."""
    metrics = Metrics()
    metrics.topic_seen("orders", "retry")
    samples = {
        (s.name, tuple(sorted(s.labels.items())))
        for family in metrics.registry.collect()
        for s in family.samples
    }
    for decision in Decision:
        assert (
            "dedupe_events_total",
            (("decision", decision.value), ("topic", "orders")),
        ) in samples
    assert ("dedupe_events_total", (("decision", "conflict"), ("topic", "orders"))) in samples
    for reason in DeadLetterReason:
        assert (
            "dedupe_dead_letters_total",
            (("reason", reason.value), ("topic", "orders")),
        ) in samples
    assert (
        "dedupe_uncertain_outcomes_total",
        (("policy", "retry"), ("topic", "orders")),
    ) in samples
