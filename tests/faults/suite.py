"""The kill suite: a real consumer process, SIGKILLed again and again, on a real broker.

Shared by ``tests/faults/test_kill_suite.py`` (CI: a few kills per mode) and
``bench/crash_soak.py`` (hundreds). For one mode it produces the data set,
then starts ``python -m dedupe_consumer run`` and kills it with SIGKILL, either
at a random moment or at a named fault point after a random number of hits,
restarting it each time; a last run finishes the topic and is stopped with
SIGTERM. The effects (an append-only file outside the store, or the store's
own staged counters) are then checked against what was produced.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from dedupe_consumer import Settings
from dedupe_consumer.models import TopicPartition, header_pairs
from dedupe_consumer.store import RocksStore

from ..kafka_helpers import committed_offsets, end_offsets
from .consumer_process import effects_of, log_of, start_consumer, write_config

PARTITIONS = 4


@dataclass(frozen=True)
class Mode:
    name: str
    mode: str = "plain"
    on_uncertain: str = "dead-letter"
    handler: str = "tests.faults.handlers:AppendHandler"
    transactional: bool = False
    concurrency: int = 1
    ordering: str = "key"
    flaky: int = 0
    """One event in ``flaky`` fails its first attempt: its retry's backoff carries its
    lane past the batch (issue 13), so kills land while lanes are carried."""
    emits: bool = False
    """The handler emits one output per input (``event.emit``): the outputs topic is
    counted instead of the calls, and must hold exactly one per ID in every mode."""
    replies: bool = False
    """The handler also answers (a stored response, sent as the reply to
    ``<topic>.replies``) and duplicates are answered again
    (``processing.reply_on_duplicate``): every delivery of an ID must get one
    reply, all of them the same bytes, whatever the kills."""
    scope: str = "partition"
    """``"topic"``: every other message is placed by Java's partitioner (murmur2), the
    rest by librdkafka's (CRC32), so copies of an ID land on different partitions,
    and the consumer runs with ``dedupe.scope = "topic"`` (issue 14)."""

    @property
    def points(self) -> list[str]:
        base = ["after_handler", "after_persist", "after_commit"]
        return ["after_claim", *base] if self.mode == "claim" else base


MODES = [
    Mode("plain"),
    Mode("claim+retry", "claim", "retry"),
    Mode("claim+skip", "claim", "skip"),
    Mode("claim+dead-letter", "claim", "dead-letter"),
    Mode("claim+reconcile", "claim", "reconcile", "tests.faults.handlers:ReconcilingHandler"),
    Mode("transactional", handler="tests.faults.handlers:LedgerHandler", transactional=True),
]
"""The sequential engine (``processing.concurrency = 1``), every mode."""

SCOPE_MODES = [
    Mode("plain@topic-scope", scope="topic"),
    Mode("claim+retry@c8-key@topic-scope", "claim", "retry", concurrency=8, scope="topic"),
]
"""Topic scope: producers with two partitioners, the hop and the engine, killed."""

EMIT = "tests.faults.handlers:EmitHandler"
EMIT_MODES = [
    Mode("plain+emit", handler=EMIT, emits=True),
    Mode("claim+retry+emit", "claim", "retry", EMIT, emits=True),
    Mode(
        "plain@c8-key-flaky+emit+replies",
        handler=EMIT,
        emits=True,
        concurrency=8,
        flaky=10,
        replies=True,
    ),
]
"""Exactly-once outputs (issue 15): one output per unique input ID, whatever the kills."""

CONCURRENT_MODES = [
    Mode("plain@c8-key", concurrency=8),
    Mode("claim+retry@c8-key", "claim", "retry", concurrency=8),
    Mode("plain@c4-partition", concurrency=4, ordering="partition"),
    Mode("claim+dead-letter@c4-partition", "claim", concurrency=4, ordering="partition"),
    Mode("plain@c8-key-flaky", concurrency=8, flaky=10),
    Mode(
        "transactional@c8-key-flaky",
        handler="tests.faults.handlers:LedgerHandler",
        transactional=True,
        concurrency=8,
        flaky=10,
    ),
]
"""Handlers in parallel (issue 13): plain and claim mode with concurrency 8 in key
order, and with concurrency 4 in partition order."""
SOAK_ONLY = frozenset(
    {"plain@c8-key", "claim+retry@c8-key", "plain@topic-scope", "plain+emit", "claim+retry+emit"}
)
"""Modes the CI kill suite leaves to ``bench/crash_soak.py --extra`` (CI's time budget):
each is covered in CI by a harder mode of its kind: ``plain@c8-key-flaky`` and the
topic-scope ``claim+retry@c8-key`` for the failure-free parallel runs and plain topic
scope, ``plain@c8-key-flaky+emit+replies`` for the emitting ones."""


def plain_repeat_bound(mode: Mode, batch: int, max_unpersisted: int = 1) -> int:
    """The most handler calls one kill may repeat in plain mode.

    The events decided but not yet durable at the kill, whatever the concurrency: the
    write on the persister and the batches gathered for the next one, each at most
    ``max_unpersisted - 1`` events plus the batch that passed the bound; with retries
    in backoff, also the events of carried lanes, at most ``max_unpersisted`` plus a
    batch (docs/concurrency.md).
    """
    carried = max_unpersisted + batch if mode.flaky else 0
    return 2 * (max_unpersisted - 1 + batch) + carried


@dataclass
class Outcome:
    mode: str
    kills: int = 0
    events: int = 0
    unique: int = 0
    lost: list[str] = field(default_factory=list)
    duplicate_effects: dict[str, int] = field(default_factory=dict)
    uncertain: set[str] = field(default_factory=set)
    dead_lettered: set[str] = field(default_factory=set)
    exit_codes: list[int] = field(default_factory=list)
    max_unpersisted: int = 1
    max_batch: int = 0
    notes: list[str] = field(default_factory=list)
    stalls: int = 0
    wrong_replies: dict[str, str] = field(default_factory=dict)
    """Replies mode: IDs whose replies differ from one per delivery of one same value."""

    def row(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "kills": self.kills,
            "events": self.events,
            "lost": len(self.lost),
            "duplicate effects": len(self.duplicate_effects),
            "uncertain outcomes": len(self.uncertain),
            "stalls": self.stalls,
        }


def produce(
    bootstrap: str,
    topic: str,
    events: int,
    duplicates: float,
    seed: int,
    ids: list[str] | None = None,
    mixed: bool = False,
    replication: int = 1,
) -> list[str]:
    """Produce events (creating the topic on first use, with ``replication`` replicas);
    ``ids`` are earlier IDs to repeat. A message the broker did not take fails the call.

    ``mixed``: every other message through a producer with Java's partitioner."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if ids is None:
        admin.create_topics([NewTopic(topic, PARTITIONS, replication)])[topic].result()
    failed: list[str] = []

    def delivered(error: object, _message: object) -> None:
        if error is not None:
            failed.append(str(error))

    rng = random.Random(seed)
    crc32 = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    murmur2 = (
        Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "partitioner": "murmur2_random"})
        if mixed
        else crc32
    )
    ids = ids if ids is not None else []
    sent: list[str] = []
    for n in range(events):
        producer = murmur2 if n % 2 else crc32
        if ids and rng.random() < duplicates:
            event_id = ids[rng.randrange(len(ids))]
        else:
            event_id = str(uuid.UUID(int=rng.getrandbits(128)))
            ids.append(event_id)
        sent.append(event_id)
        while True:
            try:
                producer.produce(
                    topic,
                    key=event_id,
                    value=f'{{"id":"{event_id}"}}',
                    headers=[("event-id", event_id.encode())],
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.05)
    assert crc32.flush(60) == 0 and murmur2.flush(60) == 0
    assert not failed, f"{len(failed)} events not delivered: {failed[:3]}"
    return sent


