"""Replay a recording through a handler with the real engine and loop, no Kafka.

The point of a replay is to test *the code that runs in production*, so this
module builds a :class:`~dedupe_consumer.consumer.DedupeConsumer` -- the same
loop and engine as ``dedupe-consumer run`` -- and swaps only its edges
(:func:`~dedupe_consumer.replay.wiring.edges`): a
:class:`~dedupe_consumer.replay.source.ReplaySource` instead of Kafka, an
in-memory dead-letter sink, and a RocksDB store in a temporary directory, no
changelog. It builds no ``[kafka]`` settings: the loop and the engine read
only the dedupe, processing, store and observability sections.

Two stressors turn a plain recording into a harder test:

* ``inject_duplicates``: a seeded share of the events is sent again after the
  partition's last offset with new offsets, exactly what a producer retry
  looks like to a consumer;
* ``redeliver_batches``: every batch is delivered twice, as a consumer
  restarted between persisting and committing would see it.

The handler is wrapped in a counter of *successful* calls per ID, which is the
ground truth the report checks "once per ID" against.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from dedupe_consumer.config import (
    DedupeSettings,
    ObservabilitySettings,
    PayloadSettings,
    ProcessingSettings,
    Settings,
    StoreSettings,
)
from dedupe_consumer.consumer import DedupeConsumer, LoopSettings
from dedupe_consumer.contracts import BatchResult
from dedupe_consumer.errors import DedupeError
from dedupe_consumer.handler import Handler
from dedupe_consumer.ids import MissingId, hash_id
from dedupe_consumer.models import Event, SourceMessage, TopicPartition
from dedupe_consumer.payloads import id_reader
from dedupe_consumer.replay.format import read_recording
from dedupe_consumer.replay.records import Record
from dedupe_consumer.replay.report import DEFAULT_MAX_DEAD_LETTERED, ReplayReport, audit
from dedupe_consumer.replay.wiring import edges
from dedupe_consumer.scope import by_id_partition, by_id_topic, origin_header
from dedupe_consumer.store.base import Response

Progress = Callable[[int, int], None]
"""Called as ``progress(decided, total)`` after each batch."""


class CountingHandler(Handler):
    """Delegates everything to ``inner`` and counts its successful ``handle`` calls per ID."""

    def __init__(self, inner: Handler) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def setup(self) -> None:
        self.inner.setup()

    def teardown(self) -> None:
        self.inner.teardown()

    def parse(self, value: bytes | None) -> Any:
        return self.inner.parse(value)

    def handle(self, event: Event) -> object:
        response = self.inner.handle(event)
        self.calls[event.id] += 1  # only a call that returned is an effect that happened
        return response  # stored and sent as in production


class ReconcilingCountingHandler(CountingHandler):
    """:class:`CountingHandler` for a handler that implements ``reconcile``.

    A separate class because the engine refuses ``on_uncertain = "reconcile"``
    for a handler class that does not override ``reconcile``; a wrapper that
    always overrode it would hide that configuration error.
    """

    def reconcile(self, event: Event) -> object:
        return self.inner.reconcile(event)


class _ForwardsOnDuplicate(CountingHandler):
    """Only for a handler that implements ``on_duplicate``: the engine calls it (and
    waits for what a duplicate needs) only when the handler's class overrides it."""

    def on_duplicate(self, event: Event, stored: Response | None) -> None:
        self.inner.on_duplicate(event, stored)


class _ReconcilingForwardsOnDuplicate(_ForwardsOnDuplicate, ReconcilingCountingHandler):
    pass


def counting(handler: Handler) -> CountingHandler:
    """Wrap ``handler`` so the engine sees the same capabilities it has."""
    reconciles = type(handler).reconcile is not Handler.reconcile
    if type(handler).on_duplicate is not Handler.on_duplicate:
        wrapper = _ReconcilingForwardsOnDuplicate if reconciles else _ForwardsOnDuplicate
        return wrapper(handler)
    return ReconcilingCountingHandler(handler) if reconciles else CountingHandler(handler)


