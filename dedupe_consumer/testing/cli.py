"""``dedupe-consumer broker``: run the test broker in the foreground.

For trying the sidecar or the examples by hand on a machine without Docker:
one command gives a real Kafka on loopback, and Ctrl-C takes it away again
with nothing left running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from dedupe_consumer.cli_support import reporting_errors
from dedupe_consumer.signals import install_stop_handlers
from dedupe_consumer.testing._errors import BrokerUnavailableError
from dedupe_consumer.testing._local_kafka import LocalKafka
from dedupe_consumer.testing._maven import KAFKA_VERSION

__all__ = ["broker", "run_broker_foreground"]


def broker(
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="PLAINTEXT port on 127.0.0.1 (default: a free port)."),
    ] = None,
) -> None:
    """Start a local single-node Kafka (KRaft, jars from Maven) until Ctrl-C."""
    with reporting_errors(unexpected=True):
        run_broker_foreground(port=port)


def run_broker_foreground(*, port: int | None = None, console: Console | None = None) -> None:
    """Start a :class:`LocalKafka`, print its address, block until Ctrl-C or SIGTERM, stop it.

    It is always the local Maven-jar broker, not ``start_broker()``: a command
    that says "run a broker" should not quietly hand back somebody else's
    ``$KAFKA_BOOTSTRAP_SERVERS``. *port* pins the PLAINTEXT port so other
    processes can be configured ahead of time; by default a free one is used.
    Raises BrokerUnavailableError when the broker cannot start or dies on its
    own (with the tail of its log, which is deleted with its directory).
    """
    out = console or Console()
    broker = LocalKafka(port=port)
    stop_requested = threading.Event()
    restore_signals: Callable[[], None] | None = None
    try:
        # Ctrl-C while starting is an ordinary KeyboardInterrupt (abort at
        # once, the finally stops whatever was started); once up, both signals
        # just ask the wait loop below to finish.
        with out.status(f"Starting Apache Kafka {KAFKA_VERSION} (KRaft, single node)..."):
            broker.start()
        restore_signals = install_stop_handlers(lambda _signal: stop_requested.set())
        out.print(
            f"[bold green]Kafka {KAFKA_VERSION} is up[/] at [bold]{broker.bootstrap_servers}[/]"
        )
        out.print(f"  bootstrap.servers={broker.bootstrap_servers}", highlight=False)
        out.print(f"  broker log: {broker.log_file}", highlight=False)
        out.print("Press Ctrl-C to stop.")
        while not stop_requested.wait(timeout=1.0):
            if not broker.is_running:
                raise BrokerUnavailableError(
                    f"the Kafka broker exited on its own.\n{broker.log_tail()}"
                )
        out.print("Stopping Kafka...")
    finally:
        broker.stop()
        if restore_signals is not None:
            restore_signals()
    out.print("[green]Kafka stopped.[/]")
