"""``dedupe-consumer analyze``: measure duplicate traffic, recommend a retention."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from dedupe_consumer.analysis import Analysis, analyze, recommend
from dedupe_consumer.cli_support import (
    BootstrapServersOption,
    load_settings,
    progress_bar,
    reporting_errors,
)
from dedupe_consumer.config import Settings
from dedupe_consumer.models import SourceMessage

Scope = Literal["partition", "topic"]

err = Console(stderr=True)


def analyze_command(
    recording: Annotated[
        Path | None, typer.Argument(help="A recording (dedupe-consumer record), or use --topic.")
    ] = None,
    topic: Annotated[
        str | None, typer.Option("--topic", "-t", help="Read this topic from start to end.")
    ] = None,
    bootstrap_servers: BootstrapServersOption = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="The consumer's TOML settings: its connection (SASL, TLS), dedupe.id_source "
            "and dedupe.retention, unless the options here say otherwise.",
        ),
    ] = None,
    id_source: Annotated[
        str | None,
        typer.Option(
            "--id-source",
            help="Where the event ID is, as dedupe.id_source [default: the config's, "
            "else header:event-id].",
        ),
    ] = None,
    retention: Annotated[
        str | None,
        typer.Option(
            "--retention",
            help="A retention to check, e.g. '7d' [default: the config's dedupe.retention].",
        ),
    ] = None,
    scope: Annotated[
        Scope | None,
        typer.Option(
            "--scope",
            help="dedupe.scope to judge repeats by [default: the config's, else partition].",
        ),
    ] = None,
) -> None:
    """Share of duplicates, conflicts and messages without a usable ID, and how long after
    an ID's first appearance its copies come (p50/p99/p99.9/max): then a retention that
    covers them, and what the store would hold with it at the measured rate."""
    from dedupe_consumer._durations import parse_duration
    from dedupe_consumer.config import PayloadSettings
    from dedupe_consumer.payloads import id_reader

    if (recording is None) == (topic is None):
        raise typer.BadParameter("give a recording file or --topic (one of them)")
    if topic is not None and not bootstrap_servers and config is None:
        raise typer.BadParameter("--topic needs --bootstrap-servers or --config")
    with reporting_errors(usage=(ValueError,), unexpected=True):
        settings = None if config is None else load_settings(config, bootstrap_servers)
        extract = id_reader(
            id_source or (settings.dedupe.id_source if settings else "header:event-id"),
            settings.payload if settings else PayloadSettings.model_validate({}),
        )
        checked: timedelta | None = settings.dedupe.retention if settings else None
        if retention is not None:
            checked = parse_duration(retention)
        with progress_bar(err, "reading") as update:
            if recording is not None:
                result = analyze(_recorded(recording), extract)
            else:
                assert topic is not None
                result = analyze(_topic(topic, bootstrap_servers, settings, update), extract)
    _report(result, checked, scope or (settings.dedupe.scope if settings else "partition"))


def _recorded(recording: Path) -> Iterable[SourceMessage]:
    from dedupe_consumer.replay.format import read_recording

    return read_recording(recording).records


def _topic(
    topic: str,
    bootstrap_servers: str | None,
    settings: Settings | None,
    update: Callable[[int, int | None], None],
) -> Iterable[SourceMessage]:
    """Every message of ``topic`` as of now, over the config's connection when there is one
    (its SASL and TLS properties too), else plainly to ``bootstrap_servers``."""
    from dedupe_consumer.kafka.recording import read_to_end

    if settings is None:
        assert bootstrap_servers is not None
        return read_to_end(bootstrap_servers, {}, topic, update)
    connection = settings.kafka.connection()
    return read_to_end(connection.bootstrap_servers, connection.properties, topic, update)


def _share(part: int, whole: int) -> str:
    return f"{part:,} ({100 * part / whole:.2f}%)" if whole else "0"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _report(result: Analysis, checked: timedelta | None, scope: str) -> None:
    n = result.messages
    typer.echo(f"messages: {n:,} over {_duration(result.span_s)}")
    typer.echo(f"unique IDs: {result.unique_ids:,}")
    typer.echo(f"duplicates (same ID, same payload): {_share(result.duplicates, n)}")
    typer.echo(f"conflicts (same ID, another payload): {_share(result.conflicts, n)}")
    typer.echo(f"without a usable ID: {_share(result.without_id, n)}")
    typer.echo(
        "time from an ID's first copy to a repeat: "
        + ", ".join(
            f"{name} {_duration(result.percentile(share))}"
            for name, share in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))
        )
    )
    typer.echo(
        "repeats on another partition than their ID's first copy: "
        + _share(result.other_partition, result.repeats)
        + (
            ' (handled again under dedupe.scope = "partition": key the messages by event '
            'ID, or use scope "topic")'
            if result.other_partition and scope == "partition"
            else ""
        )
    )
    if checked is not None:
        retention_s = checked.total_seconds()
        again = result.handled_again(retention_s, scope)
        late = result.missed_by(retention_s)
        why = f"{late:,} after their ID expired"
        if scope == "partition":
            elsewhere = again - late
            why += f", {elsewhere:,} more on another partition than their ID's first copy"
        typer.echo(
            f'with retention {_duration(retention_s)} and dedupe.scope "{scope}": '
            f"{again:,} of {result.repeats:,} repeats would be handled again ({why})"
        )
    advice = recommend(result)
    store = (
        "an unknown size (the messages span under a minute: no rate to go by)"
        if advice.store_bytes is None
        else f"about {advice.store_bytes / 2**20:,.1f} MiB"
    )
    typer.echo(
        f"recommended dedupe.retention: {_duration(advice.retention_s)} ({advice.why}); "
        f"the store would hold {store} at {advice.bytes_per_id:.0f} bytes per ID"
    )
