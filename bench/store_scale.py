"""How the RocksDB store scales with the number of IDs: disk, memory, reopen, lookups.

    python -m bench.store_scale --ids 10000000

Writes ``--ids`` distinct event IDs through ``RocksStore.persist`` in batches
of ``--batch`` (one synced WriteBatch each, 8 partitions, as the engine does),
then reports:

* RSS after the writes (and the process's baseline before the store opened),
  because memory must be bounded by the block cache and write-buffer budget,
  not by the number of IDs (target: < 300 MB at 10M IDs);
* bytes per ID on disk after a full manual compaction (target: <= 64), with
  SST files and the whole directory counted separately;
* the time to reopen the store, and to touch every partition once after it;
* ``RocksStore.lookup`` latency of single IDs, hits and misses (p50/p99/p99.9),
  and of ``--batch``-ID multi-gets, the engine's real access pattern.

IDs are a function of their index (a keyed hash formatted as a UUID), so hits
can be drawn without keeping 10M strings in memory, which would swamp the
RSS being measured. The page cache stays warm: dropping it would disturb
everything else on a shared machine, so "reopen" means a process restart,
not a cold disk.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import rocksdict
from rich.console import Console
from rich.table import Table

from bench import _machine
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store import IdRecord, RecordStatus, RocksStore, WriteSet

TOPIC = "events"
RETENTION_MS = 7 * 24 * 3600 * 1000


def event_id(index: int, seed: int) -> str:
    """The ``index``-th ID of the data set: a random-looking UUID, reproducible from its index."""
    digest = hashlib.blake2b(index.to_bytes(8, "big"), digest_size=16, key=seed.to_bytes(8, "big"))
    return str(uuid.UUID(bytes=digest.digest()))


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def dir_bytes(path: Path, suffix: str | None = None) -> int:
    return sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.is_file() and (suffix is None or f.name.endswith(suffix))
    )


@dataclass(slots=True)
class Percentiles:
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float

    @classmethod
    def of(cls, samples_ns: list[int]) -> Percentiles:
        ordered = sorted(samples_ns)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

        return cls(at(0.50), at(0.99), at(0.999), ordered[-1] / 1000)

    def cells(self) -> tuple[str, str, str, str]:
        return (
            f"{self.p50_us:.1f}",
            f"{self.p99_us:.1f}",
            f"{self.p999_us:.1f}",
            f"{self.max_us:.1f}",
        )


def write_ids(
    store: RocksStore,
    ids: int,
    batch: int,
    partitions: int,
    seed: int,
    progress: Callable[[int, float], None],
) -> float:
    """Persist ``ids`` decisions in synced batches; return the seconds it took."""
    tps = [TopicPartition(TOPIC, p) for p in range(partitions)]
    next_offset = [0] * partitions
    started = time.perf_counter()
    step = max(batch, ids // 10)
    for start in range(0, ids, batch):
        now_ms = int(time.time() * 1000)
        write = WriteSet()
        for index in range(start, min(start + batch, ids)):
            p = index % partitions
            key = event_id(index, seed)
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            decision = IdRecord(RecordStatus.HANDLED, next_offset[p], now_ms, digest)
            write.records.setdefault(tps[p], []).append((key, decision))
            write.watermarks[tps[p]] = next_offset[p]
            next_offset[p] += 1
        store.persist(write)
        done = min(start + batch, ids)
        if done % step < batch or done == ids:
            progress(done, time.perf_counter() - started)
    return time.perf_counter() - started


def compact(path: Path) -> float:
    """Full manual compaction of every column family, with the options it was created with.

    ``Options.load_latest`` reads them back from the store's OPTIONS file, so
    the rewritten SST files keep the store's compression and bloom filters and
    the size measured is the size the store would settle at.
    """
    started = time.perf_counter()
    options, families = rocksdict.Options.load_latest(str(path))
    db = rocksdict.Rdict(str(path), options, column_families=families)
    try:
        for name in families:
            family = db.get_column_family(name)
            family.compact_range(None, None)
            del family  # a column-family handle keeps the DB open
    finally:
        db.close()
    return time.perf_counter() - started


def lookup_latencies(
    store: RocksStore, ids: int, partitions: int, samples: int, seed: int
) -> tuple[Percentiles, Percentiles]:
    """Single-ID lookups, hits and misses interleaved in random order; checks every answer."""
    rng = random.Random(seed + 1)
    plan = [(rng.randrange(ids), True) for _ in range(samples)]
    plan += [(ids + rng.randrange(10 * ids), False) for _ in range(samples)]
    rng.shuffle(plan)
    now_ms = int(time.time() * 1000)
    hits: list[int] = []
    misses: list[int] = []
    for index, present in plan:
        tp = TopicPartition(TOPIC, index % partitions)
        key = [event_id(index, seed)]
        t0 = time.perf_counter_ns()
        found = store.lookup(tp, key, now_ms)[0]
        elapsed = time.perf_counter_ns() - t0
        if (found is not None) != present:
            raise AssertionError(f"lookup of ID #{index} found={found} but present={present}")
        (hits if present else misses).append(elapsed)
    return Percentiles.of(hits), Percentiles.of(misses)


def batch_latencies(
    store: RocksStore, ids: int, partitions: int, batch: int, rounds: int, seed: int
) -> Percentiles:
    """``batch``-ID multi-gets on one partition, 10% hits: what the engine does per batch."""
    rng = random.Random(seed + 2)
    now_ms = int(time.time() * 1000)
    samples: list[int] = []
    for _ in range(rounds):
        p = rng.randrange(partitions)
        keys = []
        for _ in range(batch):
            index = rng.randrange(ids) if rng.random() < 0.1 else ids + rng.randrange(10 * ids)
            keys.append(event_id(index - index % partitions + p, seed))
        t0 = time.perf_counter_ns()
        store.lookup(TopicPartition(TOPIC, p), keys, now_ms)
        samples.append(time.perf_counter_ns() - t0)
    return Percentiles.of(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ids", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=500, help="IDs per synced WriteBatch")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--lookups", type=int, default=20_000, help="hits and as many misses")
    parser.add_argument("--batch-lookups", type=int, default=500, help="multi-get rounds")
    parser.add_argument("--block-cache-mb", type=int, default=64, help="store.block_cache_mb")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="parent of the store directory (default: TMP)")
    parser.add_argument("--keep", action="store_true", help="leave the store on disk")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()

    console = Console(width=max(120, Console().width))
    started = time.perf_counter()
    parent = tempfile.mkdtemp(prefix="bench-store-", dir=args.dir)
    path = Path(parent) / "store"
    machine = _machine.describe(parent)
    rows: list[tuple[str, str]] = []
    try:
        baseline = rss_mb()
        store = RocksStore(path, retention_ms=RETENTION_MS, block_cache_mb=args.block_cache_mb)

        def progress(done: int, seconds: float) -> None:
            console.print(
                f"  {done:>12,} IDs  {seconds:7.1f}s  {done / seconds:>9,.0f} IDs/s  "
                f"RSS {rss_mb():6.0f} MB"
            )

        console.print(f"writing {args.ids:,} IDs in batches of {args.batch} to {path}")
        write_s = write_ids(store, args.ids, args.batch, args.partitions, args.seed, progress)
        rss_after_write = rss_mb()
        peak_write = rss_mb("VmHWM")
        live_bytes = store.approximate_size()
        store.close()

        before_compaction = dir_bytes(path)
        console.print("compacting ...")
        compact_s = compact(path)
        sst = dir_bytes(path, ".sst")
        total = dir_bytes(path)

        console.print("reopening ...")
        t0 = time.perf_counter()
        store = RocksStore(path, retention_ms=RETENTION_MS, block_cache_mb=args.block_cache_mb)
        open_s = time.perf_counter() - t0
        now_ms = int(time.time() * 1000)
        for p in range(args.partitions):  # column families are opened on first use
            store.lookup(TopicPartition(TOPIC, p), [event_id(p, args.seed)], now_ms)
        touch_s = time.perf_counter() - t0

        console.print(f"{args.lookups:,} hits + {args.lookups:,} misses ...")
        hits, misses = lookup_latencies(store, args.ids, args.partitions, args.lookups, args.seed)
        multi = batch_latencies(
            store, args.ids, args.partitions, args.batch, args.batch_lookups, args.seed
        )
        rss_after_lookups = rss_mb()
        store.close()

        rows = [
            ("IDs written", f"{args.ids:,} in {write_s:.1f}s ({args.ids / write_s:,.0f} IDs/s)"),
            ("synced batches", f"{-(-args.ids // args.batch):,} of {args.batch} IDs"),
            ("RSS before the store opened", f"{baseline:.0f} MB"),
            ("RSS after the writes", f"{rss_after_write:.0f} MB (peak {peak_write:.0f} MB)"),
            ("RSS after reopen + lookups", f"{rss_after_lookups:.0f} MB"),
            ("store directory before compaction", f"{before_compaction / 2**20:,.0f} MiB"),
            ("approximate_size() before close", f"{live_bytes / 2**20:,.0f} MiB"),
            ("full compaction", f"{compact_s:.1f}s"),
            ("SST bytes per ID after compaction", f"{sst / args.ids:.1f}"),
            ("directory bytes per ID after compaction", f"{total / args.ids:.1f}"),
            ("reopen (RocksStore())", f"{open_s * 1000:.0f} ms"),
            ("reopen + first lookup on each partition", f"{touch_s * 1000:.0f} ms"),
            ("lookup, 1 ID, hit: p50 / p99 / p99.9 / max us", " / ".join(hits.cells())),
            ("lookup, 1 ID, miss: p50 / p99 / p99.9 / max us", " / ".join(misses.cells())),
            (
                f"lookup, {args.batch} IDs (10% hits): p50 / p99 / p99.9 / max us",
                " / ".join(multi.cells()),
            ),
        ]
    finally:
        if args.keep:
            console.print(f"store kept at {path}")
        else:
            shutil.rmtree(parent, ignore_errors=True)
    elapsed = time.perf_counter() - started
    rows.append(("whole run", f"{elapsed:.0f}s"))
    targets = [
        f"SST bytes per ID {sst / args.ids:.1f} (goal <= 64): "
        + ("met" if sst / args.ids <= 64 else "MISSED"),
        f"RSS after {args.ids:,} IDs {rss_after_write:.0f} MB (goal < 300 MB): "
        + ("met" if rss_after_write < 300 else "MISSED"),
    ]

    table = Table(title=f"RocksStore at {args.ids:,} IDs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in targets:
        console.print(("[green]" if line.endswith("met") else "[red]") + line)
    md = [f"**RocksStore at {args.ids:,} IDs**", ""]
    md += [f"- {label}: {value}" for label, value in machine]
    md += ["", "| measure | value |", "|---|---:|"]
    md += [f"| {label} | {value} |" for label, value in rows]
    md += ["", *[f"- {line}" for line in targets]]
    text = "\n".join(md)
    print("\n" + text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
