"""Prometheus metrics of one consumer.

Labels are bounded: topic, partition, decision, reason. Never an event ID
(one time series per ID would take the monitoring system down first).
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dedupe_consumer.errors import ConfigError
from dedupe_consumer.models import BatchStats, DeadLetterReason, Decision

log = structlog.get_logger("dedupe_consumer.metrics")


_HOUR, _DAY = 3600.0, 86400.0
_AGE_BUCKETS: tuple[float, ...] = tuple(
    n * unit
    for n, unit in (
        *((1, 1.0), (10, 1.0), (60, 1.0), (300, 1.0), (900, 1.0)),
        *((1, _HOUR), (4, _HOUR), (12, _HOUR)),
        *((d, _DAY) for d in (1, 2, 3, 5, 7, 10, 14, 21, 30, 60)),
    )
)
"""Seconds from 1 s to 60 days: around every plausible ``dedupe.retention``."""


class Metrics:
    """All metrics on their own registry, so several consumers can live in one process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "dedupe_events", "Consumed offsets by final decision", ["topic", "decision"], registry=r
        )
        self.dead_letters = Counter(
            "dedupe_dead_letters", "Dead-lettered events by reason", ["topic", "reason"], registry=r
        )
        self.handler_retries = Counter(
            "dedupe_handler_retries",
            "Handler calls that failed and were retried",
            ["topic"],
            registry=r,
        )
        self.repartitioned = Counter(
            "dedupe_repartitioned",
            "Messages the topic-scope hop moved to their by-id topic, by source topic",
            ["topic"],
            registry=r,
        )
        self.repartition_aborts = Counter(
            "dedupe_repartition_aborts",
            "Hop transactions aborted (their messages are read and moved again)",
            registry=r,
        )
        self.commit_failures = Counter(
            "dedupe_commit_failures", "Offset commits that failed (retried next batch)", registry=r
        )
        self.batch_seconds = Histogram(
            "dedupe_batch_seconds", "Time from poll result to durable decision", registry=r
        )
        self.persist_seconds = Histogram(
            "dedupe_persist_seconds",
            "Synced store write per batch",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.watermark = Gauge(
            "dedupe_watermark_offset",
            "Highest offset with a durable decision",
            ["topic", "partition"],
            registry=r,
        )
        self.expired_deleted = Counter(
            "dedupe_expired_records_deleted", "Records removed by the retention sweep", registry=r
        )
        self.uncertain = Counter(
            "dedupe_uncertain_outcomes",
            "Claims found in progress after a crash, by the policy that resolved them",
            ["topic", "policy"],
            registry=r,
        )
        self.walks_cut = Counter(
            "dedupe_batches_cut",
            "Batches whose handlers ran past the walk budget; the rest was re-read",
            registry=r,
        )
        self.poll_interval_exceeded = Counter(
            "dedupe_max_poll_interval_exceeded",
            "Batches that outlived max.poll.interval.ms (the group membership was lost)",
            registry=r,
        )
        self.partitioner_mismatches = Counter(
            "dedupe_partitioner_mismatch",
            "Keyed messages on a partition that neither librdkafka's default (CRC32) nor "
            "Java's (murmur2) partitioner would choose: dedupe per partition may miss them",
            ["topic"],
            registry=r,
        )
        self.partitioner_placed = Counter(
            "dedupe_partitioner_placed",
            "Checked keyed messages that only one common partitioner would put where they are, "
            "by that partitioner (crc32: librdkafka's default, murmur2: Java's). Both non-zero "
            "for one topic: its producers disagree, and the same key from each lands on two "
            "partitions",
            ["topic", "partitioner"],
            registry=r,
        )
        self.partitioner_checked = Counter(
            "dedupe_partitioner_checked",
            "Keyed messages checked against the common partitioners (all of a partition's "
            "first 1000, then one offset in 64): the denominator of the mismatch ratio",
            ["topic"],
            registry=r,
        )
        self.duplicate_age = Histogram(
            "dedupe_duplicate_age_seconds",
            "Age of the matched record when a duplicate is caught (decision to duplicate): "
            "its p99 near dedupe.retention means replays may outlive the retention",
            ["topic"],
            registry=r,
            buckets=_AGE_BUCKETS,
        )
        self.retention_seconds = Gauge(
            "dedupe_retention_seconds",
            "dedupe.retention in force: how long an ID is remembered",
            registry=r,
        )
        self.offset_regressions = Counter(
            "dedupe_offset_regressions",
            "Assignments whose log went back below the watermark (topic recreated/truncated)",
            ["topic"],
            registry=r,
        )

        self.restore_seconds = Histogram(
            "dedupe_restore_seconds",
            "Changelog restore of one assigned partition, before its first batch is decided",
            ["topic"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
        )
        self.consumer_lag = Gauge(
            "dedupe_consumer_lag",
            "Messages of an assigned partition after the consumer's position (the log end "
            "offset of the last fetch minus the position); removed when the partition goes",
            ["topic", "partition"],
            registry=r,
        )
        self.store_bytes = Gauge(
            "dedupe_store_size_bytes",
            "Approximate bytes of the RocksDB store (SST files and memtables), updated "
            "after persisted writes at most every few seconds",
            registry=r,
        )
        self.changelog_write_seconds = Histogram(
            "dedupe_changelog_write_seconds",
            "Changelog transaction of one persisted write (records, source offsets, commit)",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.sweep_seconds = Histogram(
            "dedupe_expiry_sweep_seconds",
            "One pass of the retention sweep over the store (finding expired records)",
            registry=r,
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
        )

    def topic_seen(self, topic: str, on_uncertain: str) -> None:
        """Create a topic's labelled series at zero when its partitions are assigned.

        A counter child exists only once it is used: without this, a dashboard panel or
        an alert on ``dead_lettered`` or ``conflict`` shows "no data" (not 0) until the
        first one, and ``rate()`` misses that first increase. The label values are the
        fixed decisions, reasons and the configured ``on_uncertain`` policy: bounded.
        """
        for decision in Decision:
            self.events.labels(topic, decision.value)
        for reason in DeadLetterReason:
            self.dead_letters.labels(topic, reason.value)
        self.uncertain.labels(topic, on_uncertain)
        self.handler_retries.labels(topic)
        self.offset_regressions.labels(topic)
        self.duplicate_age.labels(topic)
        self.restore_seconds.labels(topic)  # before the first restore ends: rate() sees it

    def record(self, topic: str, stats: BatchStats) -> None:
        for decision, count in stats.by_decision().items():
            if count:
                self.events.labels(topic, decision).inc(count)
        for reason, count in stats.by_reason.items():
            self.dead_letters.labels(topic, reason).inc(count)

    def serve(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        """Expose /metrics on ``host:port`` (loopback by default) until ``shutdown()``.

        Raises :class:`ConfigError` naming ``observability.metrics_port`` and
        ``metrics_host`` when the address cannot be bound.
        """
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"observability.metrics_port = {port}, observability.metrics_host = {host!r}: "
                f"cannot serve /metrics there ({exc}); choose a free port (0: any) or another "
                "host, or unset metrics_port"
            ) from None
        bound_port = server.server_address[1]
        log.info("metrics_serving", url=f"http://{host}:{bound_port}/metrics")
        return server
