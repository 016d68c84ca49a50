"""How fast a new owner decides when its partition's state is large (issue 17).

    python -m bench.restore fill --ids 10000000            # prints the topic and group
    python -m bench.restore measure --topic T --group G    # once per code version
    python -m bench.restore delete --topic T --group G     # the source and changelog topics

``fill`` creates a source topic of ``--partitions`` partitions (1 by default)
and fills its changelog with ``--ids`` decided event IDs (ID ``i`` on partition
``i % partitions``, and a watermark per partition) through the package's own
:meth:`Changelog.write` (same records, same transactions, no copy of the
encoding), in transactions of ``--chunk`` records. Each source partition gets
one event, at offset 0, whose ID is among its own: it sits at the watermark.

``measure`` produces one new event to the source topic, then starts a real
:class:`DedupeConsumer` of the group on the real broker with an **empty
store** in a child process, and reports:

* assignment → first decision: from entering the assign callback to the
  handler's call for the new event (with several partitions: to the first
  decision on the last partition to be restored, i.e. all of them deciding);
* the restore alone (the ``dedupe_restore_seconds`` metric) and IDs/s;
* peak RSS of the child (``ru_maxrss``), which only restores and decides;
* a check that the first and the last filled IDs are in the store afterwards.

The topic is filled once and measured by every code version, alternating (the
machine is shared: compare runs of one sitting). Each ``measure`` decides one
new event, so the changelog grows by a few records per run; that is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # admin re-exports it without __all__

_DEFAULT_BOOTSTRAP = "127.0.0.1:19092"


def _event_id(token: str, i: int) -> str:
    return f"{token}-{i:012d}"  # 36 characters with a 23-character token, like a UUID


def _bootstrap(args: argparse.Namespace) -> str:
    return str(args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", _DEFAULT_BOOTSTRAP))


def fill(args: argparse.Namespace) -> None:
    from dedupe_consumer.config import KafkaConnection
    from dedupe_consumer.kafka.changelog import Changelog
    from dedupe_consumer.models import TopicPartition
    from dedupe_consumer.store import IdRecord, WriteSet
    from dedupe_consumer.store.base import RecordStatus

    bootstrap = _bootstrap(args)
    token = uuid.uuid4().hex[:16]
    topic = f"bench-restore-{token}"
    group = f"bench-restore-{token}"
    id_token = f"restore-{token[:15]}"
    partitions = args.partitions
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result()
    producer = Producer({"bootstrap.servers": bootstrap})
    for p in range(partitions):
        first_id = _event_id(id_token, p)
        producer.produce(
            topic, key=first_id.encode(), value=b"{}", headers=[("event-id", first_id)], partition=p
        )
    assert producer.flush(30) == 0
    changelog = Changelog(
        KafkaConnection(bootstrap_servers=bootstrap),
        group,
        timedelta(days=7),
        f"bench-restore-fill-{token}",
        producer_config={"linger.ms": 50, "batch.size": 1_000_000, "compression.type": "lz4"},
    )
    changelog.ensure_topics([topic])
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    now_ms = int(time.time() * 1000)
    digest = b"\x01" * 8
    started = time.monotonic()
    done = 0
    while done < args.ids:
        n = min(args.chunk, args.ids - done)
        records: dict[TopicPartition, list[tuple[str, IdRecord]]] = {tp: [] for tp in tps}
        for i in range(done, done + n):
            record = IdRecord(RecordStatus.HANDLED, 0, now_ms, digest)
            records[tps[i % partitions]].append((_event_id(id_token, i), record))
        done += n
        # The watermarks: offset 0 of each partition (the one event there) is decided.
        last = done == args.ids
        changelog.write(WriteSet(records, watermarks=dict.fromkeys(tps, 0) if last else {}))
        elapsed = time.monotonic() - started
        print(f"  filled {done:,} IDs in {elapsed:.0f}s", file=sys.stderr)
    changelog.close()
    print(
        json.dumps(
            {
                "topic": topic,
                "group": group,
                "ids": args.ids,
                "partitions": partitions,
                "id_token": id_token,
                "fill_s": round(time.monotonic() - started, 1),
            }
        )
    )


def measure(args: argparse.Namespace) -> None:
    """Run the child (a fresh process, so its peak RSS is the restore's) and print its line."""
    with tempfile.TemporaryDirectory(prefix="bench-restore-") as tmp:
        command = [
            sys.executable, "-m", "bench.restore", "_child",
            "--topic", args.topic, "--group", args.group, "--store", str(Path(tmp) / "store"),
            "--bootstrap", _bootstrap(args), "--ids", str(args.ids), "--id-token", args.id_token,
        ]  # fmt: skip
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["code"] = str(Path.cwd())
    print(json.dumps(result))


def child(args: argparse.Namespace) -> None:
    from dedupe_consumer import DedupeConsumer, Event, Handler, Settings
    from dedupe_consumer import consumer as consumer_module
    from dedupe_consumer.models import TopicPartition
    from dedupe_consumer.observability import Metrics
    from dedupe_consumer.store import RocksStore

    bootstrap = args.bootstrap
    partitions = len(
        AdminClient({"bootstrap.servers": bootstrap})
        .list_topics(args.topic, timeout=30)
        .topics[args.topic]
        .partitions
    )
    new_ids = {f"new-{p}-{uuid.uuid4()}": p for p in range(partitions)}  # one per partition
    producer = Producer({"bootstrap.servers": bootstrap})
    for new_id, p in new_ids.items():
        producer.produce(
            args.topic,
            key=new_id.encode(),
            value=b"{}",
            headers=[("event-id", new_id)],
            partition=p,
        )
    assert producer.flush(30) == 0

    marks: dict[str, float] = {}
    listener = consumer_module._Listener
    # The assignment's first call to the listener: prepare (the restore then runs off the
    # polling thread), or on_assigned in versions that restored inside it.
    first_call = "prepare" if hasattr(listener, "prepare") else "on_assigned"
    original = getattr(listener, first_call)

    def assigned(self: Any, *a: Any, **kw: Any) -> Any:
        marks.setdefault("assigned", time.monotonic())
        return original(self, *a, **kw)

    setattr(listener, first_call, assigned)

    class FirstDecision(Handler):
        def handle(self, event: Event) -> None:
            if event.id in new_ids:
                marks.setdefault(event.id, time.monotonic())
                marks.setdefault("first", time.monotonic())
                if all(i in marks for i in new_ids):
                    marks.setdefault("decided", time.monotonic())

    settings = Settings.load(
        kafka={
            "bootstrap_servers": bootstrap,
            "group_id": args.group,
            "topics": [args.topic],
            "consumer": {"session.timeout.ms": 45000, "heartbeat.interval.ms": 3000},
        },
        store={"path": args.store},
        processing={"dead_letter_topic": f"{args.topic}.dlq", "poll_timeout": "200ms"},
    )
    metrics = Metrics()
    consumer = DedupeConsumer(FirstDecision(), settings, metrics=metrics)
    started = time.monotonic()
    consumer.run(
        until=lambda _t: "decided" in marks or time.monotonic() - started > 3600,
        install_signal_handlers=False,
    )
    restore_s = metrics.restore_seconds.labels(args.topic)._sum.get()
    # The restored state: every filled ID is in the store (spot checks at both ends).
    store = RocksStore(Path(args.store), retention_ms=7 * 86_400_000)
    try:
        ids = []
        for index in (0, args.ids - 1) if args.ids else ():
            tp = TopicPartition(args.topic, index % partitions)
            ids += store.lookup(tp, [_event_id(args.id_token, index)], int(time.time() * 1000))
    finally:
        store.close()
    seconds = marks["decided"] - marks["assigned"]
    print(
        json.dumps(
            {
                "assign_to_first_decision_s": round(seconds, 2),
                "assign_to_first_partition_deciding_s": round(
                    marks["first"] - marks["assigned"], 2
                ),
                "partitions": partitions,
                "restore_s_sum": round(restore_s, 2),
                "ids_per_s_restore": round(args.ids / restore_s) if restore_s else None,
                "start_to_first_decision_s": round(marks["decided"] - started, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "restored_ids_found": all(r is not None for r in ids),
            }
        )
    )


def delete(args: argparse.Namespace) -> None:
    from dedupe_consumer.store.changelog_codec import changelog_topic

    admin = AdminClient({"bootstrap.servers": _bootstrap(args)})
    names = [args.topic, changelog_topic(args.group, args.topic), f"{args.topic}.dlq"]
    existing = set(admin.list_topics(timeout=30).topics)
    for name, future in admin.delete_topics([n for n in names if n in existing]).items():
        future.result()
        print(f"deleted {name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.restore", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fill")
    p.add_argument("--ids", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=200_000, help="records per transaction")
    p.add_argument("--partitions", type=int, default=1, help="of the source topic")
    p.add_argument("--bootstrap")
    for name in ("measure", "_child", "delete"):
        p = sub.add_parser(name)
        p.add_argument("--topic", required=True)
        p.add_argument("--group", required=True)
        p.add_argument("--bootstrap")
        if name != "delete":
            p.add_argument("--ids", type=int, required=name == "_child", default=0)
            p.add_argument("--id-token", required=name == "_child", default="")
        if name == "_child":
            p.add_argument("--store", required=True)
    args = parser.parse_args()
    {"fill": fill, "measure": measure, "_child": child, "delete": delete}[args.command](args)


if __name__ == "__main__":
    main()
