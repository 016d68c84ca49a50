"""``dedupe-consumer store``: look inside a store (read-only, safe while a consumer runs),
and ``forget`` an ID (only while no consumer holds the store)."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from dedupe_consumer.cli_support import BootstrapServersOption, load_settings, reporting_errors
from dedupe_consumer.errors import StoreLockedError
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.store.reading import FoundRecord, NotAStoreError, StoreReader

store_app = typer.Typer(
    help="Look inside a store (store.path): opened read-only, so safe while a consumer runs; "
    "it shows the state as of the moment it was opened.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

StorePath = Annotated[Path, typer.Argument(help="The store's directory (store.path).")]


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _open(path: Path) -> StoreReader:
    return StoreReader(path)


@store_app.command()
def stats(path: StorePath) -> None:
    """Per partition: IDs by status, expired, responses, staged effects, bytes, watermark."""
    with reporting_errors(usage=(NotAStoreError,), unexpected=True), _open(path) as store:
        rows = store.stats(int(time.time() * 1000))
        retention = store.retention_ms
    typer.echo(
        f"store {path}: {len(rows)} partitions, retention "
        f"{'unknown' if retention is None else f'{retention / 3_600_000:g} h'}"
    )
    head = (
        *("partition", "ids", "handled", "dead_lettered", "in_progress", "expired"),
        *("responses", "effects", "bytes", "watermark", "epoch"),
    )
    lines: list[Sequence[str]] = [head]
    for row in rows:
        status = row.by_status
        lines.append(
            (
                f"{row.partition.topic}[{row.partition.partition}]",
                str(row.ids),
                str(status["handled"]),
                str(status["dead_lettered"]),
                str(status["in_progress"]),
                str(row.expired),
                str(row.responses),
                str(row.effects),
                str(row.bytes),
                "-" if row.watermark is None else str(row.watermark),
                row.epoch or "-",
            )
        )
    _table(lines)


@store_app.command()
def watermarks(path: StorePath) -> None:
    """Each partition's watermark (highest offset decided durably) and epoch, and each
    changelog partition's restore position."""
    with reporting_errors(usage=(NotAStoreError,), unexpected=True), _open(path) as store:
        rows = [
            (f"{tp.topic}[{tp.partition}]", store.watermark(tp), store.epoch(tp))
            for tp in store.partitions()
        ]
        positions = store.changelog_positions()
    _table(
        [
            ("partition", "watermark", "epoch"),
            *[(name, "-" if wm is None else str(wm), epoch or "-") for name, wm, epoch in rows],
        ]
    )
    if positions:
        typer.echo("")
        positioned = sorted((name, str(offset)) for name, offset in positions.items())
        _table([("changelog partition", "next offset"), *positioned])


@store_app.command()
def lookup(
    path: StorePath,
    event_id: Annotated[str, typer.Argument(help="The event ID to look up.")],
    topic: Annotated[str | None, typer.Option(help="Only this topic (with --partition).")] = None,
    partition: Annotated[int | None, typer.Option(min=0, help="Only this partition.")] = None,
) -> None:
    """The ID's record: status, offset, decided at, digest, expiry, stored response.
    Exits 1 when no partition has it."""
    if (topic is None) != (partition is None):
        raise typer.BadParameter("give --topic and --partition together, or neither")
    tp = None if topic is None or partition is None else TopicPartition(topic, partition)
    with reporting_errors(usage=(NotAStoreError,), unexpected=True), _open(path) as store:
        found = store.lookup(event_id, tp)
        searched = 1 if tp is not None else len(store.partitions())
    if not found:
        typer.echo(f"event ID {event_id!r} is not in the store ({searched} partitions searched)")
        raise typer.Exit(1)
    now_ms = int(time.time() * 1000)
    for hit in found:
        typer.echo(json.dumps(_as_json(hit, now_ms), indent=2))


@store_app.command()
def export(
    path: StorePath,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="File to write (default: stdout).")
    ] = None,
) -> None:
    """Every ID record as JSON Lines (one object per ID and partition), expired ones too."""
    with reporting_errors(usage=(NotAStoreError,), unexpected=True), _open(path) as store:
        now_ms = int(time.time() * 1000)
        sink: TextIO
        with open(out, "w", encoding="utf-8") if out is not None else _Stdout() as sink:
            count = 0
            for tp in store.partitions():
                for event_id, record in store.records(tp):
                    hit = FoundRecord(tp, event_id, record, store.expiry(record))
                    sink.write(json.dumps(_as_json(hit, now_ms)) + "\n")
                    count += 1
    if out is not None:
        typer.echo(f"{count} records written to {out}", err=True)


