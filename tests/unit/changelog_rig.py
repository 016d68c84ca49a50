"""An engine with a changelog but no broker: the fakes the engine tests share.

``RecordingChangelog`` keeps each transaction's write and offsets; subclasses
fence, fail or hold writes back. ``changelog_engine`` builds an engine on a real
RocksDB store in ``tmp_path`` with one of them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dedupe_consumer import Handler
from dedupe_consumer.engine import Engine
from dedupe_consumer.kafka.changelog import Changelog
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import ProcessedStore, RocksStore, WriteSet

from .conftest import TOPIC, Clock, make_settings

TP0 = TopicPartition(TOPIC, 0)


class RecordingChangelog(Changelog):
    """The changelog's write contract without a broker: records each transaction."""

    def __init__(self) -> None:  # no producer
        self.writes: list[WriteSet] = []
        self.offsets: list[dict[TopicPartition, int]] = []
        self.live: list[bool] = []
        """Per write: whether it asked for the group metadata of now (``live``)."""

    def ensure_topics(self, topics: object) -> None:
        pass

    def restore(self, tp: TopicPartition, store: ProcessedStore, *, stopping: object = None) -> int:
        return 0

    def write(
        self,
        write: WriteSet,
        store: ProcessedStore | None = None,
        offsets: Mapping[TopicPartition, int] | None = None,
        *,
        live: bool = False,
    ) -> dict[TopicPartition, int]:
        self.before_write(write)
        self.writes.append(copy.deepcopy(write))
        self.offsets.append(dict(offsets or {}))
        self.live.append(live)
        return {}

    def before_write(self, write: WriteSet) -> None:
        """Subclasses wait, fence (raise NotOwnerError) or fail here."""


class NoDeadLetters:
    def send(self, message: object, letter: object) -> None:
        raise AssertionError("no dead letters expected")

    def flush(self) -> None:
        pass


def changelog_engine(
    tmp_path: Path,
    handler: Handler,
    changelog: Changelog | None,
    *,
    retention_ms: int = 10**9,
    clock: Clock | None = None,
    **sections: dict[str, Any],
) -> tuple[Engine, RocksStore]:
    """An engine on ``tmp_path / "s"`` owning partition 0 of the test topic."""
    settings = make_settings(tmp_path / "s", **sections)
    store = RocksStore(settings.store.path, retention_ms=retention_ms)
    e = Engine(
        handler,
        settings.dedupe,
        settings.processing,
        store,
        NoDeadLetters(),
        sweep_keys=settings.store.sweep_keys,
        revoked_state_grace=settings.store.revoked_state_grace,
        clock=clock or Clock(),
        changelog=changelog,
    )
    e.assign([TP0])
    return e, store
