"""A single-node Apache Kafka broker run from Maven Central jars, for tests.

Why this exists: the machines this project is developed and tested on have
Java and Maven Central but no Docker engine, and the invariants the framework
promises (commit after persist, transactional offsets, consumer-group
rebalances) can only be tested honestly against a real broker. librdkafka's
mock cluster is not one: it has no CreateTopics, caps partitions at 5 MiB and
does not store transactional offsets.

So we do what ``bin/kafka-storage.sh`` and ``bin/kafka-server-start.sh`` from
the Kafka distribution do, without the distribution: take the jars that
:mod:`dedupe_consumer.testing._maven` resolved, format a fresh KRaft log
directory with ``kafka.tools.StorageTool`` and start ``kafka.Kafka
server.properties`` in combined broker+controller mode on free loopback ports;
wait until it serves metadata; stop its whole process group.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Self

import structlog

from dedupe_consumer.kafka.logs import kafka_log_config
from dedupe_consumer.testing._errors import TAIL_CHARS, BrokerUnavailableError, output_tail
from dedupe_consumer.testing._lifecycle import Lifecycle
from dedupe_consumer.testing._maven import resolve_kafka_libs

__all__ = ["LocalKafka", "probe_bootstrap"]

_FORMAT_TIMEOUT_S: Final = 120.0
_STOP_GRACE_S: Final = 20.0

_log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------- #
# Readiness probing
# --------------------------------------------------------------------------- #


def _tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _split_host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def probe_bootstrap(
    bootstrap_servers: str,
    timeout: float,
    *,
    alive: Callable[[], str | None] | None = None,
) -> None:
    """Wait until a Kafka AdminClient gets cluster metadata from *bootstrap_servers*.

    A TCP connect is tried first because an AdminClient created while nothing
    listens backs off exponentially between reconnects (and logs every
    refusal), which would make a freshly started broker look slow. *alive*
    returns a reason string when the thing being waited for is known to be
    dead, so we fail at once instead of at the deadline.

    Raises BrokerUnavailableError with the last error seen on timeout.
    """
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    addresses = [a for a in (_split_host_port(x) for x in bootstrap_servers.split(",")) if a]
    admin: Any = None
    last_error = "no attempt made"
    while True:
        if alive is not None:
            dead = alive()
            if dead is not None:
                raise BrokerUnavailableError(dead)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BrokerUnavailableError(
                f"Kafka at {bootstrap_servers} did not answer within {timeout:.0f} s "
                f"(last error: {last_error})"
            )
        if addresses and not any(_tcp_open(h, p, min(0.5, remaining)) for h, p in addresses):
            last_error = "connection refused / no listener"
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            continue
        if admin is None:
            admin = AdminClient(
                {
                    "bootstrap.servers": bootstrap_servers,
                    # Quiet: refusals during start-up are expected, not news.
                    "log_level": 0,
                    **kafka_log_config(),
                    "reconnect.backoff.ms": 100,
                    "reconnect.backoff.max.ms": 500,
                    "socket.connection.setup.timeout.ms": 5000,
                }
            )
        try:
            metadata = admin.list_topics(timeout=max(0.5, min(5.0, remaining)))
        except Exception as exc:  # KafkaException; keep the reason for the message
            last_error = f"{type(exc).__name__}: {exc}"
            continue
        if metadata.brokers:
            return
        last_error = "metadata response listed no brokers"
        time.sleep(0.2)


# --------------------------------------------------------------------------- #
# The broker process
# --------------------------------------------------------------------------- #


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _new_cluster_id() -> str:
    """16 random bytes, base64url without padding: what ``kafka-storage random-uuid`` prints.

    Like Kafka's ``Uuid.randomUuid``, never one that starts with ``-``: the storage
    tool's argument parser would take it for an option (1 start in 64 failed).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):
            return cluster_id


def _java_executable() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file():
            return str(candidate)
    java = shutil.which("java")
    if java is None:
        raise BrokerUnavailableError("java is not on PATH (and $JAVA_HOME has no bin/java)")
    return java


def _read_tail(path: Path, limit: int = TAIL_CHARS) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


_PR_SET_PDEATHSIG: Final = 1


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the broker when its parent dies.

    atexit and ``stop()`` cover every orderly exit; this covers the rest (the
    test runner SIGKILLed by a CI timeout), so no JVM outlives it. Linux ties
    the signal to the *thread* that forked, so it is only used from the main
    thread: a broker started from a short-lived worker thread would otherwise
    be killed when that thread ends.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


