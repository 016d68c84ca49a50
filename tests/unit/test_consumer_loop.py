"""The consumer loop driven by the replay source: commits, failures, stop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dedupe_consumer import DedupeConsumer
from dedupe_consumer.contracts import AssignmentListener, Edges
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.errors import CommitError
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.replay import Record, ReplaySource
from dedupe_consumer.store import RocksStore

from ..kafka_helpers import NullListener
from .conftest import TOPIC, Recorder, make_settings, rec


class FlakyCommits(ReplaySource):
    """A source whose broker refuses the first ``failures`` commits."""

    def __init__(
        self, records: Sequence[Record], listener: AssignmentListener, failures: int
    ) -> None:
        super().__init__(records, listener)
        self.failures = failures
        self.attempts = 0

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise CommitError("Local: Timed out", code="REQUEST_TIMED_OUT")
        super().commit(offsets)


def test_failed_commits_are_retried_and_never_fatal(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state", processing={"batch_size": 10})
    records = [rec(i, f"id{i % 40}") for i in range(60)]
    sources: list[FlakyCommits] = []

    def source(listener: AssignmentListener) -> FlakyCommits:
        sources.append(FlakyCommits(records, listener, failures=4))
        return sources[0]

    store = RocksStore(tmp_path / "state", retention_ms=10**9)
    handler = Recorder()
    consumer = DedupeConsumer(
        handler, settings, edges=Edges(source=source, dead_letters=MemoryDeadLetters(), store=store)
    )
    try:
        totals = consumer.run(until=lambda t: sources[0].exhausted, install_signal_handlers=False)
        assert (totals.consumed, totals.handled, totals.duplicates) == (60, 40, 20)
        assert sources[0].committed == {TopicPartition(TOPIC, 0): 60}
        failures = consumer.metrics.registry.get_sample_value("dedupe_commit_failures_total")
        assert failures == 4
        assert store.watermark(TopicPartition(TOPIC, 0)) == 59
    finally:
        store.close()


def test_redelivered_batches_are_replays_not_handler_calls(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state", processing={"batch_size": 7})
    records = [rec(i, f"id{i}") for i in range(30)]
    handler = Recorder()
    holder: list[ReplaySource] = []

    def source(listener: AssignmentListener) -> ReplaySource:
        holder.append(ReplaySource(records, listener, redeliver_batches=True))
        return holder[0]

    store = RocksStore(tmp_path / "state", retention_ms=10**9)
    try:
        totals = DedupeConsumer(
            handler,
            settings,
            edges=Edges(source=source, dead_letters=MemoryDeadLetters(), store=store),
        ).run(until=lambda t: holder[0].exhausted, install_signal_handlers=False)
    finally:
        store.close()
    assert handler.ids == [f"id{i}" for i in range(30)]
    assert (totals.consumed, totals.replays) == (60, 30)


def test_replay_source_seek_hands_out_the_rest_of_the_last_batch(tmp_path: Path) -> None:
    records = [rec(i, f"id{i}") for i in range(6)] + [
        rec(i, f"q{i}", partition=1) for i in range(3)
    ]

    source = ReplaySource(records, NullListener())
    first = source.poll(100, 0)
    assert len(first) == 9
    source.seek({TopicPartition(TOPIC, 0): 4})
    again = source.poll(100, 0)
    assert [(r.partition(), r.offset()) for r in again] == [(0, 4), (0, 5)]
    assert source.poll(100, 0) == [] and source.exhausted
