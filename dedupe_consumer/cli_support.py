"""What every command does with our errors: one clear line and a meaningful exit code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar, overload

import typer
from rich.console import Console
from rich.markup import escape

from dedupe_consumer.errors import ConfigError, DedupeError

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

    from dedupe_consumer.config import Settings

S = TypeVar("S", bound="Settings")

err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, so they can be grepped


def _exit(label: str, message: str, code: int) -> NoReturn:
    # escape(): messages name sections like "[sidecar]", which rich reads as markup.
    err.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def usage_error(message: str) -> NoReturn:
    """A bad argument or input file: ``error: message``, exit 2."""
    _exit("error", message, 2)


@contextmanager
def reporting_errors(
    *, usage: tuple[type[Exception], ...] = (), unexpected: bool = False
) -> Iterator[None]:
    """Exit 2 on bad configuration (nothing started), 1 when a run stopped on an error.

    ``configuration error: ...`` (2), ``error: ...`` (2) for the *usage* types (bad
    input), ``error: <ErrorType>: ...`` (1) for a DedupeError, or any error if
    *unexpected* (commands mostly doing others' I/O: Kafka, a JVM).
    """
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise  # our own exits (typer.Exit is a RuntimeError)
    except ConfigError as exc:
        _exit("configuration error", str(exc), 2)
    except usage as exc:
        usage_error(str(exc))
    except Exception as exc:
        if not (unexpected or isinstance(exc, DedupeError)):
            raise
        _exit("error", f"{type(exc).__name__}: {exc}", 1)


BootstrapServersOption = Annotated[
    str | None,
    typer.Option(
        "--bootstrap-servers",
        "-b",
        help="host:port[,host:port...]; overrides kafka.bootstrap_servers from the config "
        "file (the environment variable DEDUPE_KAFKA__BOOTSTRAP_SERVERS does too).",
    ),
]
"""``run`` and ``sidecar``: the broker address, the one setting that differs per environment."""

WorkersOption = Annotated[
    str,
    typer.Option(
        "--workers",
        metavar="N",
        help="Worker processes of the group on this machine, 1..64 (default 1: this process "
        "consumes). N > 1: a supervisor starts N, each with the store <store.path>/worker-<i> "
        "and port + i, restarts a crashed one with backoff, and forwards SIGTERM to all.",
    ),
]
"""``run`` and ``sidecar``: ``--workers N`` (:mod:`dedupe_consumer.workers`)."""

WorkerIndexOption = Annotated[int | None, typer.Option("--worker-index", hidden=True)]
"""Set by the supervisor on each worker's command line: the worker's index."""

SupervisorPidOption = Annotated[int | None, typer.Option("--supervisor-pid", hidden=True)]
"""Set by the supervisor on each worker's command line: the pid a worker dies with."""


def worker_count(workers: str, worker_index: int | None) -> int:
    """``--workers``'s value checked (ConfigError, exit 2); a worker never supervises."""
    from dedupe_consumer.workers import parse_workers

    count = parse_workers(workers)
    if count > 1 and worker_index is not None:
        raise ConfigError("--workers and --worker-index exclude each other")
    return count


def supervise_workers(
    command: list[str], config: Path, bootstrap_servers: str | None, settings: Settings, count: int
) -> NoReturn:
    """Run ``count`` workers of ``command`` (``run ...`` or ``sidecar``) and exit with the
    supervisor's code."""
    from dedupe_consumer.workers import supervise

    argv = [*command, "--config", str(config)]
    if bootstrap_servers is not None:
        argv += ["--bootstrap-servers", bootstrap_servers]
    raise typer.Exit(supervise(argv, settings, count, command[0]))


@overload
def load_settings(config: Path, bootstrap_servers: str | None) -> Settings: ...
@overload
def load_settings(config: Path, bootstrap_servers: str | None, kind: type[S]) -> S: ...
def load_settings(
    config: Path, bootstrap_servers: str | None, kind: type[Settings] | None = None
) -> Settings:
    """The config file, ``DEDUPE_*`` variables, then ``--bootstrap-servers`` over both.

    ``kind`` is the command's settings type. By default it is the sidecar's
    (``Settings`` plus ``[sidecar]``): one file may serve ``run`` and
    ``sidecar``, and ``run`` still stops on a bad ``[sidecar]`` section. The
    flag's value goes through the same validation as the file's.
    """
    from dedupe_consumer.sidecar.settings import SidecarAppSettings

    settings_type = kind or SidecarAppSettings
    if bootstrap_servers is None:
        return settings_type.from_toml(config)
    return settings_type.from_toml(config, kafka={"bootstrap_servers": bootstrap_servers})


@contextmanager
def progress_bar(console: Console, label: str) -> Iterator[Callable[[int, int | None], None]]:
    """A rich progress bar on stderr; yields ``update(done, total)``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bar: RichProgress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # no bar frames in CI logs or captured output
    )
    task = bar.add_task(label, total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update
