"""``dedupe-consumer sidecar``: consume, dedupe, POST each unique event to a local endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dedupe_consumer.cli_support import BootstrapServersOption, load_settings, reporting_errors


def sidecar(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="TOML settings file with a sidecar section.")
    ],
    bootstrap_servers: BootstrapServersOption = None,
) -> None:
    """Consume, dedupe and POST each unique event once to sidecar.target_url.

    Serves /healthz, /readyz and /metrics on sidecar.listen_host:listen_port.
    SIGTERM or SIGINT ends a retry wait at once, persists and commits what was
    delivered, and exits 0; an event whose delivery was cut short is redelivered
    on the next start.
    """
    from dedupe_consumer.observability import configure_logging
    from dedupe_consumer.sidecar.runner import Sidecar

    with reporting_errors():
        settings = load_settings(config, bootstrap_servers)
        configure_logging(settings.observability.log_level, settings.observability.log_format)
        Sidecar(settings).run()
