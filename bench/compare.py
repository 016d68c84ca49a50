"""Throughput of dedupe_consumer next to a raw consumer and the alternatives, in one run.

    python -m bench.compare --events 1000000 --duplicates 0.1 --io-events 3000

Starts a real broker (``dedupe_consumer.testing.start_broker``, or uses
``--bootstrap``), produces the data set once (event-ID header, 200-byte JSON
body keyed by event ID, 8 partitions), then runs each contender in its own
process over the same topic with its own consumer group, and prints one table:
messages/s, ratio to the raw consumer, peak RSS of the consumer process, and
whether every unique ID was handled exactly once. Rates are measured from the
first message in hand to the last offset committed, so nobody's group join
counts. Redis and PostgreSQL are started for their rows only, on loopback, and
every server, broker and temporary directory is gone when the run ends.

A second, smaller data set (``--io-events``) feeds the I/O-bound rows: a
handler that waits ``--handler-sleep-ms`` per event, at concurrency 1, 16 and
64 in both orderings, next to a raw consumer that sleeps as long per message,
and the sidecar POSTing to a local target that answers in that time. They get
a table of their own.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import _machine
from bench._services import ServiceError, peak_rss_mb, postgres_server, redis_server
from bench.child import Report
from bench.data import BODY_BYTES, PARTITIONS, DataSet, delete_topics_containing, produce
from bench.engine_options import NO_CONCURRENCY

REPO = Path(__file__).resolve().parents[1]
QUIX_VENV = Path(
    os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "dedupe-consumer", "bench-quix-venv"
)
Service = Literal["redis", "postgres"]
Workload = Literal["noop", "io"]
"""Which data set and table a row belongs to: the no-op rows or the I/O-bound ones."""


@dataclass(frozen=True, slots=True)
class Contender:
    key: str
    """Name for ``--only`` / ``--skip``."""
    label: str
    """Row name in the table."""
    module: str
    args: tuple[str, ...] = ()
    service: Service | None = None
    quix: bool = False
    """Runs under the Quix virtualenv's interpreter (see bench/setup.sh)."""
    dedupes: bool = True
    profilable: bool = False
    workload: Workload = "noop"
    sleeps: bool = False
    """Takes ``--sleep-ms`` (the handler's or the target's wait per event)."""


def _io_rows() -> tuple[Contender, ...]:
    """The I/O-bound handler at concurrency 1, 16 and 64 in both orderings, sync and async."""
    rows = []
    for handler, key, label in (
        ("sleep", "io", "sync handler (time.sleep)"),
        ("async-sleep", "io-async", "async handler (asyncio.sleep)"),
    ):
        for ordering in ("key", "partition"):
            for concurrency in (1, 16, 64):
                rows.append(
                    Contender(
                        f"{key}-c{concurrency}-{ordering}",
                        f"dedupe_consumer, {label}, concurrency {concurrency}, ordering {ordering}",
                        "bench.contenders.dedupe",
                        (
                            *("--mode", "plain", "--changelog", "true", "--handler", handler),
                            *("--concurrency", str(concurrency), "--ordering", ordering),
                        ),
                        workload="io",
                        sleeps=True,
                    )
                )
    rows.append(
        Contender(
            "io-flaky-c64-key",
            "dedupe_consumer, sync handler (time.sleep), 1 event in 20 fails once "
            "(retry after processing.retry_backoff, 200 ms), concurrency 64, ordering key",
            "bench.contenders.dedupe",
            (
                *("--mode", "plain", "--changelog", "true", "--handler", "flaky-sleep"),
                *("--concurrency", "64", "--ordering", "key"),
            ),
            workload="io",
            sleeps=True,
        )
    )
    return tuple(rows)


