"""What every command does with our errors: one clear line and a meaningful exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dedupe_consumer.errors import ConfigError, DedupeError

if TYPE_CHECKING:
    from dedupe_consumer.config import Settings

err = Console(stderr=True, soft_wrap=True)  # error lines stay whole, so they can be grepped


@contextmanager
def reporting_errors() -> Iterator[None]:
    """Exit 2 on bad configuration (nothing started), 1 when a run stopped on an error."""
    try:
        yield
    except ConfigError as exc:
        # escape(): messages name sections like "[sidecar]", which rich reads as markup.
        err.print(f"[bold red]configuration error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except DedupeError as exc:
        err.print(
            f"[bold red]stopped:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False
        )
        raise typer.Exit(1) from None


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