def with_injected_duplicates(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], int]:
    """``records`` plus copies of a seeded ``fraction`` of them, as producer retries.

    Each copy keeps key, value, headers and timestamp and gets the next free
    offset of its partition, so it arrives after everything already recorded.
    Returns the new list and the number of copies.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"inject_duplicates must be between 0 and 1, got {fraction}")
    count = round(len(records) * fraction)
    if count == 0:
        return list(records), 0
    rng = random.Random(seed)
    next_offset: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic_, r.partition_)
        next_offset[tp] = max(next_offset.get(tp, 0), r.offset_ + 1)
    copies: list[Record] = []
    for original in rng.sample(list(records), count):  # sample order: retries come shuffled
        tp = TopicPartition(original.topic_, original.partition_)
        copies.append(replace(original, offset_=next_offset[tp]))
        next_offset[tp] += 1
    return [*records, *copies], count


@dataclass(frozen=True)
class ReplaySettings:
    """The sections a replay runs with (a :class:`~dedupe_consumer.consumer.LoopSettings`)."""

    dedupe: DedupeSettings
    processing: ProcessingSettings
    store: StoreSettings
    observability: ObservabilitySettings
    payload: PayloadSettings = field(default_factory=PayloadSettings)  # type: ignore[arg-type]


def replay_settings(store_path: Path, settings: Settings | None = None) -> ReplaySettings:
    """The settings a replay runs with.

    Given ``settings`` are kept (ID source, policies, mode, batch size...) except
    for what must not leak out of a replay: the store moves to ``store_path``
    and no metrics port is opened. Without them: defaults, plus fast retries --
    a replay has no downstream system that needs time to recover.
    """
    if settings is not None:
        return ReplaySettings(
            dedupe=settings.dedupe,
            processing=settings.processing,
            store=settings.store.model_copy(update={"path": store_path}),
            observability=settings.observability.model_copy(update={"metrics_port": None}),
            payload=settings.payload,
        )
    return ReplaySettings(
        dedupe=DedupeSettings.model_validate({}),
        processing=ProcessingSettings.model_validate(
            {
                "dead_letter_topic": "replay.dlq",  # never produced to: letters stay in memory
                "retry_backoff": timedelta(milliseconds=1),
                "retry_backoff_max": timedelta(milliseconds=10),
            }
        ),
        store=StoreSettings.model_validate({"path": store_path}),
        observability=ObservabilitySettings.model_validate({}),
    )


def event_ids(records: Sequence[SourceMessage], settings: LoopSettings) -> list[str | None]:
    """Each record's event ID as the engine will see it (None: the record has none)."""
    extract = id_reader(settings.dedupe.id_source, settings.payload)
    found: list[str | None] = []
    for record in records:
        try:
            found.append(extract(record))
            continue
        except MissingId:
            pass
        if settings.dedupe.on_missing_id == "hash":
            try:
                found.append(hash_id(record))
                continue
            except MissingId:
                pass
        found.append(None)
    return found