CONTENDERS: tuple[Contender, ...] = (
    Contender(
        "raw", "raw confluent-kafka (commit per batch)", "bench.contenders.raw", dedupes=False
    ),
    Contender(
        "raw-async",
        "raw confluent-kafka (async commit per batch): the ceiling",
        "bench.contenders.raw",
        ("--commit", "async"),
        dedupes=False,
    ),
    Contender(
        "plain",
        "dedupe_consumer plain",
        "bench.contenders.dedupe",
        ("--mode", "plain", "--changelog", "true"),
        profilable=True,
    ),
    Contender(
        "plain-traced",
        "dedupe_consumer plain, tracing on (a span per event, OTLP/HTTP export to a local sink)",
        "bench.contenders.dedupe",
        ("--mode", "plain", "--changelog", "true", "--tracing", "otlp"),
        profilable=True,
    ),
    Contender(
        "plain-traced-noexport",
        "dedupe_consumer plain, tracing on, spans not exported (tracing.exporter = none)",
        "bench.contenders.dedupe",
        ("--mode", "plain", "--changelog", "true", "--tracing", "none"),
        profilable=True,
    ),
    Contender(
        "claim",
        "dedupe_consumer claim",
        "bench.contenders.dedupe",
        ("--mode", "claim", "--changelog", "true"),
        profilable=True,
    ),
    Contender(
        "plain-nochangelog",
        "dedupe_consumer plain, store.changelog=false",
        "bench.contenders.dedupe",
        ("--mode", "plain", "--changelog", "false"),
        profilable=True,
    ),
    Contender(
        "plain-topic-scope",
        "dedupe_consumer plain, dedupe.scope=topic (hop to a by-id topic)",
        "bench.contenders.dedupe",
        ("--mode", "plain", "--changelog", "true", "--scope", "topic"),
        profilable=True,
    ),
    Contender(
        "plain-emit",
        "dedupe_consumer plain + event.emit (one output per unique event, exactly once)",
        "bench.contenders.dedupe",
        ("--mode", "plain", "--changelog", "true", "--handler", "emit"),
        profilable=True,
    ),
    Contender(
        "quix",
        "Quix Streams, RocksDB state (at-least-once)",
        "bench.contenders.quix",
        ("--guarantee", "at-least-once"),
        quix=True,
    ),
    Contender(
        "quix-eos",
        "Quix Streams, RocksDB state (exactly-once)",
        "bench.contenders.quix",
        ("--guarantee", "exactly-once"),
        quix=True,
    ),
    Contender(
        "quix-eos-emit",
        "Quix Streams, RocksDB state (exactly-once) + to_topic per unique event",
        "bench.contenders.quix",
        ("--guarantee", "exactly-once", "--emit", "true"),
        quix=True,
    ),
    Contender(
        "redis",
        "Redis SET NX EX per message",
        "bench.contenders.redis_setnx",
        service="redis",
    ),
    Contender(
        "postgres",
        "PostgreSQL INSERT ON CONFLICT per message",
        "bench.contenders.postgres_insert",
        service="postgres",
    ),
    Contender(
        "raw-io",
        "raw confluent-kafka, sleep per message (sequential)",
        "bench.contenders.raw",
        dedupes=False,
        workload="io",
        sleeps=True,
    ),
    *_io_rows(),
    Contender(
        "sidecar",
        "dedupe-consumer sidecar -> HTTP target, concurrency 64, ordering key",
        "bench.contenders.sidecar",
        ("--concurrency", "64", "--ordering", "key"),
        workload="io",
        sleeps=True,
    ),
)
BASELINES: dict[Workload, str] = {"noop": "raw", "io": "raw-io"}
"""The row each table's "x" column divides by."""

# Goals from the issue, checked (not asserted) at the end of each run:
# (dedupe row, other row, minimum ratio of their rates).
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("plain", "raw", 0.5),
    ("plain", "quix", 3.0),
    ("plain", "quix-eos", 3.0),
    ("plain-emit", "quix-eos-emit", 1.0),
    ("plain", "redis", 10.0),
    ("plain", "postgres", 10.0),
    ("io-c64-key", "io-c1-key", 25.0),
    ("io-async-c64-key", "io-async-c1-key", 25.0),
)
# (row, minimum unique deliveries per second): handler calls over the measured time.
DELIVERY_TARGETS: tuple[tuple[str, float], ...] = (("sidecar", 2000.0),)


