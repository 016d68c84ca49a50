from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import Event, Handler, Settings
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.engine import Engine
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.replay import Record
from dedupe_consumer.store import RocksStore

TOPIC = "payments"


def rec(
    offset: int,
    event_id: str | None,
    *,
    partition: int = 0,
    body: dict[str, Any] | None = None,
    value: bytes | None = None,
    key: bytes | None = None,
) -> Record:
    headers: list[tuple[str, str | bytes | None]] = (
        [] if event_id is None else [("event-id", event_id.encode())]
    )
    if value is None:
        value = json.dumps(body if body is not None else {"id": event_id}).encode()
    return Record(
        TOPIC,
        partition,
        offset,
        key if key is not None else (event_id.encode() if event_id else None),
        value,
        headers,
        1_700_000_000_000 + offset,
    )


class Recorder(Handler):
    """Appends each call; optionally fails for chosen IDs."""

    def __init__(self, fail: Callable[[Event], None] | None = None) -> None:
        self.calls: list[Event] = []
        self.fail = fail

    def handle(self, event: Event) -> None:
        self.calls.append(event)
        if self.fail is not None:
            self.fail(event)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.calls]


def make_settings(store_path: Path, **sections: dict[str, Any]) -> Settings:
    values: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "unused:9092", "group_id": "g", "topics": [TOPIC]},
        "store": {"path": str(store_path)},
        "processing": {
            "dead_letter_topic": "payments.dlq",
            "retry_backoff": "1ms",
            "retry_backoff_max": "5ms",
        },
    }
    for name, section in sections.items():
        values[name] = {**values.get(name, {}), **section}
    return Settings.load(**values)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    """An engine on a real RocksDB store in tmp_path, reopenable like a restart."""

    def __init__(
        self, tmp_path: Path, handler: Handler | None = None, **sections: dict[str, Any]
    ) -> None:
        self.settings = make_settings(tmp_path / "state", **sections)
        self.handler = handler or Recorder()
        self.clock = Clock()
        self.dead = MemoryDeadLetters()
        self.store: RocksStore | None = None
        self.engine = self.open()

    def open(self) -> Engine:
        self.store = RocksStore(
            self.settings.store.path,
            retention_ms=int(self.settings.dedupe.retention.total_seconds() * 1000),
        )
        engine = Engine(
            self.handler,
            self.settings.dedupe,
            self.settings.processing,
            self.store,
            self.dead,
            sweep_keys=self.settings.store.sweep_keys,
            revoked_state_grace=self.settings.store.revoked_state_grace,
            max_record_bytes=self.settings.kafka.max_message_bytes,
            clock=self.clock,
        )
        engine.assign([TopicPartition(TOPIC, p) for p in range(4)])
        return engine

    def restart(self) -> Engine:
        assert self.store is not None
        self.engine.close()
        self.store.close()
        self.engine = self.open()
        return self.engine

    def close(self) -> None:
        self.engine.close()
        if self.store is not None:
            self.store.close()
            self.store = None


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def factory(handler: Handler | None = None, **sections: dict[str, Any]) -> Rig:
        r = Rig(tmp_path / f"rig{len(made)}", handler, **sections)
        made.append(r)
        return r

    yield factory
    for r in made:
        r.close()
