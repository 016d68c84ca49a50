"""``dedupe-consumer sidecar``: consume, dedupe, POST each unique event to a local endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dedupe_consumer.errors import ConfigError, DedupeError


def sidecar(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="TOML settings file with a sidecar section.")
    ],
) -> None:
    """Consume, dedupe and POST each unique event once to sidecar.target_url.

    Serves /healthz, /readyz and /metrics on sidecar.listen_host:listen_port.
    SIGTERM or SIGINT ends a retry wait at once, persists and commits what was
    delivered, and exits 0; an event whose delivery was cut short is redelivered
    on the next start.
    """
    from dedupe_consumer.config import Settings
    from dedupe_consumer.observability import configure_logging
    from dedupe_consumer.sidecar.runner import Sidecar

    err = Console(stderr=True)
    try:
        settings = Settings.from_toml(config)
        configure_logging(settings.observability.log_level, settings.observability.log_format)
        Sidecar(settings).run()
    except ConfigError as exc:
        # escape(): messages name sections like "[sidecar]", which rich reads as markup.
        err.print(f"[bold red]configuration error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except DedupeError as exc:
        err.print(
            f"[bold red]stopped:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False
        )
        raise typer.Exit(1) from None