@dataclass(slots=True)
class Outcome:
    contender: Contender
    report: Report | None = None
    error: str = ""
    refused: str = ""
    """The library refused the row's set-up at start-up (not a failure of the run)."""
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        if self.report is None:
            return None
        return self.report["consumed"] / self.report["seconds"]

    @property
    def delivery_rate(self) -> float | None:
        """Handler calls (unique deliveries, for the sidecar) per second."""
        if self.report is None:
            return None
        return self.report["handled"] / self.report["seconds"]


def quix_python() -> Path:
    """The interpreter of the Quix virtualenv (``BENCH_QUIX_PYTHON`` overrides)."""
    override = os.environ.get("BENCH_QUIX_PYTHON")
    return Path(override) if override else QUIX_VENV / "bin" / "python"


@contextmanager
def _service(kind: Service | None, outcome: Outcome) -> Iterator[list[str]]:
    """Start the contender's server, yield its CLI arguments, note its footprint, stop it."""
    if kind is None:
        yield []
        return
    server: AbstractContextManager[tuple[str, subprocess.Popen[bytes]]] = (
        redis_server() if kind == "redis" else postgres_server()
    )
    with server as (address, proc):
        yield ["--redis-url", address] if kind == "redis" else ["--dsn", address]
        if kind == "redis":
            outcome.notes.append(f"+ redis-server {peak_rss_mb(proc.pid):.0f} MB, no persistence")
        else:
            outcome.notes.append("+ PostgreSQL server, fsync on, 1 commit per message")


def run_contender(
    contender: Contender,
    *,
    bootstrap: str,
    data: DataSet,
    group: str,
    batch: int,
    workdir: Path,
    timeout: float,
    profile_dir: Path | None,
    sleep_ms: float = 2.0,
) -> Outcome:
    """Run one contender in its own process; never raises, failures become the row."""
    outcome = Outcome(contender)
    python = str(quix_python()) if contender.quix else sys.executable
    if contender.quix and not Path(python).exists():
        outcome.error = f"no Quix virtualenv at {python}: run bench/setup.sh"
        return outcome
    own = workdir / contender.key
    own.mkdir()
    cmd = [
        python,
        "-m",
        contender.module,
        "--bootstrap",
        bootstrap,
        "--topic",
        data.topic,
        "--events",
        str(data.events),
        "--group",
        group,
        "--batch",
        str(batch),
        "--workdir",
        str(own),
        *contender.args,
    ]
    if contender.sleeps:
        cmd += ["--sleep-ms", f"{sleep_ms:g}"]
    if profile_dir is not None and contender.profilable:
        cmd += ["--profile", str(profile_dir / contender.key)]
        outcome.notes.append("profiled (slower)")
    if contender.quix:
        outcome.notes.append(f"confluent-kafka {_quix_kafka_version(python)} (quixstreams pin)")
    stdout_path, stderr_path = own / "stdout.log", own / "stderr.log"
    try:
        with (
            _service(contender.service, outcome) as service_args,
            stdout_path.open("w") as out,
            stderr_path.open("w") as err,
        ):
            proc = subprocess.run(
                cmd + service_args,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                timeout=timeout,
                check=False,
            )
    except ServiceError as exc:
        outcome.error = f"server did not start: {exc}"
        return outcome
    except subprocess.TimeoutExpired:
        outcome.error = f"timed out after {timeout:.0f}s"
        return outcome
    lines = stdout_path.read_text().strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join(stderr_path.read_text(errors="replace").strip().splitlines()[-3:])
        outcome.error = f"exit code {proc.returncode}: {tail[-400:]}"
        return outcome
    try:
        line = json.loads(lines[-1])  # a bench.child Report, or a Refusal
    except json.JSONDecodeError:
        outcome.error = f"no report line on stdout, last line was {lines[-1][:200]!r}"
        return outcome
    if "refused" in line:
        outcome.refused = str(line["refused"])
    else:
        outcome.report = line
    return outcome


