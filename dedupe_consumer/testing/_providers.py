"""Pick a real Kafka broker for tests from whatever this machine offers.

Order, cheapest and most explicit first:

1. ``KAFKA_BOOTSTRAP_SERVERS`` -- somebody already runs a broker (CI service,
   developer's own); use it, after checking it answers.
2. testcontainers' Kafka module -- only when a Docker daemon answers a ping, so
   machines without Docker do not wait for a container runtime that is not
   there.
3. :class:`LocalKafka` -- Apache Kafka from Maven Central jars, needs only Java
   and Maven.

When all fail, :class:`BrokerUnavailableError` names every provider tried and
why it failed, so "no broker" is a diagnosis rather than a shrug.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from typing import Any, Final, Protocol, runtime_checkable

import structlog

from dedupe_consumer.testing._errors import BrokerUnavailableError
from dedupe_consumer.testing._local_kafka import LocalKafka, probe_bootstrap

__all__ = [
    "ENV_BOOTSTRAP_SERVERS",
    "ENV_KAFKA_IMAGE",
    "ContainerKafka",
    "ExternalKafka",
    "KafkaBroker",
    "start_broker",
]

ENV_BOOTSTRAP_SERVERS: Final = "KAFKA_BOOTSTRAP_SERVERS"
ENV_KAFKA_IMAGE: Final = "DEDUPE_KAFKA_IMAGE"
_DEFAULT_IMAGE: Final = "confluentinc/cp-kafka:7.6.0"

_log = structlog.get_logger(__name__)


@runtime_checkable
class KafkaBroker(Protocol):
    """What a test needs from a broker: where it is, and a way to let it go."""

    @property
    def bootstrap_servers(self) -> str: ...

    def stop(self) -> None: ...


class ExternalKafka:
    """A broker someone else runs; ``stop()`` leaves it alone because it is not ours."""

    def __init__(self, bootstrap_servers: str) -> None:
        self._bootstrap_servers = bootstrap_servers

    @property
    def bootstrap_servers(self) -> str:
        return self._bootstrap_servers

    def stop(self) -> None:
        """Nothing to do: the broker's owner decides when it stops."""

    def __repr__(self) -> str:
        return f"ExternalKafka({self._bootstrap_servers})"


class ContainerKafka:
    """A testcontainers ``KafkaContainer`` in KRaft mode behind the KafkaBroker protocol."""

    def __init__(self, container: Any) -> None:
        self._container = container
        self._bootstrap_servers: str = container.get_bootstrap_server()

    @property
    def bootstrap_servers(self) -> str:
        return self._bootstrap_servers

    def stop(self) -> None:
        self._container.stop()

    def __repr__(self) -> str:
        return f"ContainerKafka({self._bootstrap_servers})"


def _from_env(timeout: float) -> KafkaBroker:
    bootstrap = os.environ.get(ENV_BOOTSTRAP_SERVERS, "").strip()
    if not bootstrap:
        raise BrokerUnavailableError(f"${ENV_BOOTSTRAP_SERVERS} is not set")
    probe_bootstrap(bootstrap, timeout)
    return ExternalKafka(bootstrap)


def _docker_answers(timeout: float = 3.0) -> None:
    """Raise unless a Docker daemon answers a ping within *timeout* seconds."""
    try:
        # Through importlib: docker ships no type hints, and this keeps mypy
        # from demanding stubs for a package only this probe touches.
        docker: Any = importlib.import_module("docker")
    except ImportError as exc:
        raise BrokerUnavailableError(f"the docker package is not importable ({exc})") from exc
    try:
        client = docker.from_env(timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # DockerException, requests errors, ...: all mean "no daemon"
        raise BrokerUnavailableError(f"no Docker daemon answers ({exc})") from exc


def _from_testcontainers(timeout: float) -> KafkaBroker:
    _docker_answers()
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from testcontainers.kafka import KafkaContainer
        except ImportError as exc:
            raise BrokerUnavailableError(
                f"testcontainers' Kafka module is not importable ({exc})"
            ) from exc
    image = os.environ.get(ENV_KAFKA_IMAGE) or _DEFAULT_IMAGE
    container = (
        KafkaContainer(image)
        .with_kraft()
        # testcontainers sets the offsets topic to RF 1 but not the transaction
        # log: with the default RF 3 a one-broker cluster can never run a
        # transactional producer.
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
    )
    try:
        container.start(timeout=int(timeout))
        broker = ContainerKafka(container)
        probe_bootstrap(broker.bootstrap_servers, timeout)
    except Exception as exc:
        try:
            container.stop()
        except Exception as stop_exc:
            _log.warning("kafka.container.stop_failed", error=str(stop_exc))
        raise BrokerUnavailableError(f"container {image} did not start ({exc})") from exc
    return broker


def _from_local_jars(timeout: float) -> KafkaBroker:
    return LocalKafka(startup_timeout=timeout).start()


def start_broker(*, external_timeout: float = 15.0, startup_timeout: float = 120.0) -> KafkaBroker:
    """Return a running broker from the first provider that works.

    *external_timeout* bounds the check of ``$KAFKA_BOOTSTRAP_SERVERS``;
    *startup_timeout* bounds starting a container or the local JVM. The caller
    owns the result and must ``stop()`` it.
    """
    providers: list[tuple[str, Callable[[], KafkaBroker]]] = [
        (f"${ENV_BOOTSTRAP_SERVERS}", lambda: _from_env(external_timeout)),
        ("testcontainers", lambda: _from_testcontainers(startup_timeout)),
        ("LocalKafka (Maven jars)", lambda: _from_local_jars(startup_timeout)),
    ]
    failures: list[str] = []
    for name, provide in providers:
        try:
            broker = provide()
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if not isinstance(exc, BrokerUnavailableError):
                reason = f"{type(exc).__name__}: {reason}"
            _log.info("kafka.provider.unavailable", provider=name, reason=reason.splitlines()[0])
            failures.append(f"- {name}: {reason}")
            continue
        _log.info(
            "kafka.provider.selected",
            provider=name,
            bootstrap_servers=broker.bootstrap_servers,
            skipped=len(failures),
        )
        return broker
    raise BrokerUnavailableError(
        "no real Kafka broker could be had; providers tried, in order:\n" + "\n".join(failures)
    )
