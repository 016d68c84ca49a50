"""What every command does with our errors: one clear line and a meaningful exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from dedupe_consumer.errors import ConfigError, DedupeError

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