_quix_versions: dict[str, str] = {}


def _quix_kafka_version(python: str) -> str:
    if python not in _quix_versions:
        probe = subprocess.run(
            [
                python,
                "-c",
                "import confluent_kafka as c; print(c.version(), 'librdkafka', c.libversion()[0])",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        _quix_versions[python] = probe.stdout.strip() or "?"
    return _quix_versions[python]


def _refusal(message: str) -> str:
    """The first clause of the library's refusal (a ConfigError message), for the table."""
    return "refused at start-up: " + re.split(r"[.,;]\s", message, maxsplit=1)[0]


def _correctness(outcome: Outcome, data: DataSet) -> str:
    if outcome.report is None:
        return _refusal(outcome.refused) if outcome.refused else f"FAILED: {outcome.error}"
    r = outcome.report
    if r["consumed"] < data.events:
        return f"NO: consumed {r['consumed']:,} of {data.events:,}"
    if not outcome.contender.dedupes:
        return "n/a (no dedupe)"
    redelivered = r.get("redelivered")
    if redelivered:
        return f"NO: {redelivered:,} deliveries beyond the first per ID"
    if r["handled"] != data.unique:
        return f"NO: handled {r['handled']:,}, unique {data.unique:,}"
    return _handled_once(r, data)


def _handled_once(r: Report, data: DataSet) -> str:
    """Every unique ID was handled: how sure the row is, and an emit row's outputs.

    An emit row must have one committed output per unique ID, each the copy of its event.
    """
    if "outputs" not in r:
        return "yes, each exactly once" if r.get("redelivered") == 0 else "yes"
    outputs, ids = r["outputs"], r.get("output_ids", 0)
    mismatched = r.get("output_mismatched", 0)
    if mismatched:
        return f"NO: {mismatched:,} outputs are not the event their key names"
    if outputs == ids == data.unique:
        return "yes, and 1 committed output per ID"
    return (
        f"NO: {outputs:,} committed outputs for {ids:,} IDs, "
        f"{data.unique:,} unique IDs in the input"
    )


def _rows(outcomes: list[Outcome], data: DataSet, baseline: str) -> list[tuple[str, ...]]:
    base = next((o.rate for o in outcomes if o.contender.key == baseline), None)
    rows: list[tuple[str, ...]] = []
    for o in outcomes:
        rate = o.rate
        notes = list(o.notes)
        if o.report is not None and "redelivered" in o.report:
            notes.insert(0, f"{o.delivery_rate:,.0f} unique deliveries/s")
        if o.report is not None and "outputs" in o.report:
            notes.insert(
                0,
                f"read back (read_committed): {o.report['outputs']:,} outputs, "
                f"{o.report.get('output_ids', 0):,} distinct IDs",
            )
        rows.append(
            (
                o.contender.label,
                "-" if rate is None else f"{rate:,.0f}",
                "-" if rate is None or not base else f"{rate / base:.2f}",
                "-" if o.report is None else o.report.get("engine", "-"),
                "-" if o.report is None else f"{o.report['peak_rss_mb']:.0f}",
                _correctness(o, data),
                "; ".join(notes),
            )
        )
    return rows


def _targets(outcomes: list[Outcome]) -> list[str]:
    by_key = {o.contender.key: o for o in outcomes}
    rates = {o.contender.key: o.rate for o in outcomes}
    labels = {o.contender.key: o.contender.label for o in outcomes}
    lines = []
    for mine, theirs, goal in TARGETS:
        a, b = rates.get(mine), rates.get(theirs)
        if a is None or b is None:
            continue
        ratio = a / b
        verdict = "met" if ratio >= goal else "MISSED" + _why(by_key[mine])
        lines.append(
            f"{labels[mine]} vs {labels[theirs]}: {ratio:.2f}x (goal >= {goal:g}x): {verdict}"
        )
    for key, goal in DELIVERY_TARGETS:
        outcome = by_key.get(key)
        rate = None if outcome is None else outcome.delivery_rate
        if outcome is None or rate is None:
            continue
        verdict = "met" if rate >= goal else "MISSED" + _why(outcome)
        lines.append(
            f"{labels[key]}: {rate:,.0f} unique deliveries/s (goal >= {goal:,.0f}): {verdict}"
        )
    return lines


def _why(outcome: Outcome) -> str:
    """A missed target's excuse, when the row says the engine lacked what it measures."""
    engine = "" if outcome.report is None else outcome.report.get("engine", "")
    return " (engine has no concurrency yet)" if engine == NO_CONCURRENCY else ""


COLUMNS = ("contender", "msg/s", "x {base}", "engine", "peak RSS MB", "handled == unique", "notes")


def report(
    console: Console,
    outcomes: list[Outcome],
    datasets: dict[Workload, tuple[DataSet, str]],
    machine: list[tuple[str, str]],
    elapsed: float,
) -> str:
    """Print a rich table per data set, then return (and print) the Markdown for the README.

    ``datasets`` maps each workload that ran to its data set and a note for its title.
    """
    md: list[str] = []
    md += [f"- {label}: {value}" for label, value in machine]
    md += [f"- whole run: {elapsed:.0f}s"]
    for workload, (data, extra) in datasets.items():
        mine = [o for o in outcomes if o.contender.workload == workload]
        title = (
            f"{data.events:,} events, {data.unique:,} unique IDs ({data.duplicates:.0%} "
            f"duplicates), {PARTITIONS} partitions, {BODY_BYTES}-byte values{extra}"
        )
        baseline = BASELINES[workload]
        columns = [c.format(base=baseline) for c in COLUMNS]
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="right" if column in columns[1:3] else "left")
        rows = _rows(mine, data, baseline)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))  # "[sidecar]" is not markup
        console.print(table)
        md += ["", f"**{title}**", ""]
        md += ["| " + " | ".join(columns) + " |", "|---|---:|---:|---|---:|---|---|"]
        md += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    targets = _targets(outcomes)
    for line in targets:
        console.print(("[green]" if line.endswith(": met") else "[red]") + line)
    if targets:
        md += ["", *[f"- {line}" for line in targets]]
    text = "\n".join(md)
    print("\n" + text)
    return text