class LocalKafka(Lifecycle):
    """Single-node Apache Kafka (KRaft, combined broker+controller) from Maven jars.

    ``start()`` resolves the jars (cached), formats a fresh log directory in a
    temporary working directory and starts the JVM in its own process group on
    free ``127.0.0.1`` ports; ``stop()`` ends the whole process group and
    removes the working directory. ``stop_process()`` / ``start_process()``
    (and ``restart()``) stop and start the JVM but keep its data and ports, for
    tests of "the broker went away mid-run".

    Usable as a context manager; an atexit hook stops a broker that a test
    forgot to stop.
    """

    def __init__(
        self,
        *,
        extra_properties: Mapping[str, str] | None = None,
        port: int | None = None,
        startup_timeout: float = 120.0,
        maven_artifact: str | None = None,
        cache_dir: Path | str | None = None,
        heap_min: str = "256m",
        heap_max: str = "768m",
        extra_listeners: Mapping[str, str] | None = None,
    ) -> None:
        self._extra_properties = dict(extra_properties or {})
        self._extra_listeners = dict(extra_listeners or {})
        """Listener name → security protocol, each on its own free port (``listener_address``);
        their settings (SASL, TLS, ACLs) come in ``extra_properties``."""
        self._listener_ports: dict[str, int] = {}
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._maven_artifact = maven_artifact
        self._cache_dir = cache_dir
        self._heap = (heap_min, heap_max)
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._libs: Path | None = None
        self._port: int | None = None
        self._controller_port: int | None = None
        self._cluster_id: str | None = None
        # One node of a LocalKafkaCluster sets these (see _ClusterNode); alone, node 1
        # is its own quorum and every internal topic has one replica.
        self._node_id = 1
        self._requested_controller_port: int | None = None
        self._requested_cluster_id: str | None = None
        self._voters: str | None = None
        self._replicas = 1

    # -- properties ---------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:<port>``; stable across ``restart()``."""
        if self._port is None:
            raise RuntimeError("LocalKafka has not been started")
        return f"127.0.0.1:{self._port}"

    def listener_address(self, name: str) -> str:
        """``127.0.0.1:<port>`` of one of the ``extra_listeners``; stable across ``restart()``."""
        if name not in self._listener_ports:
            raise RuntimeError(f"LocalKafka has no started listener {name!r}")
        return f"127.0.0.1:{self._listener_ports[name]}"

    @property
    def pid(self) -> int | None:
        """PID of the running JVM (also its process-group id), None when stopped."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    @property
    def workdir(self) -> Path | None:
        """Temporary directory with server.properties, data/ and logs/; None once stopped."""
        return self._workdir

    @property
    def log_file(self) -> Path | None:
        """The broker's log4j2 log; read it when a test wonders what the broker did."""
        return None if self._workdir is None else self._workdir / "logs" / "broker.log"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> Self:
        """Resolve jars, format storage, start the JVM and wait until it serves metadata."""
        with self._lock:
            if self._workdir is not None:
                raise RuntimeError("LocalKafka is already started")
            started = time.monotonic()
            java = self._begin()
            try:
                self._prepare(java)
                self._launch(java)
            except BaseException:
                self.stop()
                raise
            _log.info(
                "kafka.local.started",
                bootstrap_servers=self.bootstrap_servers,
                pid=self.pid,
                workdir=str(self._workdir),
                seconds=round(time.monotonic() - started, 2),
            )
            return self

    def _begin(self) -> str:
        """Resolve the jars, make the working directory, register the atexit stop;
        returns the java executable."""
        self._libs = resolve_kafka_libs(self._maven_artifact, self._cache_dir)
        java = _java_executable()
        self._workdir = Path(tempfile.mkdtemp(prefix="dedupe-kafka-"))
        self._stop_at_exit()
        return java

    def _prepare(self, java: str) -> None:
        """Ports, cluster ID, ``server.properties`` and formatted storage in the workdir."""
        assert self._workdir is not None
        self._port = self._requested_port or _free_port()
        self._controller_port = self._requested_controller_port or _free_port()
        while self._controller_port == self._port:
            self._controller_port = _free_port()
        taken = {self._port, self._controller_port}
        for name in self._extra_listeners:
            port = _free_port()
            while port in taken:
                port = _free_port()
            taken.add(port)
            self._listener_ports[name] = port
        self._cluster_id = self._requested_cluster_id or _new_cluster_id()
        self._write_config()
        self._format_storage(java)

    def stop_process(self, *, graceful: bool = True, timeout: float = _STOP_GRACE_S) -> None:
        """Stop the JVM but keep data and ports, so ``start_process()`` can bring it back.

        *graceful* sends SIGTERM (a controlled shutdown, as a rolling restart
        would) and escalates to SIGKILL after *timeout*; ``graceful=False``
        SIGKILLs at once, like a crashed machine, leaving log recovery to the
        next start.
        """
        with self._lock:
            process = self._process
            if process is None:
                return
            pgid = process.pid  # start_new_session made the JVM its group's leader
            if process.poll() is None:
                _signal_group(pgid, signal.SIGTERM if graceful else signal.SIGKILL)
                try:
                    process.wait(timeout=timeout if graceful else 10.0)
                except subprocess.TimeoutExpired:
                    _log.warning("kafka.local.sigkill", pid=pgid, after_seconds=timeout)
                    _signal_group(pgid, signal.SIGKILL)
                    process.wait(timeout=30.0)
            # The leader is gone; a stray member of its group (none expected)
            # must not survive either.
            _signal_group(pgid, signal.SIGKILL)
            self._process = None
            _log.info("kafka.local.process_stopped", pid=pgid, exit_code=process.returncode)

    def start_process(self, timeout: float | None = None) -> None:
        """Start the JVM again on the same ports and data after ``stop_process()``."""
        with self._lock:
            if self._workdir is None:
                raise RuntimeError("LocalKafka was never started (or fully stopped); use start()")
            if self.is_running:
                return
            self._launch(_java_executable(), timeout=timeout)

    def restart(self, *, graceful: bool = True) -> None:
        """``stop_process()`` then ``start_process()``: same address, same data."""
        self.stop_process(graceful=graceful)
        self.start_process()

    def stop(self) -> None:
        """Stop the JVM (whole process group) and delete the working directory. Idempotent."""
        with self._lock:
            self.stop_process()
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            self._forget_stop_at_exit()

    _repr_name = "LocalKafka"

    @property
    def _started(self) -> bool:
        return self._workdir is not None

    def _repr_details(self) -> str:
        address = f"127.0.0.1:{self._port}" if self._port else "not started"
        return f"{address}, pid={self.pid}"

    # -- internals ----------------------------------------------------------

    def _properties(self) -> dict[str, str]:
        """This node's ``server.properties``: the one place a node's configuration is made.

        Alone (the default) node 1 is broker, controller and the whole quorum, and
        every internal topic has one replica. As one of a :class:`LocalKafkaCluster`'s
        nodes it has its own id, the cluster's static voters, and the cluster's
        replication: ``default.replication.factor`` and the internal topics at the
        node count, ``min.insync.replicas`` one less (at least 1).
        """
        assert self._workdir is not None
        data = self._workdir / "data"
        voters = self._voters or f"{self._node_id}@127.0.0.1:{self._controller_port}"
        extra = {name: f"127.0.0.1:{port}" for name, port in self._listener_ports.items()}
        properties: dict[str, str] = {
            "node.id": str(self._node_id),
            "process.roles": "broker,controller",
            "listeners": ",".join(
                [
                    f"PLAINTEXT://127.0.0.1:{self._port}",
                    f"CONTROLLER://127.0.0.1:{self._controller_port}",
                    *(f"{name}://{address}" for name, address in extra.items()),
                ]
            ),
            "advertised.listeners": ",".join(
                [f"PLAINTEXT://127.0.0.1:{self._port}"]
                + [f"{name}://{address}" for name, address in extra.items()]
            ),
            "listener.security.protocol.map": ",".join(
                ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
                + [f"{name}:{protocol}" for name, protocol in self._extra_listeners.items()]
            ),
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            # Static voters: StorageTool then needs neither --standalone nor
            # --initial-controllers (those are for the dynamic quorum).
            "controller.quorum.voters": voters,
            "log.dirs": str(data),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After a SIGKILL the restarted node's registration is refused until
            # the dead incarnation's session expires (default 9 s); a shorter
            # session keeps "broker crashed and came back" tests quick.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "4000",
        }
        if self._replicas > 1:
            replicas, min_isr = str(self._replicas), str(max(1, self._replicas - 1))
            properties.update(
                {
                    "default.replication.factor": replicas,
                    "min.insync.replicas": min_isr,
                    "offsets.topic.replication.factor": replicas,
                    "transaction.state.log.replication.factor": replicas,
                    "transaction.state.log.min.isr": min_isr,
                    "share.coordinator.state.topic.replication.factor": replicas,
                    "share.coordinator.state.topic.min.isr": min_isr,
                }
            )
        properties.update(self._extra_properties)
        return properties

    def _write_config(self) -> None:
        assert self._workdir is not None
        logs = self._workdir / "logs"
        (self._workdir / "data").mkdir()
        logs.mkdir()
        properties = self._properties()
        (self._workdir / "server.properties").write_text(
            "".join(f"{key}={value}\n" for key, value in properties.items()), encoding="utf-8"
        )
        (self._workdir / "log4j2.properties").write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.file.type = File",
                    "appender.file.name = BrokerLog",
                    f"appender.file.fileName = {logs / 'broker.log'}",
                    "appender.file.layout.type = PatternLayout",
                    "appender.file.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = INFO",
                    "rootLogger.appenderRef.file.ref = BrokerLog",
                    "logger.statechange.name = state.change.logger",
                    "logger.statechange.level = WARN",
                    "logger.request.name = kafka.request.logger",
                    "logger.request.level = WARN",
                    "",
                ]
            ),
            encoding="utf-8",
        )

    def _java_base(self, java: str) -> list[str]:
        assert self._workdir is not None and self._libs is not None
        return [
            java,
            f"-Dlog4j2.configurationFile={self._workdir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self._workdir / 'logs'}",
            "-Djava.awt.headless=true",
            "-cp",
            str(self._libs / "*"),  # the JVM expands the wildcard; no shell involved
        ]

    def _format_storage(self, java: str) -> None:
        assert self._workdir is not None and self._cluster_id is not None
        command = [
            *self._java_base(java),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self._cluster_id,
            "-c",
            str(self._workdir / "server.properties"),
        ]
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_FORMAT_TIMEOUT_S,
                check=False,
                cwd=self._workdir,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerUnavailableError(
                f"kafka.tools.StorageTool format did not finish in {_FORMAT_TIMEOUT_S:.0f} s"
            ) from exc
        if result.returncode != 0:
            raise BrokerUnavailableError(
                f"kafka.tools.StorageTool format failed (exit {result.returncode}):\n"
                f"{output_tail(result.stdout + result.stderr)}"
            )

    def _launch(self, java: str, timeout: float | None = None) -> None:
        self._spawn(java)
        self._await_ready(timeout)

    def _spawn(self, java: str) -> None:
        """Start the JVM in its own process group; does not wait for it to serve."""
        assert self._workdir is not None
        heap_min, heap_max = self._heap
        command = [
            *self._java_base(java),
            f"-Xms{heap_min}",
            f"-Xmx{heap_max}",
            "kafka.Kafka",
            str(self._workdir / "server.properties"),
        ]
        # stdout/stderr go to a file, not to the test's terminal, but are kept:
        # JVM-level failures (bad flags, OOM) show up there, not in broker.log.
        console = self._workdir / "logs" / "java-console.log"
        with console.open("ab") as out:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),  # noqa: PLW1509 - see the hook's docstring
            )

    def _await_ready(self, timeout: float | None = None) -> None:
        """Wait until the spawned JVM serves metadata; stop it and raise if it does not."""
        process = self._process
        assert process is not None

        def alive() -> str | None:
            code = process.poll()
            if code is None:
                return None
            return f"the Kafka broker exited during start-up (exit {code}).\n{self.log_tail()}"

        try:
            probe_bootstrap(
                self.bootstrap_servers,
                self._startup_timeout if timeout is None else timeout,
                alive=alive,
            )
        except BrokerUnavailableError as exc:
            tails = "" if process.poll() is not None else "\n" + self.log_tail()
            self.stop_process(graceful=False)
            raise BrokerUnavailableError(f"{exc}{tails}") from None

    def log_tail(self) -> str:
        """The last few KB of the broker log and JVM console, for error messages."""
        if self._workdir is None:
            return ""
        logs = self._workdir / "logs"
        parts = []
        for name in ("broker.log", "java-console.log"):
            text = _read_tail(logs / name)
            if text:
                parts.append(f"--- tail of {logs / name} ---\n{text}")
        return "\n".join(parts) or "(the broker wrote no log)"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
