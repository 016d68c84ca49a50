"""Every Grafana dashboard query returns data from a real Prometheus scraping a real consumer.

Prometheus (Debian's ``prometheus`` package) runs on loopback with a temporary
storage directory and a 1 s scrape interval, scraping the ``/metrics`` endpoint that
``run()`` serves (``observability.metrics_port``); it loads the shipped alert rules
too. The consumer runs twice against the real broker, with one ``Metrics``: the
second run restores its partitions from the changelog and decides duplicates, a
conflict and a dead letter while Prometheus has already seen the series, so that
rates, quantiles and increases over the window all have something to show.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dedupe_consumer import DedupeConsumer, Event, Handler
from dedupe_consumer.observability import Metrics
from dedupe_consumer.testing.prometheus import (
    Prometheus,
    PrometheusError,
    api,
    dashboard_queries,
    free_port,
)
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import produce_events, produce_raw, settings_for, wait_for

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "config" / "grafana").glob("*.json"))
ALERTS = REPO / "config" / "prometheus-alerts.yaml"


class Counting(Handler):
    def __init__(self) -> None:
        self.handled = 0

    def handle(self, event: Event) -> None:
        self.handled += 1


def produce_wave(bootstrap: str, topic: str, seed: int, known: list[str]) -> int:
    """Events with duplicates (of this wave and earlier ones), one conflict (a known ID,
    another payload) and one message without an ID (a dead letter). Returns the count."""
    sent = produce_events(bootstrap, topic, 150, duplicates=0.2, seed=seed, ids=known)
    produce_raw(
        bootstrap,
        topic,
        [
            {  # same key, so the same partition: dedupe is per partition
                "key": known[0].encode(),
                "value": b'{"changed": true}',
                "headers": [("event-id", known[0])],
            },
            {"key": b"no-id", "value": b"{}"},
        ],
    )
    return len(sent) + 2


@contextlib.contextmanager
def running(consumer: DedupeConsumer) -> Iterator[DedupeConsumer]:
    """``consumer.run()`` on a thread until the block ends (then it stops, as on SIGTERM)."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run(until=lambda t: stop.is_set(), install_signal_handlers=False)
        except BaseException as exc:
            failed.append(exc)

    runner = threading.Thread(target=run, name="consumer")
    runner.start()
    try:
        yield consumer
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive(), "the consumer did not stop"
    assert not failed, failed


def test_every_dashboard_query_returns_data(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    port = free_port()
    settings = settings_for(
        kafka_bootstrap,
        topic,
        tmp_path / "state",
        observability={"metrics_port": port, "progress_interval": "0s"},
        dedupe={"on_conflict": "skip"},
    )
    metrics = Metrics()  # one registry for both runs: counters go on, as in one process
    known: list[str] = []
    with Prometheus([f"127.0.0.1:{port}"], tmp_path / "prometheus", rule_files=[ALERTS]) as prom:
        consumed = f'sum(dedupe_events_total{{topic="{topic}"}})'

        def scraped(total: int) -> None:
            wait_for(
                lambda: [float(s["value"][1]) for s in prom.query(consumed)] == [total],
                30,
                f"Prometheus to scrape {total} decisions",
            )

        # The first run: its series (restores included) are scraped before the second
        # run adds to them, so that rates over the window see increases.
        total = produce_wave(kafka_bootstrap, topic, 1, known)
        with running(DedupeConsumer(Counting(), settings, metrics=metrics)) as first:
            scraped(total)
        assert first.totals.conflicts == 1 and first.totals.dead_lettered == 1

        with running(DedupeConsumer(Counting(), settings, metrics=metrics)) as second:
            total += produce_wave(kafka_bootstrap, topic, 2, known)
            scraped(total)
            assert second.totals.conflicts == 1 and second.totals.dead_lettered == 1

            variables = {"topic": topic, "__rate_interval": "1m", "__range": "1m"}
            queries = [q for path in DASHBOARDS for q in dashboard_queries(path, variables)]
            assert len(queries) >= 30, queries
            # Gauges set once a second (lag) may miss the scrape that saw the last
            # decision: an empty query is asked again for a few scrapes.
            deadline = time.monotonic() + 6
            while True:
                empty = []
                for query in queries:
                    try:
                        values: list[float] | str = [
                            float(s["value"][1]) for s in prom.query(query.expr)
                        ]
                    except PrometheusError as exc:  # a bad expression: Prometheus says why
                        values = str(exc)
                    if isinstance(values, str) or not any(math.isfinite(v) for v in values):
                        empty.append((query, values))
                queries = [query for query, _ in empty]
                if not empty or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert not empty, "dashboard queries without data:\n" + "\n".join(
                f"{query} -> {values or 'no series'}" for query, values in empty
            )

            # The topic variable's query lists the topic.
            topics = prom.api("label/topic/values", **{"match[]": "dedupe_events_total"})
            assert topic in topics
            # The shipped alert rules load and evaluate against real series.
            rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            assert len(rules) == 12
            assert {r["health"] for r in rules} == {"ok"}, [
                (r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"
            ]


def test_an_unreachable_prometheus_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PrometheusError, match=r"cannot reach Prometheus at .*is it running"):
        api(url, "query", query="up")


def test_a_prometheus_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    """A port already taken: prometheus exits, and the error shows its log."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        prom = Prometheus(["127.0.0.1:1"], tmp_path / "p", port=port)
        with pytest.raises(PrometheusError, match=r"prometheus exited with code \d+") as info:
            prom.start()
    assert "address already in use" in str(info.value)


def test_a_missing_prometheus_binary_is_a_clear_error(tmp_path: Path) -> None:
    prom = Prometheus(["127.0.0.1:1"], tmp_path, binary="no-such-prometheus")
    with pytest.raises(PrometheusError, match="install Debian's prometheus package"):
        prom.start()