def _select(only: str | None, skip: str | None) -> list[Contender]:
    """The contenders ``--only`` / ``--skip`` name; each name may be a pattern (``io-*``)."""
    known = [c.key for c in CONTENDERS]

    def matching(spec: str | None) -> set[str]:
        keys: set[str] = set()
        for pattern in spec.split(",") if spec else ():
            found = fnmatch.filter(known, pattern)
            if not found:
                raise SystemExit(f"no contender matches {pattern!r}; known: {', '.join(known)}")
            keys.update(found)
        return keys

    wanted = matching(only) if only else set(known)
    unwanted = matching(skip)
    return [c for c in CONTENDERS if c.key in wanted and c.key not in unwanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument(
        "--io-events", type=int, default=3000, help="messages in the I/O-bound rows' data set"
    )
    parser.add_argument(
        "--handler-sleep-ms",
        type=float,
        default=2.0,
        help="the I/O-bound handler's wait per event, and the sidecar target's answer time",
    )
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=500, help="messages per poll, every row")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--bootstrap", help="use this broker (default: $KAFKA_BOOTSTRAP_SERVERS or start one)"
    )
    parser.add_argument(
        "--only",
        help="comma-separated contenders or patterns (io-*): "
        + ",".join(c.key for c in CONTENDERS),
    )
    parser.add_argument("--skip", help="comma-separated contenders (or patterns) to leave out")
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds per contender (default 300 + 2 ms per event; I/O rows: 300 + "
        "(handler sleep + 3 ms) per I/O event)",
    )
    parser.add_argument(
        "--profile", type=Path, help="profile the dedupe_consumer rows with pyinstrument into DIR"
    )
    parser.add_argument("--markdown", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    contenders = _select(args.only, args.skip)
    sizes: dict[Workload, int] = {"noop": args.events, "io": args.io_events}
    timeouts: dict[Workload, float] = {
        "noop": args.timeout or 300 + 0.002 * args.events,
        "io": args.timeout or 300 + (args.handler_sleep_ms + 3) / 1000 * args.io_events,
    }
    titles: dict[Workload, str] = {
        "noop": "",
        "io": f", handler waits {args.handler_sleep_ms:g} ms per event",
    }

    from dedupe_consumer.observability import configure_logging
    from dedupe_consumer.testing import ExternalKafka, KafkaBroker, start_broker

    configure_logging("warning")  # the broker providers log; keep stdout for the report
    # Wide enough for the notes column even when stdout is a file or a pipe.
    console = Console(width=max(160, Console().width))
    started = time.perf_counter()
    token = uuid.uuid4().hex[:8]
    broker: KafkaBroker = ExternalKafka(args.bootstrap) if args.bootstrap else start_broker()
    owned = not isinstance(broker, ExternalKafka)
    outcomes: list[Outcome] = []
    datasets: dict[Workload, tuple[DataSet, str]] = {}
    profile_dir = args.profile.resolve() if args.profile else None
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench-{token}-") as tmp:
            machine = _machine.describe(
                tmp,
                {
                    "Kafka broker": "local (dedupe_consumer.testing)" if owned else "external",
                    "redis-server": _machine.binary_version(["redis-server", "--version"]),
                },
            )
            for workload in ("noop", "io"):
                if not any(c.workload == workload for c in contenders):
                    continue
                t0 = time.perf_counter()
                topic = f"bench-{token}" + ("-io" if workload == "io" else "")
                data = produce(
                    broker.bootstrap_servers, topic, sizes[workload], args.duplicates, args.seed
                )
                datasets[workload] = (data, titles[workload])
                console.print(
                    f"produced {data.events:,} events ({data.unique:,} unique IDs) to "
                    f"{data.topic} in {time.perf_counter() - t0:.1f}s"
                )
            for contender in contenders:
                console.print(f"running: {contender.label} ...", end=" ")
                t0 = time.perf_counter()
                outcome = run_contender(
                    contender,
                    bootstrap=broker.bootstrap_servers,
                    data=datasets[contender.workload][0],
                    group=f"bench-{token}-{contender.key}",
                    batch=args.batch,
                    workdir=Path(tmp),
                    timeout=timeouts[contender.workload],
                    profile_dir=profile_dir,
                    sleep_ms=args.handler_sleep_ms,
                )
                outcomes.append(outcome)
                rate = outcome.rate
                console.print(
                    f"{time.perf_counter() - t0:.1f}s, "
                    + (
                        f"{rate:,.0f} msg/s"
                        if rate is not None
                        else "refused at start-up"
                        if outcome.refused
                        else f"[red]{escape(outcome.error)}"
                    )
                )
    finally:
        if not owned:  # our own broker goes with its data; someone else's keeps no litter
            try:
                delete_topics_containing(broker.bootstrap_servers, f"bench-{token}")
            except Exception as exc:  # must not hide the error that ended the run
                print(f"warning: could not delete this run's topics: {exc}", file=sys.stderr)
        broker.stop()
    text = report(console, outcomes, datasets, machine, time.perf_counter() - started)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    if profile_dir is not None:
        console.print(f"profiles: {profile_dir}/<contender>.txt and .html")


if __name__ == "__main__":
    main()
