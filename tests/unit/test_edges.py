"""The composition root: a consumer runs against the edges it is given, and
extensions see assignments through hooks, not by subclassing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import ConfigError, DedupeConsumer, Settings
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.replay import edges, replay_recording
from dedupe_consumer.replay.format import RecordingHeader, RecordingWriter
from dedupe_consumer.replay.harness import replay_settings

from .conftest import TOPIC, Recorder, make_settings, rec


def test_the_replay_harness_builds_no_kafka_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.jsonl"
    with RecordingWriter(path, RecordingHeader.new(TOPIC, 1)) as writer:
        for i in range(5):
            writer.write(rec(i, f"id{i % 4}"))

    # [kafka] is only ever built as part of a whole Settings (pydantic validates the
    # nested section without calling its __init__): count those.
    built: list[dict[str, Any]] = []
    real_init = Settings.__init__

    def counting_init(self: Settings, **values: Any) -> None:
        built.append(values)
        real_init(self, **values)

    monkeypatch.setattr(Settings, "__init__", counting_init)
    make_settings(tmp_path / "unused")  # the spy sees a Settings being built...
    assert [sorted(values) for values in built] == [["kafka", "processing", "store"]]
    built.clear()

    report = replay_recording(Recorder(), path, state_dir=tmp_path / "replay")

    assert built == []  # ...and none in a replay: no invented bootstrap_servers
    assert (report.handled, report.duplicates, report.ok) == (4, 1, True)
    assert not hasattr(replay_settings(tmp_path / "s"), "kafka")


def test_hooks_see_the_partitions_a_replay_assigns(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state")
    records = [rec(i, f"id{i}", partition=i % 2) for i in range(6)]
    replayed = edges(records, settings)
    seen: list[Sequence[TopicPartition]] = []
    handler = Recorder()
    try:
        consumer = DedupeConsumer(handler, settings, edges=replayed)
        assert consumer.on_assign(seen.append) == seen.append  # usable as a decorator
        consumer.run(until=lambda _t: replayed.source.exhausted, install_signal_handlers=False)
        assert sorted(handler.ids) == [f"id{i}" for i in range(6)]
        assert replayed.source.committed == {
            TopicPartition(TOPIC, 0): 5,
            TopicPartition(TOPIC, 1): 6,
        }
    finally:
        replayed.close()
    assert [sorted(tps) for tps in seen] == [[TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]]


def test_edges_passed_in_stay_open_for_their_owner(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state")
    replayed = edges([rec(0, "a")], settings)
    try:
        consumer = DedupeConsumer(Recorder(), settings, edges=replayed)
        consumer.run(until=lambda _t: replayed.source.exhausted, install_signal_handlers=False)
        # Not closed by the consumer: the caller can still read what was decided.
        assert replayed.store.watermark(TopicPartition(TOPIC, 0)) == 0
    finally:
        replayed.close()


def test_a_consumer_without_edges_needs_the_kafka_settings(tmp_path: Path) -> None:
    sections = replay_settings(tmp_path / "s")
    with pytest.raises(ConfigError, match="needs the whole Settings"):
        DedupeConsumer(Recorder(), sections)


def test_a_stop_hook_runs_after_the_stop_is_requested(tmp_path: Path) -> None:
    consumer = DedupeConsumer(Recorder(), make_settings(tmp_path / "state"))
    states: list[bool] = []
    consumer.on_stop(lambda: states.append(consumer.stopping))
    consumer.stop()
    assert states == [True]


def test_edges_close_every_part_even_when_one_fails() -> None:
    from dedupe_consumer.contracts import Edges

    closed: list[str] = []

    def failing() -> None:
        closed.append("changelog")
        raise RuntimeError("producer stuck")

    edges = Edges(
        source=lambda listener: None,  # type: ignore[arg-type,return-value]
        dead_letters=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        closers=(lambda: closed.append("store"), failing, lambda: closed.append("letters")),
    )
    with pytest.raises(RuntimeError, match="producer stuck"):
        edges.close()
    assert closed == ["letters", "changelog", "store"]  # the store is closed all the same
