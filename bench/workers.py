"""``dedupe-consumer run --workers N``: msg/s with 1 worker and with N, CPU-bound handler.

    python -m bench.workers --bootstrap 127.0.0.1:19092 --events 100000 --workers 1,2

Produces ``--events`` (``--duplicates`` repeated IDs, 8 partitions, the same
200-byte values as ``bench.compare``) once, then for each worker count runs
``python -m dedupe_consumer run`` (with ``--workers N`` when N > 1) in a fresh
group with a handler that burns ``--cpu-us`` of CPU time per event (Python
code holding the GIL: what one process cannot spread over cores) and appends
the event's ID to a file. The rate runs from the moment all N workers hold
partitions (the group is stable) to the moment the group's committed offsets
reach the end of the topic, over the events committed in between: process
start-up, the group join and the first worker's head start do not count.
Each row also says whether every unique ID took effect exactly once across
the workers. Topics are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from confluent_kafka import Consumer, ConsumerGroupState, TopicPartition
from confluent_kafka.admin import AdminClient

from bench.data import PARTITIONS, DataSet, delete_topics_containing, produce
from dedupe_consumer import Event, Handler

REPO = Path(__file__).resolve().parents[1]


class CpuHandler(Handler):
    """Burns ``$BENCH_CPU_US`` µs of this thread's CPU time, then appends the ID to
    ``$BENCH_EFFECTS`` (one O_APPEND write: lines from several workers never tear)."""

    def setup(self) -> None:
        self._cpu_s = int(os.environ.get("BENCH_CPU_US", "100")) / 1e6
        self._fd = os.open(os.environ["BENCH_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def handle(self, event: Event) -> None:
        until = time.thread_time() + self._cpu_s
        n = 0
        while time.thread_time() < until:
            n += sum(i * i for i in range(50))
        os.write(self._fd, f"{event.id}\n".encode())

    def teardown(self) -> None:
        os.close(self._fd)


def members_assigned(admin: AdminClient, group: str) -> int:
    """How many members of ``group`` hold partitions (0 while it is not stable)."""
    try:
        described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    except Exception:  # not there yet
        return 0
    if described.state != ConsumerGroupState.STABLE:
        return 0
    return sum(1 for m in described.members if m.assignment.topic_partitions)


def committed_total(consumer: Consumer, topic: str) -> int:
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))


def run_one(
    bootstrap: str, data: DataSet, workers: int, cpu_us: int, workdir: Path
) -> dict[str, object]:
    group = f"bench-workers-{workers}-{uuid.uuid4().hex[:6]}"
    config = workdir / f"{group}.toml"
    effects = workdir / f"{group}.effects"
    config.write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
topics = ["{data.topic}"]
[kafka.consumer]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
[store]
path = "{workdir / group}"
[processing]
batch_size = 500
poll_timeout = "100ms"
dead_letter_topic = "{data.topic}.{group}.dlq"
[observability]
log_level = "warning"
log_format = "json"
""")
    command = [sys.executable, "-m", "dedupe_consumer", "run", "-c", str(config)]
    command += ["--handler", "bench.workers:CpuHandler"]
    if workers > 1:
        command += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env.update(BENCH_EFFECTS=str(effects), BENCH_CPU_US=str(cpu_us), PYTHONPATH=str(REPO))
    log = (workdir / f"{group}.log").open("wb")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        # Timed from the moment all N hold partitions: the first worker up consumes
        # alone until the others have joined, and that part is not N workers' rate.
        admin = AdminClient({"bootstrap.servers": bootstrap})
        while members_assigned(admin, group) < min(workers, PARTITIONS):
            if proc.poll() is not None:
                raise RuntimeError(f"{command} exited {proc.returncode}; see {log.name}")
            time.sleep(0.05)
        started = time.monotonic()
        # A reader of the group's commits only: it never subscribes, so never joins.
        reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        done_before = committed_total(reader, data.topic)
        while committed_total(reader, data.topic) < data.events:
            if proc.poll() is not None:
                raise RuntimeError(f"{command} exited {proc.returncode}; see {log.name}")
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        reader.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    counts = Counter(effects.read_text().split())
    return {
        "workers": workers,
        "msg_s": (data.events - done_before) / elapsed,
        "timed": data.events - done_before,
        "seconds": elapsed,
        "exactly_once": len(counts) == data.unique and max(counts.values()) == 1,
        "exit_code": code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True, help="host:port of a running broker")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--cpu-us", type=int, default=100, help="CPU µs per event")
    args = parser.parse_args()
    token = f"bench-workers-{uuid.uuid4().hex[:8]}"
    data = produce(args.bootstrap, token, args.events, args.duplicates, seed=7)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
            for workers in (int(w) for w in args.workers.split(",")):
                rows.append(run_one(args.bootstrap, data, workers, args.cpu_us, Path(tmp)))
                print(rows[-1], file=sys.stderr, flush=True)
    finally:
        delete_topics_containing(args.bootstrap, token)
    base = float(rows[0]["msg_s"])  # type: ignore[arg-type]
    print(
        f"**{data.events:,} events, {data.unique:,} unique IDs, {PARTITIONS} partitions, "
        f"handler burns {args.cpu_us} µs CPU per event**\n"
    )
    print("| workers | msg/s | x 1st row | events timed | seconds | each unique ID once | exit |")
    print("|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        rate = float(row["msg_s"])  # type: ignore[arg-type]
        print(
            f"| {row['workers']} | {rate:,.0f} | {rate / base:.2f} | {row['timed']:,} | "
            f"{row['seconds']:.1f} | "
            f"{'yes' if row['exactly_once'] else 'NO'} | {row['exit_code']} |"
        )


if __name__ == "__main__":
    main()
