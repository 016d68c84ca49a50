"""Rebalance storm: consumer processes in one group, restarted and killed while events flow.

    python -m bench.storm --bootstrap 127.0.0.1:19092 --duration 120 --consumers 4 \\
        --mode plain --mode transactional

Runs ``tests/faults/storm.py`` once per ``--mode``: ``--consumers`` real
``python -m dedupe_consumer run`` processes in one group, each with its own
store directory, on a fresh topic of ``--partitions`` partitions. For
``--duration`` seconds a producer sends ``--rate`` messages a second, a share of
them (``--resend``) re-sending IDs first sent ``--resend-age`` seconds or more
before; meanwhile the consumers are restarted one after another with SIGTERM
and some are SIGKILLed (``--fault-every``, ``--kill-share``): at a random
moment, or, for ``--point-share`` of them, at a named crash point inside the
window a kill may repeat (after a handler call, a claim, a persist, a commit).
Then every partition is drained and the effects are checked. Prints one row per
mode: lost IDs, duplicate effects, repeated handler calls charged to SIGKILL
windows and to graceful moves (see the attribution in tests/faults/storm.py),
and the time from the last fault to every partition's committed offset at its
end. Exits 1 when a mode breaks its guarantee.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.faults.storm import Storm, StormOutcome, markdown, run_storm
from tests.faults.suite import MODES, Mode

STORM_MODES = {m.name: m for m in MODES}


def verdict(out: StormOutcome, mode: Mode) -> list[str]:
    """What broke the mode's guarantee (empty: nothing)."""
    broken = []
    skip = mode.mode == "claim" and mode.on_uncertain == "skip"
    if out.lost and not (skip and set(out.lost) <= out.uncertain):  # skip assumes done
        broken.append(f"{len(out.lost)} IDs lost, e.g. {out.lost[:3]}")
    if out.repeats.graceful:
        sample = list(out.repeats.graceful.items())[:3]
        broken.append(f"{len(out.repeats.graceful)} IDs repeated across graceful moves: {sample}")
    exact = mode.transactional or (mode.mode == "claim" and mode.on_uncertain != "retry")
    if exact and out.duplicate_effects:
        broken.append(f"{len(out.duplicate_effects)} duplicate effects in an exactly-once mode")
    over = {tag: n for tag, n in out.repeats.per_kill.items() if n > out.repeat_bound}
    if over:
        broken.append(f"kills repeated more than {out.repeat_bound} calls: {over}")
    if out.catch_up_s is None:
        broken.append(f"never caught up: lag {out.final_lag}")
    if out.crashes or out.stop_timeouts:
        broken.append(f"{out.crashes} crashes, {out.stop_timeouts} ignored SIGTERMs")
    if out.dead_lettered:  # nothing in the storm is poison: "lost" leaves these out
        broken.append(
            f"{len(out.dead_lettered)} IDs dead-lettered, e.g. {sorted(out.dead_lettered)[:3]}"
        )
    failed_drains = [
        f"{i.tag} exited {i.exit_code}"
        for i in out.incarnations
        if i.end in ("term", "final") and i.exit_code != 0
    ]
    if failed_drains:
        broken.append(f"SIGTERM drains that failed: {failed_drains[:5]}")
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Storm()
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument(
        "--mode",
        action="append",
        choices=sorted(STORM_MODES),
        help="repeatable; default: plain and transactional",
    )
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds")
    parser.add_argument("--consumers", type=int, default=defaults.consumers)
    parser.add_argument("--partitions", type=int, default=defaults.partitions)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="messages/s")
    parser.add_argument("--resend", type=float, default=defaults.resend)
    parser.add_argument("--resend-age", type=float, default=defaults.resend_age_s)
    parser.add_argument("--fault-every", type=float, default=defaults.fault_every_s)
    parser.add_argument("--kill-share", type=float, default=defaults.kill_share)
    parser.add_argument(
        "--point-share",
        type=float,
        default=defaults.point_share,
        help="share of the kills made at a named crash point instead of a random moment",
    )
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--max-unpersisted", type=int, default=defaults.max_unpersisted)
    parser.add_argument(
        "--assignment", help="partition.assignment.strategy (default: librdkafka's, eager)"
    )
    parser.add_argument(
        "--group-protocol",
        default=defaults.group_protocol,
        choices=["classic", "consumer"],
        help="consumer: KIP-848, the broker assigns",
    )
    parser.add_argument(
        "--no-changelog",
        action="store_true",
        help="negative control: no state moves with a partition (expect graceful repeats)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--keep", help="keep the consumers' directories and logs here")
    args = parser.parse_args()

    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        from dedupe_consumer.testing import start_broker

        broker = start_broker()
        bootstrap = broker.bootstrap_servers
    storm = Storm(
        consumers=args.consumers,
        partitions=args.partitions,
        duration_s=args.duration,
        rate=args.rate,
        resend=args.resend,
        resend_age_s=args.resend_age,
        fault_every_s=args.fault_every,
        kill_share=args.kill_share,
        point_share=args.point_share,
        batch=args.batch,
        max_unpersisted=args.max_unpersisted,
        assignment=args.assignment,
        group_protocol=args.group_protocol,
        changelog=not args.no_changelog,
        seed=args.seed,
    )
    rows, failed = [], False
    try:
        with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
            root = Path(args.keep) if args.keep else Path(tmp)
            for name in args.mode or ["plain", "transactional"]:
                mode = STORM_MODES[name]
                print(f"{name}: {storm}", flush=True)
                out = run_storm(bootstrap, root / name.replace("+", "-"), mode, storm)
                rows.append(out.row())
                print(out.row(), flush=True)
                print(
                    f"  wall {out.wall_s:.0f} s; catch-up after production end "
                    f"{out.catch_up_after_production_s}; restored records {out.restored_records}; "
                    f"kill repeats per kill {out.repeats.per_kill} (bound {out.repeat_bound}); "
                    f"uncertain {len(out.uncertain)}; dead-lettered {len(out.dead_lettered)}; "
                    f"error logs {dict(out.errors)}",
                    flush=True,
                )
                stops = [i.stop_s for i in out.incarnations if i.stop_s is not None]
                if stops:
                    print(f"  SIGTERM to exit: max {max(stops):.1f} s", flush=True)
                for note in out.notes:
                    print(f"  note: {note}", flush=True)
                broken = verdict(out, mode)
                for why in broken:
                    print(f"  BROKEN: {why}", flush=True)
                failed = failed or (bool(broken) and storm.changelog)
    finally:
        if broker is not None:
            broker.stop()
    print()
    print(markdown(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
