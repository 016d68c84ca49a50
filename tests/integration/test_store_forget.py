"""``dedupe-consumer store forget``: the ID is handled again, and no restore brings it back."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dedupe_consumer import DedupeConsumer, Event, Handler, Settings
from dedupe_consumer.cli import app
from dedupe_consumer.store import RocksStore
from dedupe_consumer.store.reading import StoreReader
from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..faults.consumer_process import write_config
from ..kafka_helpers import produce_raw
from .test_emit import run_to_end

pytestmark = pytest.mark.kafka
runner = CliRunner()


class Calls(Handler):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: list[str] = []

    def handle(self, event: Event) -> None:
        with self.lock:
            self.ids.append(event.id)


def test_a_forgotten_id_is_handled_again_even_after_a_restore(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    ids = ["keep-1", "forget-me", "keep-2"]
    messages = [
        {"key": i.encode(), "value": b"{}", "headers": [("event-id", i.encode())]} for i in ids
    ]
    state = tmp_path / "state"
    config = write_config(tmp_path, kafka_bootstrap, topic, store=state)
    settings = Settings.from_toml(config)
    produce_raw(kafka_bootstrap, topic, messages)
    first = Calls()
    run_to_end(DedupeConsumer(first, settings), 3)
    assert sorted(first.ids) == sorted(ids)

    # While a consumer holds the store: refused, nothing changed.
    holder = RocksStore(state, retention_ms=10**12)
    try:
        held = runner.invoke(
            app, ["store", "forget", str(state), "forget-me", "-c", str(config), "--yes"]
        )
    finally:
        holder.close()
    assert held.exit_code == 1
    assert "a consumer holds the store" in held.output
    with StoreReader(state) as store:
        assert len(store.lookup("forget-me")) == 1

    forgot = runner.invoke(
        app, ["store", "forget", str(state), "forget-me", "-c", str(config), "--yes"]
    )
    assert forgot.exit_code == 0, forgot.output
    assert "tombstone written to" in forgot.output
    with StoreReader(state) as store:
        assert store.lookup("forget-me") == [] and len(store.lookup("keep-1")) == 1

    # A new instance restores the partition from the changelog: the forgotten ID is
    # handled again, the others stay duplicates.
    produce_raw(kafka_bootstrap, topic, messages)
    fresh = settings.model_copy(
        update={"store": settings.store.model_copy(update={"path": tmp_path / "fresh"})}
    )
    again = Calls()
    run_to_end(DedupeConsumer(again, fresh), 3)
    assert again.ids == ["forget-me"]

    missing = runner.invoke(
        app, ["store", "forget", str(state), "never-seen", "-c", str(config), "--yes"]
    )
    assert missing.exit_code == 1 and "nothing to forget" in missing.output


def test_forget_with_another_groups_config_is_refused(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Two services consume the same topic, each with its own group and changelog. An
    operator runs ``forget`` on service A's store with service B's consumer.toml: the
    tombstone must not land in B's changelog (B would then handle the ID a second time
    after its next restore) while A's own changelog keeps the record (A's restore brings
    it back). The store knows which changelog it follows (its ``cl:`` positions):
    ``forget`` must refuse a config whose changelog is not that one."""
    topic = kafka_topic(partitions=1)
    ids = ["keep", "forget-me"]
    messages = [
        {"key": i.encode(), "value": b"{}", "headers": [("event-id", i.encode())]} for i in ids
    ]
    produce_raw(kafka_bootstrap, topic, messages)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    config_a = write_config(a_dir, kafka_bootstrap, topic, store=a_dir / "state")
    config_b = write_config(b_dir, kafka_bootstrap, topic, store=b_dir / "state")
    config_b.write_text(
        config_b.read_text().replace(f'group_id = "{topic}-group"', f'group_id = "{topic}-billing"')
    )
    settings_b = Settings.from_toml(config_b)
    run_to_end(DedupeConsumer(Calls(), Settings.from_toml(config_a)), 2)
    run_to_end(DedupeConsumer(Calls(), settings_b), 2)

    wrong = runner.invoke(
        app, ["store", "forget", str(a_dir / "state"), "forget-me", "-c", str(config_b), "--yes"]
    )

    # Service B, restored on a new instance, sees the same event again.
    produce_raw(kafka_bootstrap, topic, messages)
    fresh_b = settings_b.model_copy(
        update={"store": settings_b.store.model_copy(update={"path": b_dir / "fresh"})}
    )
    billing = Calls()
    run_to_end(DedupeConsumer(billing, fresh_b), 2)
    assert billing.ids == [], (
        "forget on A's store with B's config tombstoned B's changelog: B handled "
        f"{billing.ids} a second time. forget said: {wrong.output!r}"
    )
    assert wrong.exit_code != 0, wrong.output