def replay_recording(
    handler_or_class: Handler | type[Handler],
    path: str | Path,
    *,
    settings: Settings | None = None,
    inject_duplicates: float = 0.0,
    redeliver_batches: bool = False,
    seed: int = 0,
    state_dir: str | Path | None = None,
    progress: Progress | None = None,
    max_dead_lettered: float = DEFAULT_MAX_DEAD_LETTERED,
) -> ReplayReport:
    """Feed the recording at ``path`` through the engine and report what happened.

    ``handler_or_class``: a handler, or a handler class to instantiate without
    arguments. ``state_dir``: where the throwaway RocksDB store goes (a fresh
    temporary directory by default; it must not already hold a store).
    ``max_dead_lettered``: the share of events that may be dead-lettered before
    the report fails as having tested too little (``report.tested_nothing``);
    a replay in which nothing was handled always fails. Raises
    :class:`~dedupe_consumer.replay.RecordingError` for an unreadable recording.
    """
    started = time.monotonic()
    recording = read_recording(path)
    fed, injected = with_injected_duplicates(recording.records, inject_duplicates, seed)
    recorded = fed
    if settings is not None and settings.dedupe.scope == "topic":
        fed = through_the_hop(fed, settings, recording.header.partitions)
    inner = handler_or_class() if isinstance(handler_or_class, type) else handler_or_class
    handler = counting(inner)
    with ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dedupe-replay-"))
        store_path = Path(state_dir) / "state"
        if store_path.exists() and any(store_path.iterdir()):
            # Decisions left by an earlier replay would turn this one's events into
            # duplicates and the report into fiction.
            raise ValueError(f"{store_path} already holds a store: give each replay a fresh one")
        effective = replay_settings(store_path, settings)
        ids = event_ids(fed, effective)
        replayed = edges(
            fed,
            effective,
            redeliver_batches=redeliver_batches,
            max_record_bytes=1_000_000 if settings is None else settings.kafka.max_message_bytes,
        )
        stack.callback(replayed.close)
        store, feed = replayed.store, replayed.source

        total = len(fed) * (2 if redeliver_batches else 1)
        decided = 0

        def on_batch(result: BatchResult) -> None:
            nonlocal decided
            decided += result.stats.consumed
            if progress is not None:
                progress(decided, total)

        if progress is not None:
            progress(0, total)
        consumer = DedupeConsumer(handler, effective, edges=replayed)
        error: str | None = None
        try:
            consumer.run(
                until=lambda _totals: feed.exhausted,
                on_batch=on_batch,
                install_signal_handlers=False,
            )
        except DedupeError as exc:  # e.g. on_missing_id = "fail": report what it cost
            error = f"{type(exc).__name__}: {exc}"

        now_ms = int(time.time() * 1000)

        def durable(tp: TopicPartition, event_ids_: Sequence[str]) -> list[bool]:
            return [found is not None for found in store.lookup(tp, event_ids_, now_ms)]

        letters = replayed.dead_letters.letters
        checked = audit(fed, ids, handler.calls, letters, feed.committed, durable)

    partitions_of: dict[str, set[int]] = {}
    for record, event_id in zip(recorded, ids, strict=True):
        if event_id is not None:
            partitions_of.setdefault(event_id, set()).add(record.partition_)
    totals = consumer.totals
    return ReplayReport(
        recording=str(path),
        topic=recording.header.topic,
        events=len(fed),
        injected=injected,
        deliveries=totals.consumed,
        handled=totals.handled,
        duplicates=totals.duplicates,
        replays=totals.replays,
        conflicting=totals.conflicts,
        dead_lettered=totals.dead_lettered,
        missing_id=checked.missing_id,
        unique_ids=checked.unique_ids,
        handled_ids=checked.handled_ids,
        dead_lettered_ids=checked.dead_lettered_ids,
        handled_more_than_once=checked.handled_more_than_once,
        lost=checked.lost,
        dead_letter_reasons=dict(totals.by_reason.items()),
        ids_in_several_partitions={i for i, ps in partitions_of.items() if len(ps) > 1},
        error=error,
        seconds=time.monotonic() - started,
        max_dead_lettered=max_dead_lettered,
    )


def through_the_hop(records: Sequence[Record], settings: Settings, partitions: int) -> list[Record]:
    """``records`` as topic scope's hop writes them to the by-id topic (see
    :mod:`dedupe_consumer.scope`): each on its ID's partition, numbered anew there, with
    the origin header appended; so a replay dedupes per topic, as the consumer does."""
    extract = id_reader(settings.dedupe.id_source, settings.payload)
    count = settings.dedupe.scope_partitions or max(partitions, 1)
    next_offset: dict[int, int] = {}
    moved: list[Record] = []
    for record in records:
        to = by_id_partition(extract, settings.dedupe.on_missing_id, record, count)
        offset = next_offset.get(to, 0)
        next_offset[to] = offset + 1
        moved.append(
            replace(
                record,
                topic_=by_id_topic(settings.kafka.group_id, record.topic_),
                partition_=to,
                offset_=offset,
                headers_=[*record.headers_, origin_header(record)],
            )
        )
    return moved