@store_app.command()
def forget(
    path: StorePath,
    event_id: Annotated[str, typer.Argument(help="The event ID to forget.")],
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The consumer's TOML settings (its group).")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    bootstrap_servers: BootstrapServersOption = None,
) -> None:
    """Delete an ID's record, so its next delivery is handled again.

    Refused while a consumer holds the store. The record is deleted from the
    changelog first (a tombstone, so no restore brings it back), then locally. An
    instance that owns the partition now keeps its own copy until its next restore:
    stop the group's consumers of that partition first.
    """
    from dedupe_consumer.kafka.changelog import forget_in_changelog
    from dedupe_consumer.scope import is_by_id_topic, stage_group
    from dedupe_consumer.store.base import WriteSet
    from dedupe_consumer.store.changelog_codec import changelog_topic
    from dedupe_consumer.store.rocks import RocksStore

    with reporting_errors(usage=(NotAStoreError, WrongConfigError), unexpected=True):
        settings = load_settings(config, bootstrap_servers)
        with _open(path) as reader:
            found = reader.lookup(event_id)
            followed = reader.changelog_positions()
            retention_ms = reader.retention_ms
        if not found:
            typer.echo(f"event ID {event_id!r} is not in the store: nothing to forget")
            raise typer.Exit(1)
        group = settings.kafka.group_id
        changelogs = {
            hit.partition: changelog_topic(
                stage_group(group) if is_by_id_topic(hit.partition.topic) else group,
                hit.partition.topic,
            )
            for hit in found
        }
        _check_config(settings.store.changelog, changelogs, followed, config)
        try:
            store = RocksStore(  # with the retention it has (a tool does not change it)
                path,
                retention_ms=retention_ms or int(settings.dedupe.retention.total_seconds() * 1000),
            )
        except StoreLockedError:
            typer.echo(
                f"error: a consumer holds the store {str(path)!r}: stop it first (forget "
                "changes what a running consumer decides)",
                err=True,
            )
            raise typer.Exit(1) from None
        try:
            where = ", ".join(f"{h.partition.topic}[{h.partition.partition}]" for h in found)
            if not yes:
                typer.confirm(f"forget {event_id!r} in {where}?", abort=True)
            for hit in found:
                if settings.store.changelog:
                    tp = hit.partition
                    topic = forget_in_changelog(
                        settings.kafka.connection(),
                        stage_group(group) if is_by_id_topic(tp.topic) else group,
                        tp,
                        [event_id],
                    )
                    typer.echo(f"tombstone written to {topic}[{tp.partition}]")
                else:
                    typer.echo("store.changelog = false: no changelog to write a tombstone to")
            store.persist(WriteSet(released={hit.partition: [event_id] for hit in found}))
        finally:
            store.close()
    typer.echo(f"forgot {event_id!r} in {where}")


class WrongConfigError(ValueError):
    """The config given to ``forget`` is not the one of the consumer that owns the store."""


def _check_config(
    changelog: bool,
    changelogs: dict[TopicPartition, str],
    followed: dict[str, int],
    config: Path,
) -> None:
    """The store names the changelog partitions it follows: ``config``'s must be those, or
    the tombstone would go to another group's changelog (which would then handle the ID
    again) while this store's changelog brings it back."""
    if not followed:
        return  # it never followed one: nothing to compare with
    if not changelog:
        raise WrongConfigError(
            f"{config} says store.changelog = false, but this store follows changelog "
            f"topics ({', '.join(sorted(followed))}): give the config of the consumer that "
            "owns the store. Nothing was changed"
        )
    for tp, topic in changelogs.items():
        if f"{topic}:{tp.partition}" not in followed:
            raise WrongConfigError(
                f"{config} (group's changelog {topic!r}) is not the config of the consumer "
                f"that owns this store: it follows {', '.join(sorted(followed))}. Nothing "
                "was changed"
            )


class _Stdout:
    """stdout as a context manager that is not closed."""

    def __enter__(self) -> TextIO:
        return sys.stdout

    def __exit__(self, *_: object) -> None:
        sys.stdout.flush()


def _as_json(hit: FoundRecord, now_ms: int) -> dict[str, Any]:
    record = hit.record
    response = record.response
    return {
        "topic": hit.partition.topic,
        "partition": hit.partition.partition,
        "event_id": hit.event_id,
        "status": record.status.name.lower(),
        "offset": record.offset,
        "decided_at": _when(record.decided_at_ms),
        "expires_at": _when(hit.expires_at_ms),
        "expired": hit.expires_at_ms is not None and hit.expires_at_ms < now_ms,
        "digest": record.digest.hex(),
        "response": None
        if response is None
        else {
            "value_base64": base64.b64encode(response.value).decode(),
            "topic": response.topic,
            "key_base64": None if response.key is None else base64.b64encode(response.key).decode(),
        },
    }


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
