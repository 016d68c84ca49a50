"""Crash soak: every mode, SIGKILLed many times, and what it cost.

    python -m bench.crash_soak --kills 200 --events 20000
    python -m bench.crash_soak --kills 60 --events 5000 --extra   # the modes CI leaves out

Runs the kill suite of ``tests/faults/suite.py`` (real consumer processes, a
real broker, SIGKILL at random moments and at every named fault point) with
``--kills`` spread over the modes, and prints one table: mode, kills, events,
lost, duplicate effects, uncertain outcomes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.faults.suite import CONCURRENT_MODES, EMIT_MODES, MODES, SCOPE_MODES, SOAK_ONLY, run_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200, help="total, spread over the modes")
    parser.add_argument("--events", type=int, default=20_000, help="per mode")
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument(
        "--extra",
        action="store_true",
        help="the modes the CI kill suite leaves out (SOAK_ONLY in tests/faults/suite.py)",
    )
    args = parser.parse_args()
    every = [*CONCURRENT_MODES, *SCOPE_MODES, *EMIT_MODES]
    modes = [m for m in every if m.name in SOAK_ONLY] if args.extra else MODES

    out = Console()
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        from dedupe_consumer.testing import start_broker

        broker = start_broker()
        bootstrap = broker.bootstrap_servers
    per_mode = max(1, args.kills // len(modes))
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="crash-soak-") as tmp:
            for n, mode in enumerate(modes):
                out.print(f"[bold]{mode.name}[/]: {per_mode} kills over {args.events:,} events")
                result = run_mode(
                    bootstrap,
                    Path(tmp) / mode.name,
                    mode,
                    events=args.events,
                    duplicates=args.duplicates,
                    kills=per_mode,
                    seed=n + 1,
                    batch=args.batch,
                    timeout_s=60 + per_mode * 6,
                    # parallel modes gather batches into one write while one persists
                    max_unpersisted=2 * args.batch if args.extra else 1,
                )
                rows.append(result.row())
                out.print(result.row())
    finally:
        if broker is not None:
            broker.stop()

    table = Table(title="crash soak")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    out.print(table)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
