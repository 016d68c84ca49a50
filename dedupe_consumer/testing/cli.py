"""``dedupe-consumer broker``: run the test broker in the foreground.

For trying the sidecar or the examples by hand on a machine without Docker:
one command gives a real Kafka on loopback, and Ctrl-C takes it away again
with nothing left running.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from rich.console import Console

from dedupe_consumer.testing._local_kafka import KAFKA_VERSION, BrokerUnavailableError, LocalKafka

__all__ = ["run_broker_foreground"]


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
    previous: dict[signal.Signals, Any] = {}
    try:
        # Ctrl-C while starting is an ordinary KeyboardInterrupt (abort at
        # once, the finally stops whatever was started); once up, both signals
        # just ask the wait loop below to finish.
        with out.status(f"Starting Apache Kafka {KAFKA_VERSION} (KRaft, single node)..."):
            broker.start()
        stop_requested = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            stop_requested.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out.print("[green]Kafka stopped.[/]")
