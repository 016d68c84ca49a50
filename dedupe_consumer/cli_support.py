"""What every command does with an error: one clear line on stderr and an exit code.

Every command reports through :func:`reporting_errors`, so the same error reads
the same in ``run``, ``sidecar``, ``record``, ``replay``, ``broker`` and ``demo``:

* ``configuration error: <message>``, exit 2: a :class:`ConfigError`, nothing started;
* ``error: <message>``, exit 2: a bad argument or input file, nothing started;
* ``error: <ErrorType>: <message>``, exit 1: a started run ended on an error
  (a :class:`DedupeError`, or for I/O commands anything, e.g. Kafka failing mid-way).

The messages name the setting or argument and what to do about it; the exit
code lets scripts tell a broken invocation from a failed run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from dedupe_consumer.errors import ConfigError, DedupeError

if TYPE_CHECKING:
    from dedupe_consumer.config import Settings

USAGE_EXIT: int = 2
"""Bad arguments, configuration or input: nothing was started."""
FAILED_EXIT: int = 1
"""A run started and ended on an error."""


_err = Console(stderr=True, soft_wrap=True)  # whole lines, so they can be grepped


def _report(label: str, message: str, code: int) -> NoReturn:
    """Print ``label: message`` on stderr and exit with *code*."""
    # escape(): messages name sections like "[sidecar]" and IDs like "[/x]", which
    # rich would read as markup.
    _err.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def usage_error(message: str) -> NoReturn:
    """A bad argument or input file: ``error: message``, exit 2."""
    _report("error", message, USAGE_EXIT)


@contextmanager
def reporting_errors(
    *, usage: tuple[type[Exception], ...] = (), unexpected: bool = False
) -> Iterator[None]:
    """Report what the block raises as described in the module docstring.

    *usage* names further exception types that mean bad input (exit 2), e.g. a
    recording that cannot be read. With *unexpected*, any other exception is
    reported too (exit 1) instead of as a traceback: for commands whose work is
    mostly someone else's I/O (Kafka, Maven, a JVM).
    """
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise  # our own exits (a RuntimeError: "unexpected" must not report them)
    except ConfigError as exc:
        _report("configuration error", str(exc), USAGE_EXIT)
    except usage as exc:
        usage_error(str(exc))
    except Exception as exc:
        if not (unexpected or isinstance(exc, DedupeError)):
            raise
        _report("error", f"{type(exc).__name__}: {exc}", FAILED_EXIT)


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


def load_settings(config: Path, bootstrap_servers: str | None) -> Settings:
    """The config file, ``DEDUPE_*`` variables, then ``--bootstrap-servers`` over both.

    The flag's value goes through the same validation as the file's.
    """
    from dedupe_consumer.config import Settings

    if bootstrap_servers is None:
        return Settings.from_toml(config)
    return Settings.from_toml(config, kafka={"bootstrap_servers": bootstrap_servers})
