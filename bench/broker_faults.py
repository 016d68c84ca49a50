"""Broker faults on a three-node cluster, measured: lost events, repeated effects, catch-up.

    python -m bench.broker_faults --events 50000

Starts a :class:`~dedupe_consumer.testing.LocalKafkaCluster` (three KRaft nodes
from the Maven jars, replication factor 3, ``min.insync.replicas`` 2) and, for each
fault (SIGKILL the leader of the busiest partition and restart it; SIGKILL the
active controller and restart it; a rolling restart of all three nodes) and each
mode (plain, claim+reconcile, transactional effects), runs
``tests/faults/cluster_suite.py``: ``--events`` events with ``--duplicates`` of them
repeated IDs flow through a real consumer process while the fault happens. Prints a
markdown table (the one in docs/benchmarks.md) and, with ``--json``, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from dedupe_consumer.testing import LocalKafkaCluster
from tests.faults.cluster_suite import CLUSTER_MODES, FAULTS, FaultOutcome, run_broker_fault

COLUMNS = [
    "fault",
    "mode",
    "events",
    "lost",
    "duplicate effects",
    "allowed",
    "fault s",
    "drained s",
    "longest pause s",
    "consumer exits",
]


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="per fault and mode")
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--rate", type=float, default=1500.0, help="events/s produced while the fault runs"
    )
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset")
    parser.add_argument(
        "--modes", default=",".join(m.name for m in CLUSTER_MODES), help="comma-separated"
    )
    parser.add_argument(
        "--static-member",
        action="store_true",
        help="consumer with group.instance.id (as the kill suite runs it)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep each run's consumer log, config and store here"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C: the consumer is stopped and the cluster removed.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))

    faults = [f for f in FAULTS if f in args.faults.split(",")]
    modes = [m for m in CLUSTER_MODES if m.name in args.modes.split(",")]
    rows: list[dict[str, object]] = []
    failures: list[str] = []
    started = time.monotonic()
    with LocalKafkaCluster(3) as cluster, tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        where = args.workdir or Path(tmp)
        print(f"cluster up in {time.monotonic() - started:.0f} s: {cluster.bootstrap_servers}")
        for n, fault in enumerate(faults):
            for m, mode in enumerate(modes):
                result: FaultOutcome = run_broker_fault(
                    cluster,
                    where / f"{fault}-{m}",
                    mode,
                    fault,
                    events=args.events,
                    duplicates=args.duplicates,
                    seed=10 * n + m + 1,
                    batch=args.batch,
                    rate=args.rate,
                    timeout_s=120 + args.events / 100,
                    static_member=args.static_member,
                )
                row = result.row(mode, args.batch)
                rows.append(row)
                print(json.dumps({**row, "killed node": result.killed_node}), flush=True)
                for note in result.outcome.notes:
                    print(note, file=sys.stderr)
                if result.outcome.lost:
                    failures.append(f"{fault}/{mode.name}: lost {result.outcome.lost[:5]}")
                    failures.extend(result.outcome.notes)
                if result.extra_calls > result.bound(mode, args.batch):
                    failures.append(
                        f"{fault}/{mode.name}: {result.extra_calls} repeated calls, "
                        f"{dict(list(result.outcome.duplicate_effects.items())[:5])}"
                    )
    print()
    print(markdown(rows))
    print(f"\n{len(rows)} runs in {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
