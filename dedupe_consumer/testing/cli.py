"""``dedupe-consumer broker`` and ``schema-registry``: run a test server in the foreground.

For trying the sidecar or the examples by hand on a machine without Docker:
one command gives a real Kafka on loopback (``--brokers 3``: a three-node
cluster, for trying what a broker fault does), another a Confluent-compatible
Schema Registry (Apicurio, for the Avro/Protobuf/JSON Schema examples), and
Ctrl-C takes it away again with nothing left running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console

from dedupe_consumer.cli_support import reporting_errors
from dedupe_consumer.signals import install_stop_handlers
from dedupe_consumer.testing._errors import BrokerUnavailableError, SchemaRegistryStartError
from dedupe_consumer.testing._local_cluster import LocalKafkaCluster
from dedupe_consumer.testing._local_kafka import LocalKafka
from dedupe_consumer.testing._maven import KAFKA_VERSION
from dedupe_consumer.testing._schema_registry import (
    APICURIO_REGISTRY_VERSION,
    LocalSchemaRegistry,
)

__all__ = ["broker", "run_broker_foreground", "run_schema_registry_foreground", "schema_registry"]


def broker(
    port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="PLAINTEXT port on 127.0.0.1 (default: a free port; one node only).",
        ),
    ] = None,
    brokers: Annotated[
        int,
        typer.Option(
            min=1,
            max=9,
            help="Nodes: 1 (default) is a single broker; 3 is a cluster with replication "
            "factor 3 and min.insync.replicas 2, for broker-fault tests.",
        ),
    ] = 1,
) -> None:
    """Start a local Kafka (KRaft, jars from Maven) until Ctrl-C: one node, or a cluster."""
    if port is not None and brokers > 1:
        raise typer.BadParameter(
            "pins a single broker's port; omit it with --brokers", param_hint="--port"
        )
    with reporting_errors(unexpected=True):
        run_broker_foreground(port=port, brokers=brokers)


def run_broker_foreground(
    *, port: int | None = None, console: Console | None = None, brokers: int = 1
) -> None:
    """Start a :class:`LocalKafka` (or a :class:`LocalKafkaCluster` of *brokers* nodes),
    print its address, block until Ctrl-C or SIGTERM, stop it.

    It is always the local Maven-jar broker, not ``start_broker()``: a command
    that says "run a broker" should not quietly hand back somebody else's
    ``$KAFKA_BOOTSTRAP_SERVERS``. *port* pins the PLAINTEXT port of a single
    broker so other processes can be configured ahead of time; by default a
    free one is used. Raises BrokerUnavailableError when the broker cannot
    start or a node dies on its own (with the tail of its log, which is deleted
    with its directory).
    """
    out = console or Console()
    running: LocalKafka | LocalKafkaCluster
    if brokers > 1:
        running = LocalKafkaCluster(brokers)
        what = f"KRaft, {brokers} nodes"
    else:
        running = LocalKafka(port=port)
        what = "KRaft, single node"
    stop_requested = threading.Event()
    restore_signals: Callable[[], None] | None = None
    try:
        # Ctrl-C while starting is an ordinary KeyboardInterrupt (abort at
        # once, the finally stops whatever was started); once up, both signals
        # just ask the wait loop below to finish.
        with out.status(f"Starting Apache Kafka {KAFKA_VERSION} ({what})..."):
            running.start()
        nodes = list(running.nodes) if isinstance(running, LocalKafkaCluster) else [running]
        restore_signals = install_stop_handlers(lambda _signal: stop_requested.set())
        out.print(
            f"[bold green]Kafka {KAFKA_VERSION} is up[/] at [bold]{running.bootstrap_servers}[/]"
        )
        out.print(f"  bootstrap.servers={running.bootstrap_servers}", highlight=False)
        for node in nodes:
            out.print(f"  broker log: {node.log_file}", highlight=False)
        out.print("Press Ctrl-C to stop.")
        while not stop_requested.wait(timeout=1.0):
            for node in nodes:
                if not node.is_running:
                    raise BrokerUnavailableError(
                        f"a Kafka broker exited on its own.\n{node.log_tail()}"
                    )
        out.print("Stopping Kafka...")
    finally:
        running.stop()
        if restore_signals is not None:
            restore_signals()
    out.print("[green]Kafka stopped.[/]")


def schema_registry(
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="HTTP port on 127.0.0.1 (default: a free port)."),
    ] = None,
) -> None:
    """Start a local Schema Registry (Apicurio, Confluent-compatible API) until Ctrl-C."""
    with reporting_errors(unexpected=True):
        run_schema_registry_foreground(port=port)


def run_schema_registry_foreground(
    *, port: int | None = None, console: Console | None = None
) -> None:
    """Start a :class:`LocalSchemaRegistry`, print its URL, block until Ctrl-C or SIGTERM,
    stop it. Raises SchemaRegistryStartError when it cannot start or dies on its own
    (with the tail of its log, which is deleted with its directory)."""
    out = console or Console()
    registry = LocalSchemaRegistry(port=port)
    stop_requested = threading.Event()
    restore_signals: Callable[[], None] | None = None
    try:
        with out.status(f"Starting Apicurio Registry {APICURIO_REGISTRY_VERSION}..."):
            registry.start()
        restore_signals = install_stop_handlers(lambda _signal: stop_requested.set())
        out.print(f"[bold green]Schema Registry is up[/] at [bold]{registry.url}[/]")
        out.print(f"  schema.registry.url={registry.url}", highlight=False)
        out.print(f"  log: {registry.log_file}", highlight=False)
        out.print("In memory: its schemas are gone when it stops. Press Ctrl-C to stop.")
        while not stop_requested.wait(timeout=1.0):
            if not registry.is_running:
                raise SchemaRegistryStartError(
                    f"the schema registry exited on its own.\n{registry.log_tail()}"
                )
        out.print("Stopping the schema registry...")
    finally:
        registry.stop()
        if restore_signals is not None:
            restore_signals()
    out.print("[green]Schema registry stopped.[/]")
