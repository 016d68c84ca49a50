"""Review of issue 14: a replay with ``dedupe.scope = "topic"`` still dedupes per partition."""

from __future__ import annotations

from pathlib import Path

from dedupe_consumer import Settings
from dedupe_consumer.replay import replay_recording

from .test_replay import TOPIC, CountingIds, line, write_recording


def test_rev14_replay_with_topic_scope_handles_an_id_once_across_partitions(
    tmp_path: Path,
) -> None:
    """Replay tests are how users check a handler against production traffic with
    their production settings. With ``dedupe.scope = "topic"`` in those settings, the
    engine reads the recorded source partitions directly (no hop), so an ID recorded
    on two partitions is handled twice in the replay, while the consumer handles it
    once: the replay neither applies the scope nor refuses it."""
    settings = Settings.load(
        kafka={"bootstrap_servers": "x", "group_id": "g", "topics": [TOPIC]},
        processing={"dead_letter_topic": "dlq"},
        dedupe={"scope": "topic"},
    )
    path = write_recording(tmp_path / "r.jsonl", [line(0, 0, "x"), line(1, 0, "x")])
    report = replay_recording(CountingIds, path, settings=settings, state_dir=tmp_path / "s")
    assert report.handled_more_than_once == {}, report.handled_more_than_once
