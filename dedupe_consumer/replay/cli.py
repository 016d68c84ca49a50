"""``dedupe-consumer record`` and ``dedupe-consumer replay``.

Exit codes, shared by both commands so scripts can tell a failed test from a
broken invocation: 0 ok; 1 the replay found an ID handled more than once or a
lost event (or Kafka failed mid-way); 2 bad arguments, configuration or
recording. Errors are reported as every command reports them
(:mod:`dedupe_consumer.cli_support`). Progress bars and logs go to stderr,
reports to stdout, so ``--json`` output can be piped.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dedupe_consumer.cli_support import progress_bar, reporting_errors, usage_error
from dedupe_consumer.replay.report import DEFAULT_MAX_DEAD_LETTERED
from dedupe_consumer.signals import stop_on_signals

if TYPE_CHECKING:
    from dedupe_consumer.replay.report import ReplayReport

_SHOWN: int = 10
"""How many offending IDs / lost events the text report lists."""


def record(
    bootstrap_servers: Annotated[
        str, typer.Option("--bootstrap-servers", "-b", help="Kafka bootstrap servers, host:port.")
    ],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic to record.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Recording file (JSON Lines); '.gz' for gzip.")
    ],
    partition: Annotated[
        list[int] | None,
        typer.Option("--partition", "-p", help="Record only this partition (repeatable)."),
    ] = None,
    start: Annotated[
        str,
        typer.Option(
            "--from", help="'earliest', 'latest' or an ISO-8601 time (no zone means UTC)."
        ),
    ] = "earliest",
    max_messages: Annotated[
        int | None, typer.Option("--max-messages", min=1, help="Stop after N messages.")
    ] = None,
    until_end: Annotated[
        bool,
        typer.Option("--until-end", help="Stop at the end offsets taken when recording starts."),
    ] = False,
    properties: Annotated[
        list[str] | None,
        typer.Option(
            "--property",
            "-X",
            help="Extra librdkafka consumer property KEY=VALUE (repeatable), e.g. for SASL.",
        ),
    ] = None,
) -> None:
    """Record a topic to a JSON Lines file (see docs/recording-format.md).

    Reads with assign(), never joins a consumer group and never commits. Without
    --until-end or --max-messages it records until Ctrl-C, then keeps what it has.
    """
    from dedupe_consumer.observability import configure_logging
    from dedupe_consumer.replay.format import RecordingError
    from dedupe_consumer.replay.recorder import parse_start, record_topic

    err = Console(stderr=True)
    configure_logging("warning")
    stop = threading.Event()
    # The first SIGINT/SIGTERM asks for a clean stop; a second one is not caught.
    # Kafka failing mid-way is reported too (exit 1); the .partial file is kept.
    with reporting_errors(usage=(RecordingError, ValueError), unexpected=True):
        start_at = parse_start(start)
        extra = _properties(properties)
        with (
            progress_bar(err, "recording") as update,
            stop_on_signals(lambda _signal: stop.set(), once=True),
        ):
            summary = record_topic(
                bootstrap_servers,
                topic,
                out,
                partitions=partition,
                start=start_at,
                max_messages=max_messages,
                until_end=until_end,
                properties=extra,
                stop=stop,
                progress=update,
            )
    how = {"end": "end offsets reached", "max-messages": "--max-messages reached"}.get(
        summary.stopped_by, "stopped on request"
    )
    err.print(
        f"recorded {summary.messages:,} message(s) of {escape(repr(topic))} to "
        f"{escape(str(out))} ({how})",
        highlight=False,
        soft_wrap=True,
    )


def replay(
    file: Annotated[Path, typer.Argument(help="Recording file (.jsonl or .jsonl.gz).")],
    handler: Annotated[
        str | None,
        typer.Option(
            help="Handler class 'package.module:ClassName': replay through the engine, no Kafka."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML settings for the engine (store.path is replaced)."
        ),
    ] = None,
    inject_duplicates: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of events sent again later with new offsets."),
    ] = 0.0,
    redeliver_batches: Annotated[
        bool,
        typer.Option(help="Deliver every batch twice, as a restart before commit would."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for --inject-duplicates.")] = 0,
    max_dead_lettered: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Fail when more than this share of events is dead-lettered (a replay that "
            "handles nothing always fails).",
        ),
    ] = DEFAULT_MAX_DEAD_LETTERED,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    to_topic: Annotated[
        str | None,
        typer.Option(help="Instead: re-produce the recording to this (existing) topic."),
    ] = None,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option("--bootstrap-servers", "-b", help="Kafka bootstrap servers (--to-topic)."),
    ] = None,
    properties: Annotated[
        list[str] | None,
        typer.Option(
            "--property", "-X", help="Extra librdkafka producer property KEY=VALUE (--to-topic)."
        ),
    ] = None,
    ignore_dlq_partition: Annotated[
        bool,
        typer.Option(
            "--ignore-dlq-partition",
            help="(--to-topic) Let the partitioner place dead letters instead of sending each "
            "back to its dlq.original.partition (that bypasses its dedupe state).",
        ),
    ] = False,
) -> None:
    """Replay a recording through a handler (exit 1 on a double handling or a lost
    event), or re-produce it into a topic with --to-topic."""
    err = Console(stderr=True)
    if (handler is None) == (to_topic is None):
        usage_error("give exactly one of --handler (replay through the engine) or --to-topic")
    if to_topic is not None:
        engine_only = {
            "--config": config is not None,
            "--inject-duplicates": inject_duplicates != 0.0,
            "--max-dead-lettered": max_dead_lettered != DEFAULT_MAX_DEAD_LETTERED,
            "--redeliver-batches": redeliver_batches,
            "--json": as_json,
        }
        misplaced = [name for name, given in engine_only.items() if given]
        if misplaced:
            usage_error(f"{', '.join(misplaced)} only apply with --handler")
        if bootstrap_servers is None:
            usage_error("--to-topic needs --bootstrap-servers")
        _produce(err, file, to_topic, bootstrap_servers, properties, not ignore_dlq_partition)
        return
    if bootstrap_servers is not None or properties or ignore_dlq_partition:
        usage_error(
            "--bootstrap-servers, --property and --ignore-dlq-partition only apply with --to-topic"
        )
    assert handler is not None
    report = _replay_through_engine(
        err, file, handler, config, inject_duplicates, redeliver_batches, seed, max_dead_lettered
    )
    if as_json:
        typer.echo(report.to_json())
    else:
        _print_report(Console(), report)
    if not report.ok:
        raise typer.Exit(1)


def _replay_through_engine(
    err: Console,
    file: Path,
    handler_spec: str,
    config: Path | None,
    inject_duplicates: float,
    redeliver_batches: bool,
    seed: int,
    max_dead_lettered: float,
) -> ReplayReport:
    from dedupe_consumer.config import Settings
    from dedupe_consumer.loading import load_handler_class
    from dedupe_consumer.observability import configure_logging
    from dedupe_consumer.replay.format import RecordingError
    from dedupe_consumer.replay.harness import replay_recording

    with reporting_errors(usage=(RecordingError, ValueError)):
        settings = Settings.from_toml(config) if config is not None else None
        handler_cls = load_handler_class(handler_spec)
        if settings is not None:
            configure_logging(settings.observability.log_level, settings.observability.log_format)
        else:
            configure_logging("warning")
        with progress_bar(err, "replaying") as update:
            return replay_recording(
                handler_cls,
                file,
                settings=settings,
                inject_duplicates=inject_duplicates,
                redeliver_batches=redeliver_batches,
                seed=seed,
                progress=update,
                max_dead_lettered=max_dead_lettered,
            )


def _produce(
    err: Console,
    file: Path,
    topic: str,
    bootstrap_servers: str,
    properties: list[str] | None,
    keep_dead_letter_partition: bool,
) -> None:
    from dedupe_consumer.replay.format import RecordingError
    from dedupe_consumer.replay.producer import produce_recording

    with reporting_errors(usage=(RecordingError, ValueError), unexpected=True):
        extra = _properties(properties)
        with progress_bar(err, f"producing to {escape(topic)}") as update:
            summary = produce_recording(
                file,
                topic,
                bootstrap_servers,
                properties=extra,
                progress=update,
                keep_dead_letter_partition=keep_dead_letter_partition,
            )
    where = "original partitions" if summary.kept_partitions else "partitions chosen by key"
    if summary.dead_letter_partitions:
        where += (
            f"; {summary.dead_letter_partitions:,} dead letter(s) back to their "
            "dlq.original.partition"
        )
    err.print(
        f"produced {summary.messages:,} message(s) to {escape(repr(topic))} ({where})",
        highlight=False,
        soft_wrap=True,
    )


def _print_report(out: Console, report: ReplayReport) -> None:
    from rich.table import Table

    # Every text from a recording, a path or an error goes through escape(): an ID
    # like "[/x]" is rich markup otherwise (MarkupError, or silently altered output).
    table = Table(
        title=f"replay of {escape(report.topic)}",
        caption=escape(report.recording),
        show_header=False,
    )
    table.add_column("what")
    table.add_column("count", justify="right")
    reasons = ", ".join(f"{escape(k)}: {v}" for k, v in sorted(report.dead_letter_reasons.items()))
    rows: list[tuple[str, object]] = [
        ("events", report.events),
        ("  of which injected duplicates", report.injected),
        ("deliveries (with redeliveries)", report.deliveries),
        ("handled", report.handled),
        ("duplicates", report.duplicates),
        ("replays (below watermark)", report.replays),
        ("conflicting duplicates", report.conflicting),
        ("dead-lettered" + (f" ({reasons})" if reasons else ""), report.dead_lettered),
        ("events without an ID", report.missing_id),
        ("unique IDs", len(report.unique_ids)),
        ("IDs handled", len(report.handled_ids)),
        ("IDs handled more than once", len(report.handled_more_than_once)),
        ("lost events", len(report.lost)),
        ("seconds", f"{report.seconds:.2f}"),
    ]
    for what, count in rows:
        table.add_row(what, f"{count:,}" if isinstance(count, int) else str(count))
    out.print(table)
    for event_id, calls in list(report.handled_more_than_once.items())[:_SHOWN]:
        note = " (in several partitions)" if event_id in report.ids_in_several_partitions else ""
        out.print(f"  handled {calls}x: {escape(event_id)}{note}", highlight=False)
    for lost in report.lost[:_SHOWN]:
        out.print(
            f"  lost: partition {lost.partition} offset {lost.offset} "
            f"id {escape(str(lost.event_id))}: {escape(lost.reason)}",
            highlight=False,
        )
    if report.error:
        out.print(f"[bold red]stopped early:[/] {escape(report.error)}", highlight=False)
    if report.tested_nothing:
        out.print(
            "[bold red]tested too little:[/] " + escape(report.tested_nothing), highlight=False
        )
    if report.ok:
        out.print("[bold green]OK[/]: no event ID handled more than once, no event lost")
    else:
        out.print(
            f"[bold red]FAILED[/]: {len(report.handled_more_than_once)} ID(s) handled more "
            f"than once, {len(report.lost)} event(s) lost"
            + (", too little tested" if report.tested_nothing else "")
        )


# -- helpers ---------------------------------------------------------------------------------


def _properties(pairs: list[str] | None) -> dict[str, str]:
    from dedupe_consumer.redaction import is_secret_key

    found: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            shown = "<secret, not shown>" if is_secret_key(pair) else repr(pair)
            raise ValueError(f"--property {shown}: expected KEY=VALUE")
        found[key.strip()] = value
    return found
