"""``dedupe-consumer sidecar``: consume, dedupe, POST each unique event to a local endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
from dedupe_consumer.errors import ConfigError

MISSING_AIOHTTP = (
    "`dedupe-consumer sidecar` needs aiohttp, which the core install leaves out: "
    "pip install 'dedupe-consumer[sidecar]'"
)


def sidecar(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="TOML settings file with a sidecar section.")
    ],
    bootstrap_servers: BootstrapServersOption = None,
    workers: WorkersOption = "1",
    worker_index: WorkerIndexOption = None,
    supervisor_pid: SupervisorPidOption = None,
) -> None:
    """Consume, dedupe and POST each unique event once to sidecar.target_url.

    Serves /healthz, /readyz and /metrics on sidecar.listen_host:listen_port.
    SIGTERM or SIGINT ends a retry wait at once, persists and commits what was
    delivered, and exits 0; an event whose delivery was cut short is redelivered
    on the next start. With --workers N, worker i serves them on listen_port + i.
    """
    from dedupe_consumer.observability import configure_logging
    from dedupe_consumer.sidecar.settings import SidecarAppSettings

    with reporting_errors():
        count = worker_count(workers, worker_index)
        try:
            from dedupe_consumer.sidecar.runner import Sidecar
        except ModuleNotFoundError as exc:
            if exc.name != "aiohttp":
                raise
            raise ConfigError(MISSING_AIOHTTP) from None
        settings = load_settings(config, bootstrap_servers, SidecarAppSettings)
        configure_logging(settings.observability.log_level, settings.observability.log_format)
        if count > 1:
            from dedupe_consumer.sidecar.runner import sidecar_settings

            sidecar_settings(settings)  # its errors once, before any worker starts
            supervise_workers(["sidecar"], config, bootstrap_servers, settings, count)
        if worker_index is not None:
            from dedupe_consumer.workers import become_worker

            become_worker(worker_index, supervisor_pid)
        Sidecar(settings).run()
