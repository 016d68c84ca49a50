"""The rebalance storm: consumer processes in one group, restarted and killed while events flow.

Shared by ``tests/faults/test_storm.py`` (CI: a short storm) and ``bench/storm.py``
(two minutes and more). Several real ``python -m dedupe_consumer run`` processes
join one group, each with its own store directory; they share one append-only
effects file, each line tagged with the *incarnation* (slot and start number) of
the process that made the call. While a producer thread sends a steady stream
(new IDs, plus re-sends of IDs first sent long before, which land on partitions
that have changed owners since), a chaos loop restarts the consumers one after
another with SIGTERM (a graceful move: the leaver persists what it decided and
the group rebalances) and SIGKILLs some of them at random moments (restarted
after a pause). Then every consumer is left running until every partition's
committed offset is its end, all are stopped with SIGTERM, and the effects are
checked against what was produced.

How a repeated effect is attributed (:func:`attribute_repeats`): each repeat of
an ID is charged to the call of that ID just before it. A SIGKILL repeats only
what the killed process had decided but not made durable, i.e. some of its
*last* calls: at most :func:`~tests.faults.suite.plain_repeat_bound` of them
(the write being persisted plus the batches gathered for the next). So a repeat
counts as a kill-window repeat only when the earlier call was made by an
incarnation that ended by SIGKILL *and* is among its last ``bound`` calls.
Every other repeat (the earlier call made by a process that stopped gracefully,
is still running, or made both calls) is one across a graceful move: the
product promises none.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from dedupe_consumer.store import changelog_topic

from ..kafka_helpers import CLASSIC_ONLY as CLASSIC_ONLY_KEYS
from ..kafka_helpers import committed_offsets, end_offsets
from .consumer_process import effect_lines, log_of, start_consumer, write_config
from .suite import Mode, dead_lettered_ids, plain_repeat_bound, uncertain_ids

CLASSIC_ONLY = tuple(f'"{key}"' for key in CLASSIC_ONLY_KEYS)
"""The config lines (``write_config``'s) the consumer group protocol does not take."""


@dataclass(frozen=True)
class Storm:
    """What the storm does; the defaults are the bench's two-minute storm."""

    consumers: int = 4
    partitions: int = 8
    duration_s: float = 120
    """Production and faults run this long; then the drain."""
    rate: float = 200
    """Messages per second, steadily."""
    resend: float = 0.1
    """Share of messages that re-send an old ID (one first sent ``resend_age_s`` ago or
    earlier): a duplicate that must be recognised by whoever owns its partition now."""
    resend_age_s: float = 30
    fault_every_s: float = 8
    """Mean gap between two faults (each gap drawn from 0.5 to 1.5 times it)."""
    kill_share: float = 0.4
    """Share of the faults that are SIGKILLs; the others are SIGTERM restarts, in turn."""
    point_share: float = 0.5
    """Share of the SIGKILLs that land at a named crash point (``dedupe_consumer._faults``:
    after a handler call, after a claim, before or after a persist, after a commit) instead of at a
    random moment: the next consumer in turn is restarted with the point armed, and
    kills itself there after a random number of hits. A random moment mostly finds an
    idle consumer; a crash point is inside the window a kill may repeat."""
    crash_points: tuple[str, ...] = ()
    """The crash points to draw from; all of the mode's when empty."""
    restart_after_s: tuple[float, float] = (0.5, 3.0)
    """A SIGKILLed consumer is started again after a pause drawn from this range."""
    batch: int = 100
    max_unpersisted: int = 1
    assignment: str | None = None
    """``partition.assignment.strategy``; librdkafka's default (eager) when ``None``."""
    group_protocol: str = "classic"
    """``"consumer"``: the consumer group protocol (KIP-848), where the broker assigns
    and owns session timing (``session.timeout.ms``, ``heartbeat.interval.ms`` and
    ``assignment`` do not apply)."""
    changelog: bool = True
    """``False`` (a negative control): no state moves with a partition, so re-sent old
    IDs are handled again by their new owners and show up as graceful repeats."""
    seed: int = 1
    ready_timeout_s: float = 20
    """A SIGTERM restart waits (this long at most) for its target to have joined the
    group since it started, as a rolling restart waits for readiness; SIGKILLs do not."""
    stop_timeout_s: float = 60
    drain_timeout_s: float = 180


@dataclass
class Incarnation:
    """One start of one consumer slot."""

    tag: str
    slot: int
    pid: int
    started_s: float
    ended_s: float | None = None
    end: str = "running"
    """``term`` (SIGTERM restart), ``kill`` (SIGKILL), ``final`` (SIGTERM after the
    drain), ``crash`` (exited without being told), ``term-timeout`` (killed after a
    SIGTERM it did not obey within ``stop_timeout_s``), ``term-early`` (died of the
    SIGTERM itself: it came before the consumer installed its handler, during start-up,
    so it ended as abruptly as a kill)."""
    exit_code: int | None = None
    armed: str | None = None
    """The crash point it kills itself at, and after how many hits (``after_handler*37``)."""
    stop_s: float | None = None
    """SIGTERM to exit."""


@dataclass
class Repeats:
    """Repeated handler calls, attributed (see the module docstring)."""

    after_kill: int = 0
    """Extra calls charged to a SIGKILL window."""
    per_kill: dict[str, int] = field(default_factory=dict)
    """Killed incarnation → extra calls charged to it."""
    graceful: dict[str, list[str]] = field(default_factory=dict)
    """ID → the tags of all its calls, for each ID with a repeat no kill explains."""

    @property
    def graceful_calls(self) -> int:
        return sum(len(tags) - 1 for tags in self.graceful.values())


def attribute_repeats(calls: list[tuple[str, str]], killed: set[str], bound: int) -> Repeats:
    """Charge each repeated call (``calls``: ``(id, tag)`` in the order they were made)
    to the call of the same ID before it: to a SIGKILL window when that call was made by
    an incarnation in ``killed`` and is among its last ``bound`` calls, otherwise to a
    graceful move."""
    total: Counter[str] = Counter(tag for _, tag in calls)
    position: Counter[str] = Counter()
    last: dict[str, tuple[str, int]] = {}
    tags: dict[str, list[str]] = {}
    out = Repeats()
    unexplained: set[str] = set()
    for event_id, tag in calls:
        position[tag] += 1
        tags.setdefault(event_id, []).append(tag)
        before = last.get(event_id)
        last[event_id] = (tag, position[tag])
        if before is None:
            continue
        by, at = before
        if by in killed and by != tag and total[by] - at < bound:
            out.after_kill += 1
            out.per_kill[by] = out.per_kill.get(by, 0) + 1
        else:
            unexplained.add(event_id)
    out.graceful = {i: tags[i] for i in sorted(unexplained)}
    return out


@dataclass
class StormOutcome:
    mode: str
    storm: Storm
    produced: int = 0
    unique: int = 0
    resends: int = 0
    """Messages that re-sent an ID first sent ``resend_age_s`` or more before."""
    terms: int = 0
    kills: int = 0
    point_kills: int = 0
    """Of ``kills``: at a crash point (the rest at a random moment)."""
    crashes: int = 0
    stop_timeouts: int = 0
    rebalances: int = 0
    """Rebalances the members saw: their ``assigned`` logs, grouped by time."""
    restored_records: int = 0
    lost: list[str] = field(default_factory=list)
    dead_lettered: set[str] = field(default_factory=set)
    duplicate_effects: dict[str, int] = field(default_factory=dict)
    """IDs whose effect happened more than once (the staged counter in transactional
    mode, the handler call otherwise)."""
    repeats: Repeats = field(default_factory=Repeats)
    repeat_bound: int = 0
    uncertain: set[str] = field(default_factory=set)
    catch_up_s: float | None = None
    """From the last fault to every partition's committed offset at its end; ``None``
    when that never happened within ``drain_timeout_s``."""
    catch_up_after_production_s: float | None = None
    final_lag: dict[int, int] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    """Error-level log events of all consumers, by name."""
    incarnations: list[Incarnation] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    """``(seconds since the start, "term", "kill" or "kill@<point>", incarnation tag)``."""
    last_fault_s: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, object]:
        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f} s"

        return {
            "mode": self.mode,
            "consumers": self.storm.consumers,
            "partitions": self.storm.partitions,
            "produced (unique)": f"{self.produced:,} ({self.unique:,})",
            "re-sent old IDs": f"{self.resends:,}",
            "SIGTERM restarts": self.terms,
            "SIGKILLs (at a crash point)": f"{self.kills} ({self.point_kills})",
            "rebalances": self.rebalances,
            "lost": len(self.lost),
            "duplicate effects": len(self.duplicate_effects),
            "repeated calls: kill windows": self.repeats.after_kill,
            "repeated calls: graceful moves": self.repeats.graceful_calls,
            "caught up: after last fault": seconds(self.catch_up_s),
            "after production end": seconds(self.catch_up_after_production_s),
        }