def _committed(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    """Every committed message of ``topic`` (key, value), as a read_committed reader sees
    them: the outputs and replies of aborted transactions do not count."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"outputs-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    got: list[tuple[bytes, bytes]] = []
    try:
        consumer.subscribe([topic])
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 5:
            for m in consumer.consume(500, 0.5):
                if m.error() is None:
                    got.append((m.key() or b"", m.value() or b""))
                    quiet_since = time.monotonic()
    finally:
        consumer.close()
    return got


def _replies(bootstrap: str, topic: str) -> dict[str, list[bytes]]:
    """Every committed reply of ``topic`` by its key (the request's ID)."""
    replies: dict[str, list[bytes]] = {}
    for key, value in _committed(bootstrap, topic):
        replies.setdefault(key.decode(), []).append(value)
    return replies


def _outputs(bootstrap: str, topic: str) -> Counter[str]:
    """How often each ID was emitted to ``topic``."""
    return Counter(value.decode() for _, value in _committed(bootstrap, topic))


def dead_lettered_ids(bootstrap: str, topic: str) -> set[str]:
    """The event IDs (``dlq.event.id`` headers) of every message in the dead-letter
    ``topic``; empty when the topic does not exist."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"dlq-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    ids: set[str] = set()
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return ids
        parts = [KafkaTopicPartition(topic, p) for p in metadata.partitions]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
        if not any(ends.values()):
            return ids
        consumer.assign([KafkaTopicPartition(topic, p, 0) for p in ends])
        seen = dict.fromkeys(ends, 0)
        deadline = time.monotonic() + 30
        while any(seen[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.5):
                if m.error() is None:
                    seen[m.partition() or 0] = (m.offset() or 0) + 1
                    ids.add((dict(header_pairs(m)).get("dlq.event.id") or b"").decode())
        return ids
    finally:
        consumer.close()


def uncertain_ids(log: Path) -> set[str]:
    """The event IDs of the ``uncertain_outcome`` lines of a consumer's JSON log."""
    found: set[str] = set()
    for line in log.read_text(errors="replace").splitlines():
        if '"uncertain_outcome"' in line:
            try:
                found.add(json.loads(line)["event_id"])
            except (ValueError, KeyError):
                continue
    return found


@dataclass
class Run:
    """One run of a mode, as :func:`start_run` set it up: its topic, the IDs produced
    so far, the consumer's config, the outcome it fills, and when it must end."""

    bootstrap: str
    mode: Mode
    topic: str
    sent: list[str]
    config: Path
    outcome: Outcome
    deadline: float

    @property
    def group(self) -> str:
        return f"{self.topic}-group"

    @property
    def effects(self) -> Path:
        return self.config.parent / "effects"

    @property
    def log(self) -> Path:
        return log_of(self.config)

    def start_consumer(self, fault: str | None = None, after: int = 1) -> subprocess.Popen[bytes]:
        """The mode's consumer process (``fault``: SIGKILLed at that fault point after
        ``after`` hits)."""
        return start_consumer(
            self.config,
            self.effects,
            handler=self.mode.handler,
            fault=fault,
            after=after,
            flaky=self.mode.flaky,
        )


def start_run(
    bootstrap: str,
    workdir: Path,
    mode: Mode,
    *,
    topic_prefix: str,
    events: int,
    duplicates: float,
    seed: int,
    batch: int,
    timeout_s: float,
    max_unpersisted: int = 1,
    static_member: bool = True,
    replication: int = 1,
) -> Run:
    """Set up a run of ``mode``: a new topic ``<topic_prefix>-<mode>-<random>`` with
    ``replication`` replicas and ``events`` produced to it, the topics the mode's
    handler writes to, and the consumer's config in ``workdir``; the run must end
    ``timeout_s`` from now."""
    workdir.mkdir(parents=True, exist_ok=True)
    slug = mode.name.replace("+", "-").replace("@", "-")
    topic = f"{topic_prefix}-{slug}-{uuid.uuid4().hex[:8]}"
    mixed = mode.scope == "topic"
    sent = produce(bootstrap, topic, events, duplicates, seed, mixed=mixed, replication=replication)
    if mode.emits:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        outs = [f"{topic}.out", *([f"{topic}.replies"] if mode.replies else [])]
        for future in admin.create_topics([NewTopic(name, 4, 1) for name in outs]).values():
            future.result()
    config = write_config(
        workdir,
        bootstrap,
        topic,
        batch=batch,
        mode=mode.mode,
        on_uncertain=mode.on_uncertain,
        static_member=static_member,
        concurrency=mode.concurrency,
        ordering=mode.ordering,
        max_unpersisted=max_unpersisted,
        scope=mode.scope,
        reply_topic=f"{topic}.replies" if mode.replies else None,
    )
    outcome = Outcome(
        mode.name,
        events=events,
        unique=len(set(sent)),
        max_batch=batch,
        max_unpersisted=max_unpersisted,
    )
    return Run(bootstrap, mode, topic, sent, config, outcome, time.monotonic() + timeout_s)


def run_mode(
    bootstrap: str,
    workdir: Path,
    mode: Mode,
    *,
    events: int,
    duplicates: float,
    kills: int,
    seed: int,
    batch: int = 100,
    timeout_s: float = 240,
    max_unpersisted: int = 1,
) -> Outcome:
    """Produce, kill ``kills`` times, finish, and check; returns what was measured."""
    rng = random.Random(seed)
    run = start_run(
        bootstrap,
        workdir,
        mode,
        topic_prefix="suite",
        events=events,
        duplicates=duplicates,
        seed=seed,
        batch=batch,
        timeout_s=timeout_s,
        max_unpersisted=max_unpersisted,
    )
    topic, sent, outcome, deadline = run.topic, run.sent, run.outcome, run.deadline
    processing = Settings.from_toml(run.config).processing  # what the process will run with
    assert (processing.concurrency, processing.ordering) == (mode.concurrency, mode.ordering)

    def done() -> bool:
        moved = committed_offsets(bootstrap, run.group, topic, PARTITIONS) == end_offsets(
            bootstrap, topic, PARTITIONS
        )
        if not moved or mode.scope != "topic":
            return moved
        # Topic scope: the source is read (by the hop); every ID is decided too? (The
        # by-id topic's end offsets count transaction markers: no offset comparison.)
        return set(sent) <= set(effects_of(run.effects)) | dead_lettered_ids(
            bootstrap, f"{topic}.dlq"
        )

    known = list(dict.fromkeys(sent))
    for k in range(kills):
        if time.monotonic() > deadline:
            break
        if done():  # drained before the kills ran out: more traffic, more kills
            sent += produce(
                bootstrap,
                topic,
                max(1000, events // 4),
                duplicates,
                seed + k,
                ids=known,
                mixed=mode.scope == "topic",
            )
        random_moment = k % 3 == 2
        point = None if random_moment else mode.points[k % len(mode.points)]
        proc = run.start_consumer(fault=point, after=rng.randint(1, 6))
        if random_moment:
            time.sleep(rng.uniform(0.5, 2.0))  # during start-up, restore or a batch
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            # The fault point was not reached: fine if the topic is drained (too few
            # batches left), a stall worth failing for if work remained.
            if not done():
                outcome.stalls += 1
                outcome.notes.append(f"run {k} ({point}) made no progress for 60 s")
            proc.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=30)
        outcome.exit_codes.append(code)
        if code == -signal.SIGKILL:
            outcome.kills += 1
    unique = set(sent)
    outcome.events, outcome.unique = len(sent), len(unique)

    final = run.start_consumer()
    try:
        while not done() and time.monotonic() < deadline + 120:
            time.sleep(0.5)
    finally:
        final.send_signal(signal.SIGTERM)
        outcome.exit_codes.append(final.wait(timeout=60))

    measure(bootstrap, workdir, topic, mode, sent, outcome, run.log)
    return outcome


def measure(
    bootstrap: str,
    workdir: Path,
    topic: str,
    mode: Mode,
    sent: list[str],
    outcome: Outcome,
    log: Path,
) -> None:
    """Fill ``outcome`` from what the runs left: uncertain outcomes, dead letters, lost
    IDs, duplicate effects (and wrong replies), by the mode's way of counting effects."""
    effects = workdir / "effects"
    unique = set(sent)
    outcome.uncertain = uncertain_ids(log)
    outcome.dead_lettered = dead_lettered_ids(bootstrap, f"{topic}.dlq")
    counts: Counter[str]
    if mode.emits:
        counts = _outputs(bootstrap, f"{topic}.out")
    elif mode.transactional:
        counts = Counter()
        store = RocksStore(workdir / "state", retention_ms=10**12)
        try:
            for p in range(PARTITIONS):
                for key, value in store.effects(TopicPartition(topic, p)):
                    counts[key.decode().removeprefix("count:")] += int(value)
        finally:
            store.close()
    else:
        counts = effects_of(effects)
    outcome.lost = sorted(unique - set(counts) - outcome.dead_lettered)
    if outcome.lost:
        calls = effects_of(effects)
        store = RocksStore(workdir / "state", retention_ms=10**12)
        try:
            now = int(time.time() * 1000)
            for p in range(PARTITIONS):
                tp = TopicPartition(topic, p)
                found = [d for d in store.lookup(tp, outcome.lost, now) if d is not None]
                if found:
                    statuses = Counter(d.status.name for d in found)
                    outcome.notes.append(
                        f"p{p}: {len(found)} lost have records {statuses}"
                        f" offsets {min(d.offset for d in found)}..{max(d.offset for d in found)}"
                        f" wm={store.watermark(tp)}"
                    )
        finally:
            store.close()
        outcome.notes.append(
            f"lost IDs with a handler call: {sum(1 for i in outcome.lost if i in calls)}"
        )
        outcome.notes.append(f"exit codes {outcome.exit_codes}")
    outcome.duplicate_effects = {i: n for i, n in counts.items() if n > 1}
    if mode.replies:
        delivered = Counter(sent)
        replies = _replies(bootstrap, f"{topic}.replies")
        for event_id in unique - outcome.dead_lettered:
            values = replies.get(event_id, [])
            if len(values) != delivered[event_id] or len(set(values)) != 1:
                outcome.wrong_replies[event_id] = f"{delivered[event_id]} sent, replies {values}"
