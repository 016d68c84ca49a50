"""``dedupe-consumer dlq list|redrive``: what is in the dead-letter topic, and a way back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dedupe_consumer.cli_support import (
    BootstrapServersOption,
    load_settings,
    progress_bar,
    reporting_errors,
)
from dedupe_consumer.config import Settings
from dedupe_consumer.dlq.letters import Letter, LetterFilter, parse_letter
from dedupe_consumer.errors import DedupeError

dlq_app = typer.Typer(
    help="The dead-letter topic (processing.dead_letter_topic): list letters by reason, "
    "redrive them to where they came from.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
err = Console(stderr=True)
_TIMEOUT_S = 30.0


class RedriveError(DedupeError):
    """A redrive that cannot start: bad options or a target it cannot reach (nothing sent)."""


ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The consumer's TOML settings.")]
ReasonOption = Annotated[
    list[str] | None, typer.Option("--reason", help="Only this dlq.reason (repeatable).")
]
TopicOption = Annotated[str | None, typer.Option("--topic", help="Only letters from this topic.")]
PartitionOption = Annotated[
    int | None, typer.Option("--partition", min=0, help="Only letters from this partition.")
]
EventIdOption = Annotated[
    list[str] | None, typer.Option("--event-id", help="Only this event ID (repeatable).")
]
SinceOption = Annotated[
    datetime | None,
    typer.Option("--since", help="Only letters written at or after (ISO 8601, UTC if naive)."),
]
UntilOption = Annotated[
    datetime | None, typer.Option("--until", help="Only letters written before (ISO 8601).")
]


def _utc(when: datetime | None) -> datetime | None:
    return None if when is None or when.tzinfo else (when.replace(tzinfo=UTC))


def _filter(
    reason: list[str] | None,
    topic: str | None,
    partition: int | None,
    event_id: list[str] | None,
    since: datetime | None,
    until: datetime | None,
) -> LetterFilter:
    return LetterFilter(
        reasons=frozenset(reason or ()),
        topic=topic,
        partition=partition,
        event_ids=frozenset(event_id or ()),
        since=_utc(since),
        until=_utc(until),
    )


def _letters(
    settings: Settings, update: Callable[[int, int | None], None] | None = None
) -> Iterator[Letter | None]:
    """Every message of the dead-letter topic, from its start to its end as of now, as a
    letter (None: a message that is not one of ours)."""
    from dedupe_consumer.kafka.recording import read_to_end

    connection = settings.kafka.connection()
    for message in read_to_end(
        connection.bootstrap_servers,
        connection.properties,
        settings.processing.dead_letter_topic,
        update,
        timeout_s=_TIMEOUT_S,
    ):
        yield parse_letter(message)


@dlq_app.command("list")
def list_letters(
    config: ConfigOption,
    reason: ReasonOption = None,
    topic: TopicOption = None,
    partition: PartitionOption = None,
    event_id: EventIdOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    show: Annotated[int, typer.Option(min=0, help="How many letters to show.")] = 20,
    bootstrap_servers: BootstrapServersOption = None,
) -> None:
    """Counts by reason, then the first letters (oldest first) that match."""
    chosen = _filter(reason, topic, partition, event_id, since, until)
    with reporting_errors(unexpected=True):
        settings = load_settings(config, bootstrap_servers)
        found, foreign = 0, 0
        by_reason: Counter[str] = Counter()
        shown: list[Letter] = []  # only these are kept: the topic may be large
        with progress_bar(err, "reading the dead-letter topic") as update:
            for letter in _letters(settings, update):
                if letter is None:
                    foreign += 1
                elif chosen(letter):
                    found += 1
                    by_reason[letter.reason] += 1
                    if len(shown) < show:
                        shown.append(letter)
    typer.echo(
        f"{found} dead letters in {settings.processing.dead_letter_topic}"
        + (f" ({foreign} messages without dlq.* headers skipped)" if foreign else "")
    )
    for name, count in by_reason.most_common():
        typer.echo(f"  {name}: {count}")
    for letter in shown:
        typer.echo(
            f"{letter.coordinates}  {letter.reason}  id={letter.event_id!r}  from "
            f"{letter.original_topic}[{letter.original_partition}]@{letter.original_offset}"
            f"  {letter.error_class}: {letter.error_message[:100]}"
            + (f"  (cannot be redriven: {letter.incomplete})" if letter.incomplete else "")
        )


@dlq_app.command()
def redrive(
    config: ConfigOption,
    reason: ReasonOption = None,
    topic: TopicOption = None,
    partition: PartitionOption = None,
    event_id: EventIdOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    to_topic: Annotated[
        str | None,
        typer.Option("--to-topic", help="Produce here instead of each letter's original topic."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be sent.")] = False,
    skip_incomplete: Annotated[
        bool,
        typer.Option(
            "--skip-incomplete",
            help="Leave out letters whose value, key or headers were too large to keep "
            "(else they stop the redrive before anything is sent).",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    bootstrap_servers: BootstrapServersOption = None,
) -> None:
    """Re-produce the matching letters' original key, value and headers to their original
    topic and partition (or --to-topic), marked ``dedupe.redrive``: the consumer handles an
    ID that was dead-lettered once more; one that was handled since stays a duplicate, so
    redriving a letter twice handles it at most once. Exit 1 when a letter could not be
    sent, 2 for bad options or a target topic that does not exist (nothing is sent then).
    """
    from dedupe_consumer.kafka.recording import RecordingProducer, TopicUnavailableError

    chosen = _filter(reason, topic, partition, event_id, since, until)
    with reporting_errors(usage=(RedriveError,), unexpected=True):
        settings = load_settings(config, bootstrap_servers)
        with progress_bar(err, "reading the dead-letter topic") as update:
            letters = [x for x in _letters(settings, update) if x is not None and chosen(x)]
        incomplete = [x for x in letters if x.incomplete is not None]
        if incomplete and not skip_incomplete:
            raise RedriveError(
                f"{len(incomplete)} of the {len(letters)} letters cannot be redriven (e.g. "
                f"{incomplete[0].coordinates}: {incomplete[0].incomplete}); narrow the "
                "selection or pass --skip-incomplete. Nothing was sent"
            )
        letters = [x for x in letters if x.incomplete is None]
        connection = settings.kafka.connection()
        producer = RecordingProducer(connection.bootstrap_servers, connection.properties)
        targets: dict[str, int] = {}
        for letter in letters:
            target = to_topic or letter.original_topic
            if target not in targets:
                try:
                    targets[target] = producer.partition_count(target, _TIMEOUT_S)
                except TopicUnavailableError as missing:
                    raise RedriveError(
                        f"target topic {target!r} cannot be produced to ({missing}); create it "
                        "or pass --to-topic. Nothing was sent"
                    ) from None
            if to_topic is None and not 0 <= letter.original_partition < targets[target]:
                raise RedriveError(
                    f"{letter.coordinates}: {target!r} has no partition "
                    f"{letter.original_partition} any more; pass --to-topic. Nothing was sent"
                )
        where = ", ".join(
            f"{t} ({n})" for t, n in Counter(to_topic or x.original_topic for x in letters).items()
        )
        if dry_run or not letters:
            typer.echo(f"would redrive {len(letters)} letters to {where or 'nowhere'}")
            return
        if not yes:
            typer.confirm(f"redrive {len(letters)} letters to {where}?", abort=True)
        with progress_bar(err, "redriving") as update:
            for n, letter in enumerate(letters, 1):
                producer.send(
                    to_topic or letter.original_topic,
                    letter.key,
                    letter.value,
                    letter.redrive_headers(),
                    partition=_placed(letter, to_topic, targets),
                )
                update(n, len(letters))
            left = producer.flush(_TIMEOUT_S)
    if left or producer.failures:
        typer.echo(
            f"error: {left} letters unacknowledged, failures: {producer.failures[:3]}; "
            "redriving them again is safe (handled at most once)",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(f"redrove {len(letters)} letters to {where}")


def _placed(letter: Letter, to_topic: str | None, partitions: dict[str, int]) -> int | None:
    """The partition a redriven copy goes to, the same every time (partition scope
    dedupes within a partition: two redrives of one letter must meet there). Its own
    partition on the original topic; on ``--to-topic`` the partitioner's choice by key
    (murmur2, as Java producers place keys), and a keyless letter by its original
    partition, modulo the target's partition count."""
    if to_topic is None:
        return letter.original_partition
    if letter.key is not None:
        return None
    return letter.original_partition % partitions[to_topic]