class _Slot:
    """One consumer of the group: its directory, config and current process."""

    def __init__(self, index: int, workdir: Path, config: Path, effects: Path, mode: Mode):
        self.index, self.workdir, self.config = index, workdir, config
        self.effects, self.mode = effects, mode
        self.proc: subprocess.Popen[bytes] | None = None
        self.current: Incarnation | None = None
        self.starts = 0
        self._log_from = 0

    def ready(self) -> bool:
        """The current process has joined the group (logged an assignment since it
        started): what a rolling restart waits for before it moves on."""
        log = log_of(self.config)
        if self.proc is None or not log.exists():
            return False
        with log.open("rb") as fh:
            fh.seek(self._log_from)
            return b'"event": "assigned"' in fh.read()

    def start(
        self, clock: float, log: list[Incarnation], armed: tuple[str, int] | None = None
    ) -> None:
        tag = f"c{self.index}.{self.starts}"
        self.starts += 1
        path = log_of(self.config)
        self._log_from = path.stat().st_size if path.exists() else 0
        self.proc = start_consumer(
            self.config,
            self.effects,
            handler=self.mode.handler,
            flaky=self.mode.flaky,
            tag=tag,
            fault=armed[0] if armed else None,
            after=armed[1] if armed else 1,
        )
        self.current = Incarnation(tag, self.index, self.proc.pid, clock)
        if armed:
            self.current.armed = f"{armed[0]}*{armed[1]}"
        log.append(self.current)

    def ended(self, how: str, clock: float, code: int) -> None:
        assert self.current is not None
        self.current.end, self.current.ended_s, self.current.exit_code = how, clock, code
        self.proc = self.current = None


