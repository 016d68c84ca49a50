"""The ``dedupe-consumer`` command: ``run``, ``demo`` and ``migrate-scope`` here, the rest
from their features.

Each feature keeps its commands next to it, in a module named ``cli``:
``replay/cli.py`` (``record``, ``replay``), ``sidecar/cli.py`` (``sidecar``),
``store_cli.py`` (``store stats|lookup|watermarks|export|forget``: outside ``store/``,
which knows no Kafka),
``dlq/cli.py`` (``dlq list|redrive``), ``analysis_cli.py`` (``analyze``) and
``testing/cli.py`` (``broker``); this module assembles them into one app. All
of them report errors through :mod:`dedupe_consumer.cli_support` and stop on
signals through :mod:`dedupe_consumer.signals`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from dedupe_consumer import __version__
from dedupe_consumer.cli_support import (
    BootstrapServersOption,
    SupervisorPidOption,
    WorkerIndexOption,
    WorkersOption,
    load_settings,
    reporting_errors,
    supervise_workers,
    worker_count,
)

app = typer.Typer(
    help="Exactly-once effects for Kafka consumers: dedupe by event ID, commit after persist.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels cut long option names ("--redeliver-bat…")
    # and label every flag with a "<bool>" type.
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dedupe-consumer {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """Exactly-once effects for Kafka consumers."""


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML settings file.")],
    handler: Annotated[str, typer.Option(help="Handler class, 'package.module:ClassName'.")],
    bootstrap_servers: BootstrapServersOption = None,
    workers: WorkersOption = "1",
    worker_index: WorkerIndexOption = None,
    supervisor_pid: SupervisorPidOption = None,
) -> None:
    """Consume the configured topics and call HANDLER once per unseen event ID.

    SIGTERM or SIGINT finishes the current event, persists, commits and exits 0.
    With --workers N, every worker does so and the supervisor exits 0 when all
    have (docs/operations.md, "Scaling out").
    """
    from dedupe_consumer.consumer import DedupeConsumer
    from dedupe_consumer.loading import load_handler_class
    from dedupe_consumer.observability import configure_logging

    with reporting_errors():
        count = worker_count(workers, worker_index)
        settings = load_settings(config, bootstrap_servers)
        handler_cls = load_handler_class(handler)
        configure_logging(settings.observability.log_level, settings.observability.log_format)
        if count > 1:
            supervise_workers(
                ["run", "--handler", handler], config, bootstrap_servers, settings, count
            )
        if worker_index is not None:
            from dedupe_consumer.workers import become_worker

            become_worker(worker_index, supervisor_pid)
        DedupeConsumer(handler_cls(), settings).run()


@app.command()
def demo(
    events: Annotated[int, typer.Option(min=1, help="How many events to produce.")] = 20_000,
    duplicates: Annotated[
        float, typer.Option(min=0.0, max=0.95, help="Share of events that repeat an ID.")
    ] = 0.1,
) -> None:
    """Offline demo on librdkafka's embedded mock cluster: no broker needed."""
    from dedupe_consumer.demo import run_demo

    with reporting_errors():
        ok = run_demo(events=events, duplicates=duplicates)
    if not ok:
        raise typer.Exit(1)


@app.command("migrate-scope")
def migrate_scope(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="TOML settings with dedupe.scope = 'topic'.")
    ],
    bootstrap_servers: BootstrapServersOption = None,
) -> None:
    """Move a group's IDs from partition scope to topic scope, so the switch repeats none.

    Stop every consumer of the group first; start them with the same settings after.
    """
    from dedupe_consumer.kafka.scope_migration import migrate_to_topic_scope
    from dedupe_consumer.observability import configure_logging

    with reporting_errors():
        settings = load_settings(config, bootstrap_servers)
        configure_logging(settings.observability.log_level, settings.observability.log_format)
        report = migrate_to_topic_scope(settings)
    for topic, ids in report.ids.items():
        typer.echo(
            f"{topic}: {ids} IDs moved to topic scope ({report.expired[topic]} expired left "
            f"behind; {report.on_several_partitions[topic]} had been decided on more than "
            "one partition)"
        )


def _register_commands() -> None:
    """Commands that live next to the feature they drive (replay/, sidecar/, testing/)."""
    from dedupe_consumer.analysis_cli import analyze_command
    from dedupe_consumer.dlq.cli import dlq_app
    from dedupe_consumer.replay.cli import record, replay
    from dedupe_consumer.sidecar.cli import sidecar
    from dedupe_consumer.store_cli import store_app
    from dedupe_consumer.testing.cli import broker, schema_registry

    for command in (broker, record, replay, sidecar):
        app.command()(command)
    app.command("schema-registry")(schema_registry)
    app.add_typer(store_app, name="store")
    app.add_typer(dlq_app, name="dlq")
    app.command("analyze")(analyze_command)


_register_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        sys.exit(130)