def _resend_pick(
    rng: random.Random, times: list[float], ids: list[str], before: float
) -> str | None:
    k = bisect.bisect_right(times, before)
    return ids[rng.randrange(k)] if k else None


def _producer(
    bootstrap: str,
    topic: str,
    storm: Storm,
    sent: list[str],
    resent: list[str],
    failure: list[BaseException],
) -> None:
    """Steady production for ``storm.duration_s``: new IDs, and re-sends of old ones."""
    try:
        t0 = time.monotonic()
        rng = random.Random(storm.seed * 7919)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        first_times: list[float] = []
        first_ids: list[str] = []
        while (now := time.monotonic() - t0) < storm.duration_s:
            for _ in range(int(storm.rate * now) - len(sent)):
                event_id = None
                if rng.random() < storm.resend:
                    event_id = _resend_pick(rng, first_times, first_ids, now - storm.resend_age_s)
                    if event_id is not None:
                        resent.append(event_id)
                if event_id is None:
                    event_id = str(uuid.UUID(int=rng.getrandbits(128)))
                    first_times.append(now)
                    first_ids.append(event_id)
                sent.append(event_id)
                while True:
                    try:
                        producer.produce(
                            topic,
                            key=event_id,
                            value=f'{{"id":"{event_id}"}}',
                            headers=[("event-id", event_id.encode())],
                        )
                        break
                    except BufferError:
                        producer.poll(0.05)
            producer.poll(0)
            time.sleep(0.05)
        assert producer.flush(60) == 0, "messages left unsent"
    except BaseException as exc:  # reported by the main thread
        failure.append(exc)


def _schedule(storm: Storm, rng: random.Random) -> list[tuple[float, str]]:
    """When each fault happens and which kind (``term``, ``kill``, ``point``: a restart
    armed with a crash point), drawn up front from the seed; a fixed share of kills (at
    least one when ``kill_share`` > 0)."""
    times: list[float] = []
    t = storm.fault_every_s * rng.uniform(0.5, 1.0)
    while t < storm.duration_s - 1:
        times.append(t)
        t += storm.fault_every_s * rng.uniform(0.5, 1.5)
    kills = round(len(times) * storm.kill_share)
    if storm.kill_share > 0 and times:
        kills = max(1, kills)
    points = round(kills * storm.point_share)
    kinds = ["point"] * points + ["kill"] * (kills - points) + ["term"] * (len(times) - kills)
    rng.shuffle(kinds)
    return list(zip(times, kinds, strict=True))


def _events(log: Path) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []
    if not log.exists():
        return found
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _rebalances(assigned_at: list[float], gap_s: float = 1.5) -> int:
    """Assignments less than ``gap_s`` apart belong to one rebalance."""
    count, previous = 0, None
    for t in sorted(assigned_at):
        if previous is None or t - previous > gap_s:
            count += 1
        previous = t
    return count


def _staged_counts(bootstrap: str, changelog: str) -> Counter[str]:
    """Transactional mode's effect: the ledger's ``count:<id>`` as the changelog (read
    committed, last value per key) holds it, whichever store owns the partition now."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"storm-counts-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,  # at the last stable offset: nothing is open now
        }
    )
    records: list[tuple[bytes, bytes | None]] = []
    try:
        metadata = consumer.list_topics(changelog, timeout=30).topics[changelog]
        consumer.assign([KafkaTopicPartition(changelog, p, 0) for p in metadata.partitions])
        pending = set(metadata.partitions)
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(m.partition())
                    continue
                records.append((m.key() or b"", m.value()))
        assert not pending, f"changelog partitions {pending} not read to their end"
    finally:
        consumer.close()
    return staged_counts(records)


def staged_counts(records: Sequence[tuple[bytes, bytes | None]]) -> Counter[str]:
    """How often each ID's effect happened, from the changelog's committed ``(key,
    value)`` records of the ledger's ``count:<id>``, in order: its last value, or how
    many times a value was committed if that is more. A new owner that lost an ID's
    state (the counter with it) and handled it again commits ``1`` a second time: the
    last value alone would say once."""
    latest: dict[bytes, bytes] = {}
    commits: Counter[bytes] = Counter()
    for key, value in records:
        if key.startswith(b"e:count:"):
            latest[key] = value or b""
            commits[key] += 1 if value else 0
    return Counter(
        {k[len(b"e:count:") :].decode(): max(int(v or b"0"), commits[k]) for k, v in latest.items()}
    )


def _caught_up(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """Per partition, end offset minus committed offset (a partition never committed
    counts its whole end); empty when the broker could not say."""
    try:
        done = committed_offsets(bootstrap, group, topic, partitions)
        ends = end_offsets(bootstrap, topic, partitions)
    except KafkaException:
        return {p: -1 for p in range(partitions)}
    return {p: ends[p] - max(done.get(p, 0), 0) for p in range(partitions)}


def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Best effort: a storm on a shared broker leaves nothing behind."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(names, operation_timeout=30).values():
        with contextlib.suppress(KafkaException):
            future.result()


def run_storm(
    bootstrap: str, workdir: Path, mode: Mode, storm: Storm, *, keep_topics: bool = False
) -> StormOutcome:
    """Run one storm and check what it did; see the module docstring."""
    started = time.monotonic()
    rng = random.Random(storm.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    slug = mode.name.replace("+", "-").replace("@", "-")
    topic = f"storm-{slug}-{uuid.uuid4().hex[:8]}"
    group = f"{topic}-group"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, storm.partitions, 1)])[topic].result()
    effects = workdir / "effects"
    slots = []
    for i in range(storm.consumers):
        home = workdir / f"c{i}"
        home.mkdir(exist_ok=True)
        config = write_config(
            home,
            bootstrap,
            topic,
            batch=storm.batch,
            mode=mode.mode,
            on_uncertain=mode.on_uncertain,
            concurrency=mode.concurrency,
            ordering=mode.ordering,
            max_unpersisted=storm.max_unpersisted,
            log_level="info",
            assignment=storm.assignment,
        )
        text = config.read_text()
        if not storm.changelog:
            text = text.replace("[store]\n", "[store]\nchangelog = false\n", 1)
        if storm.group_protocol != "classic":
            kept = [line for line in text.splitlines() if not line.startswith(CLASSIC_ONLY)]
            text = "\n".join(kept).replace(
                "[kafka.consumer]\n",
                f'[kafka.consumer]\n"group.protocol" = "{storm.group_protocol}"\n',
                1,
            )
        config.write_text(text)
        slots.append(_Slot(i, home, config, effects, mode))
    out = StormOutcome(mode.name, storm)
    out.repeat_bound = plain_repeat_bound(mode, storm.batch, storm.max_unpersisted)
    sent: list[str] = []
    resent: list[str] = []
    failure: list[BaseException] = []
    t0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t0

    def stop(slot: _Slot, how: str, asked: float | None = None) -> None:
        """``asked``: when SIGTERM was sent already (the final stop signals all first)."""
        proc = slot.proc
        assert proc is not None
        if how == "kill":
            proc.send_signal(signal.SIGKILL)
            slot.ended("kill", clock(), proc.wait(timeout=30))
            return
        if asked is None:
            asked = time.monotonic()
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=storm.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=30)
            out.stop_timeouts += 1
            out.notes.append(
                f"{slot.current and slot.current.tag} ignored SIGTERM for "
                f"{storm.stop_timeout_s:.0f} s"
            )
            how = "term-timeout"
        if code == -signal.SIGTERM:  # before its handler was installed: an abrupt end
            out.notes.append(f"{slot.current and slot.current.tag} died of SIGTERM itself")
            how = "term-early"
        stopped_at = time.monotonic()
        assert slot.current is not None
        slot.current.stop_s = stopped_at - asked
        slot.ended(how, clock(), code)

    def reap_crashed() -> None:
        for slot in slots:
            if slot.proc is None or slot.proc.poll() is None:
                continue
            assert slot.current is not None
            code, tag, armed = slot.proc.returncode, slot.current.tag, slot.current.armed
            if armed is not None and code == -signal.SIGKILL:  # at its crash point
                out.kills += 1
                out.point_kills += 1
                out.last_fault_s = clock()
                out.faults.append((out.last_fault_s, f"kill@{armed}", tag))
                slot.ended("kill", clock(), code)
            else:
                out.crashes += 1
                out.notes.append(f"{tag} exited by itself with {code}")
                slot.ended("crash", clock(), code)
            slot.start(clock(), out.incarnations)

    producer = threading.Thread(
        target=_producer,
        args=(bootstrap, topic, storm, sent, resent, failure),
        name="storm-producer",
        daemon=True,
    )
    try:
        for slot in slots:
            slot.start(clock(), out.incarnations)
        ready_by = time.monotonic() + storm.ready_timeout_s  # the group formed, then the storm
        while not all(slot.ready() for slot in slots) and time.monotonic() < ready_by:
            time.sleep(0.1)
        t0 = time.monotonic()
        for incarnation in out.incarnations:
            incarnation.started_s = 0.0
        producer.start()
        turn = 0
        for at, kind in _schedule(storm, rng):
            while clock() < at:
                reap_crashed()
                time.sleep(0.1)
            if kind == "kill":  # at random, sparing one armed for its crash point
                unarmed = [s for s in slots if not (s.current and s.current.armed)]
                slot = rng.choice(unarmed or slots)
                out.faults.append((clock(), "kill", slot.current.tag if slot.current else "?"))
                stop(slot, "kill")
                out.kills += 1
                out.last_fault_s = clock()
                pause_until = clock() + rng.uniform(*storm.restart_after_s)
                while clock() < pause_until:
                    time.sleep(0.05)
            else:  # a SIGTERM restart, the new process armed with a crash point or not
                # in turn; one armed and not yet at its point is left to get there
                order = [slots[(turn + k) % len(slots)] for k in range(len(slots))]
                slot = next((s for s in order if not (s.current and s.current.armed)), order[0])
                turn = slot.index + 1
                ready_by = clock() + storm.ready_timeout_s  # a rolling restart waits
                while not slot.ready() and clock() < ready_by:
                    reap_crashed()
                    time.sleep(0.1)
                out.faults.append((clock(), "term", slot.current.tag if slot.current else "?"))
                stop(slot, "term")
                out.terms += 1
                out.last_fault_s = clock()
            armed = None
            if kind == "point":
                point = rng.choice(storm.crash_points or [*mode.points, "before_persist"])
                per_event = point in ("after_handler", "after_claim")
                armed = (point, rng.randint(10, 150) if per_event else rng.randint(2, 20))
            slot.start(clock(), out.incarnations, armed)
            reap_crashed()
        producer.join(timeout=storm.duration_s + 120)
        if failure:
            raise RuntimeError(f"the producer failed: {failure[0]!r}") from failure[0]
        production_end = clock()
        lag = _caught_up(bootstrap, group, topic, storm.partitions)
        while any(lag.values()) and clock() < production_end + storm.drain_timeout_s:
            reap_crashed()
            time.sleep(0.5)
            lag = _caught_up(bootstrap, group, topic, storm.partitions)
        out.final_lag = {p: n for p, n in lag.items() if n}
        if not out.final_lag:
            out.catch_up_s = clock() - out.last_fault_s
            out.catch_up_after_production_s = clock() - production_end
        else:
            out.notes.append(f"not caught up after {storm.drain_timeout_s:.0f} s: {out.final_lag}")
    finally:  # all at once: a group that shrinks one member at a time rebalances each time
        running = [slot for slot in slots if slot.proc is not None]
        asked = time.monotonic()
        for slot in running:
            assert slot.proc is not None
            slot.proc.send_signal(signal.SIGTERM)
        for slot in running:
            stop(slot, "final", asked)

    out.produced, out.unique, out.resends = len(sent), len(set(sent)), len(resent)
    killed = {i.tag for i in out.incarnations if i.end in ("kill", "term-timeout", "term-early")}
    for incarnation in out.incarnations:
        if incarnation.end in ("term", "final") and incarnation.exit_code != 0:
            out.notes.append(f"{incarnation.tag} exited with {incarnation.exit_code} on SIGTERM")
    calls = effect_lines(effects)
    out.repeats = attribute_repeats(calls, killed, out.repeat_bound)
    out.dead_lettered = dead_lettered_ids(bootstrap, f"{topic}.dlq")
    assigned_at: list[float] = []
    for slot in slots:
        out.uncertain |= uncertain_ids(log_of(slot.config))
        for event in _events(log_of(slot.config)):
            name = str(event.get("event"))
            if event.get("level") == "error":
                out.errors[name] += 1
            if name == "assigned":
                stamp = str(event.get("timestamp", ""))
                with contextlib.suppress(ValueError):
                    assigned_at.append(datetime.fromisoformat(stamp).timestamp())
            elif name == "changelog_restored":
                records = event.get("records")
                out.restored_records += records if isinstance(records, int) else 0
    out.rebalances = _rebalances(assigned_at)
    counts: Counter[str]
    if mode.transactional:
        counts = _staged_counts(bootstrap, changelog_topic(group, topic))
    else:
        counts = Counter(event_id for event_id, _ in calls)
    unique = set(sent)
    out.lost = sorted(unique - set(counts) - out.dead_lettered)
    out.duplicate_effects = {i: n for i, n in counts.items() if n > 1}
    strays = set(counts) - unique
    if strays:
        out.notes.append(f"{len(strays)} effects of IDs never produced: {sorted(strays)[:3]}")
    if not keep_topics:
        delete_topics(bootstrap, [topic, f"{topic}.dlq", changelog_topic(group, topic)])
    out.wall_s = time.monotonic() - started
    (workdir / "storm.json").write_text(json.dumps(_evidence(out, topic), indent=1))
    return out


def _evidence(out: StormOutcome, topic: str) -> dict[str, object]:
    """What a reader needs to follow a finding up: written beside the consumers' logs."""
    return {
        "topic": topic,
        "row": out.row(),
        "storm": asdict(out.storm),
        "faults": out.faults,
        "incarnations": [asdict(i) for i in out.incarnations],
        "lost": out.lost[:100],
        "graceful_repeats": dict(list(out.repeats.graceful.items())[:100]),
        "repeats_per_kill": out.repeats.per_kill,
        "duplicate_effects": dict(list(out.duplicate_effects.items())[:100]),
        "final_lag": out.final_lag,
        "errors": dict(out.errors),
        "notes": out.notes,
    }


def markdown(rows: list[dict[str, object]]) -> str:
    """``rows`` as a markdown table (numbers right-aligned)."""
    head = list(rows[0])
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if h == "mode" else "---:" for h in head) + "|",
    ]
    lines += ["| " + " | ".join(str(row[h]) for h in head) + " |" for row in rows]
    return "\n".join(lines)
