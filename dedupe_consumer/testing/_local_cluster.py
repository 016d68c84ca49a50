"""A multi-node Apache Kafka cluster (KRaft) from Maven jars, for broker-fault tests.

Each node is a :class:`~dedupe_consumer.testing._local_kafka.LocalKafka` (same
jars, same process handling) configured as one of ``n`` combined
broker+controller nodes: its own node id, data directory and loopback ports,
the same cluster ID, and the static quorum ``1@..,2@..,3@..``. Topics get the
node count as replication factor and ``min.insync.replicas`` one less, so
with three nodes one may die and ``acks=all`` writes still succeed.

Which node is the active controller is not something a client can ask: in KRaft
mode a DescribeCluster answer names a random live broker as "controller", and
librdkafka has no DescribeQuorum. Every voter writes the quorum's leader and
epoch to ``__cluster_metadata-0/quorum-state`` in its log directory on each
election, so the leader is the one named at the highest epoch there
(:meth:`LocalKafkaCluster.active_controller`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Self

import structlog

from dedupe_consumer.kafka.logs import kafka_log_config
from dedupe_consumer.testing._errors import BrokerUnavailableError
from dedupe_consumer.testing._lifecycle import Lifecycle
from dedupe_consumer.testing._local_kafka import LocalKafka, _free_port, _java_executable

__all__ = ["LocalKafkaCluster"]

_log = structlog.get_logger(__name__)

_QUORUM_STATE: Final = Path("data") / "__cluster_metadata-0" / "quorum-state"


class _ClusterNode(LocalKafka):
    """One node of a :class:`LocalKafkaCluster`: id, ports, cluster ID and quorum given."""

    def __init__(
        self,
        node_id: int,
        *,
        port: int,
        controller_port: int,
        cluster_id: str,
        voters: str,
        replicas: int,
        extra_properties: Mapping[str, str] | None,
        startup_timeout: float,
        maven_artifact: str | None,
        cache_dir: Path | str | None,
        heap_min: str,
        heap_max: str,
    ) -> None:
        super().__init__(
            extra_properties=extra_properties,
            port=port,
            startup_timeout=startup_timeout,
            maven_artifact=maven_artifact,
            cache_dir=cache_dir,
            heap_min=heap_min,
            heap_max=heap_max,
        )
        self._node_id = node_id
        self._requested_controller_port = controller_port
        self._requested_cluster_id = cluster_id
        self._voters = voters
        self._replicas = replicas

    @property
    def node_id(self) -> int:
        return self._node_id

    def _repr_details(self) -> str:
        return f"node {self._node_id}, 127.0.0.1:{self._port}, pid={self.pid}"


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


class LocalKafkaCluster(Lifecycle):
    """``brokers`` Apache Kafka nodes (KRaft, each broker+controller) from Maven jars.

    ``start()`` formats and starts every node and waits until all of them are
    registered brokers; ``stop()`` stops them and removes their directories. The
    nodes (:attr:`nodes`, :meth:`node`) are :class:`LocalKafka` objects:
    ``stop_process(graceful=False)`` is a SIGKILL, ``start_process()`` brings a
    node back on the same ports and data. :meth:`leader` and
    :meth:`active_controller` say whom to kill; :meth:`rolling_restart` restarts
    every node in turn, each after the cluster is fully replicated again.

    Replication: ``default.replication.factor`` and the offsets and transaction
    state topics at ``brokers`` (at most 3), ``min.insync.replicas`` one less.
    """

    def __init__(
        self,
        brokers: int = 3,
        *,
        extra_properties: Mapping[str, str] | None = None,
        startup_timeout: float = 180.0,
        maven_artifact: str | None = None,
        cache_dir: Path | str | None = None,
        heap_min: str = "256m",
        heap_max: str = "512m",
    ) -> None:
        if not 1 <= brokers <= 9:
            raise ValueError(f"brokers must be 1..9, not {brokers}")
        self._count = brokers
        self._extra_properties = dict(extra_properties or {})
        self._startup_timeout = startup_timeout
        self._maven_artifact = maven_artifact
        self._cache_dir = cache_dir
        self._heap = (heap_min, heap_max)
        self._nodes: list[_ClusterNode] = []
        self._lock = threading.RLock()
        self._admin: Any = None

    # -- properties ---------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """Every node's address, comma-separated; stable across node restarts."""
        if not self._nodes:
            raise RuntimeError("LocalKafkaCluster has not been started")
        return ",".join(node.bootstrap_servers for node in self._nodes)

    @property
    def nodes(self) -> tuple[LocalKafka, ...]:
        """The nodes, in node-id order (node ``i`` is ``nodes[i - 1]``)."""
        return tuple(self._nodes)

    @property
    def replication_factor(self) -> int:
        """The replication factor of topics created with the broker default."""
        return min(3, self._count)

    def node(self, node_id: int) -> LocalKafka:
        """The node with this ``node.id`` (1-based)."""
        if not 1 <= node_id <= len(self._nodes):
            raise KeyError(f"no node {node_id} (the cluster has {len(self._nodes)})")
        return self._nodes[node_id - 1]

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> Self:
        """Format and start every node; wait until each is a registered broker."""
        with self._lock:
            if self._nodes:
                raise RuntimeError("LocalKafkaCluster is already started")
            started = time.monotonic()
            java = _java_executable()
            ports = _distinct_free_ports(2 * self._count)
            client_ports, controller_ports = ports[: self._count], ports[self._count :]
            voters = ",".join(
                f"{i + 1}@127.0.0.1:{port}" for i, port in enumerate(controller_ports)
            )
            replicas = min(3, self._count)
            # One cluster ID for all: the first node makes it (as LocalKafka does).
            cluster_id: str | None = None
            self._stop_at_exit()
            try:
                for i in range(self._count):
                    node = _ClusterNode(
                        i + 1,
                        port=client_ports[i],
                        controller_port=controller_ports[i],
                        cluster_id=cluster_id or "",
                        voters=voters,
                        replicas=replicas,
                        extra_properties=self._extra_properties,
                        startup_timeout=self._startup_timeout,
                        maven_artifact=self._maven_artifact,
                        cache_dir=self._cache_dir,
                        heap_min=self._heap[0],
                        heap_max=self._heap[1],
                    )
                    self._nodes.append(node)
                    node._begin()
                    node._prepare(java)
                    cluster_id = node._cluster_id
                # A node serves metadata only once a quorum elected a controller, so
                # all are spawned before any is waited for.
                for node in self._nodes:
                    node._spawn(java)
                for node in self._nodes:
                    node._await_ready(self._startup_timeout)
                self.wait_until_registered(self._startup_timeout)
                # wait_until_registered wants the running nodes only: one that served
                # metadata and died since would leave a cluster of fewer nodes.
                for node in self._nodes:
                    if not node.is_running:
                        raise BrokerUnavailableError(
                            f"node {node.node_id} exited during the cluster's start-up.\n"
                            f"{node.log_tail()}"
                        )
            except BaseException:
                self.stop()
                raise
            _log.info(
                "kafka.cluster.started",
                bootstrap_servers=self.bootstrap_servers,
                brokers=self._count,
                seconds=round(time.monotonic() - started, 2),
            )
            return self

    def stop(self) -> None:
        """Stop every node and delete its directory. Idempotent.

        The nodes are SIGKILLed: their data is deleted anyway, and one by one a graceful
        stop would hang in the last nodes' controlled shutdown once the quorum is gone.
        """
        with self._lock:
            for node in self._nodes:
                node.stop_process(graceful=False)
            for node in self._nodes:
                node.stop()
            self._nodes = []
            self._admin = None
            self._forget_stop_at_exit()

    def restart_node(self, node_id: int, *, graceful: bool = True) -> None:
        """Stop one node (SIGTERM, or SIGKILL with ``graceful=False``) and start it again;
        returns once it is a registered broker again."""
        node = self.node(node_id)
        node.stop_process(graceful=graceful)
        node.start_process()
        self.wait_until_registered()

    def rolling_restart(self, *, graceful: bool = True, timeout: float = 180.0) -> None:
        """Restart every node in turn, as an operator would: each one only after every
        partition is back in full sync (no under-replicated partition)."""
        for node in self._nodes:
            self.wait_fully_replicated(timeout)
            self.restart_node(node.node_id, graceful=graceful)
        self.wait_fully_replicated(timeout)

    _repr_name = "LocalKafkaCluster"

    @property
    def _started(self) -> bool:
        return bool(self._nodes)

    def _repr_details(self) -> str:
        return ", ".join(map(repr, self._nodes)) or "not started"

    # -- what the cluster looks like ----------------------------------------

    def _admin_client(self) -> Any:
        from confluent_kafka.admin import AdminClient

        if self._admin is None:
            self._admin = AdminClient(
                {
                    "bootstrap.servers": self.bootstrap_servers,
                    "reconnect.backoff.max.ms": 500,
                    "log_level": 0,  # refusals from a stopped node are expected
                    **kafka_log_config(),
                }
            )
        return self._admin

    def _metadata(self) -> Any:
        return self._admin_client().list_topics(timeout=10)

    def registered_brokers(self) -> set[int]:
        """Node ids the cluster lists as (unfenced) brokers now."""
        return set(self._metadata().brokers)

    def wait_until_registered(self, timeout: float = 120.0) -> None:
        """Wait until every running node is a registered broker."""
        deadline = time.monotonic() + timeout
        last: set[int] = set()
        while True:
            wanted = {node.node_id for node in self._nodes if node.is_running}
            try:
                last = self.registered_brokers()
                if wanted <= last:
                    return
            except Exception as exc:  # KafkaException: keep asking until the deadline
                _log.debug("kafka.cluster.metadata_failed", error=str(exc))
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(
                    f"nodes {sorted(wanted - last)} did not register as brokers within "
                    f"{timeout:.0f} s (registered: {sorted(last)})"
                )
            time.sleep(0.2)

    def under_replicated(self) -> list[tuple[str, int]]:
        """Partitions whose in-sync replicas are fewer than their replicas."""
        return [
            (name, p)
            for name, topic in self._metadata().topics.items()
            for p, partition in topic.partitions.items()
            if len(partition.isrs) < len(partition.replicas) or partition.leader < 0
        ]

    def wait_fully_replicated(self, timeout: float = 180.0) -> None:
        """Wait until no partition is under-replicated or leaderless."""
        deadline = time.monotonic() + timeout
        lagging: list[tuple[str, int]] = []
        while True:
            try:
                lagging = self.under_replicated()
                if not lagging:
                    return
            except Exception as exc:  # KafkaException
                _log.debug("kafka.cluster.metadata_failed", error=str(exc))
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(
                    f"{len(lagging)} partition(s) still under-replicated after {timeout:.0f} s: "
                    f"{lagging[:5]}"
                )
            time.sleep(0.25)

    def leader(self, topic: str, partition: int, timeout: float = 30.0) -> int:
        """The node id leading ``topic``'s ``partition`` now (waits while it has none)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                # All topics: asking for one by name may auto-create it.
                found = self._metadata().topics.get(topic)
                if found is not None and partition in found.partitions:
                    leader = int(found.partitions[partition].leader)
                    if leader >= 0:
                        return leader
            except Exception as exc:  # KafkaException
                _log.debug("kafka.cluster.metadata_failed", error=str(exc))
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(
                    f"{topic}[{partition}] has no leader after {timeout} s"
                )
            time.sleep(0.2)

    def quorum_states(self) -> dict[int, tuple[int, int]]:
        """Each node's last written view of the quorum: ``{node: (epoch, leader)}``,
        ``leader`` -1 while that node knows of no leader in that epoch."""
        states: dict[int, tuple[int, int]] = {}
        for node in self._nodes:
            if node.workdir is None:
                continue
            try:
                state = json.loads((node.workdir / _QUORUM_STATE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not written yet, or being replaced
            states[node.node_id] = (int(state.get("leaderEpoch", -1)), int(state["leaderId"]))
        return states

    def active_controller(self, timeout: float = 30.0) -> int:
        """The node id of the active controller (the KRaft quorum's leader).

        The leader named at the highest epoch in the voters' ``quorum-state`` files,
        once that leader is running and a majority of the running voters agree on
        it; waits while an election is in progress.
        """
        deadline = time.monotonic() + timeout
        states: dict[int, tuple[int, int]] = {}
        while True:
            states = self.quorum_states()
            running = {node.node_id for node in self._nodes if node.is_running}
            live = {n: s for n, s in states.items() if n in running}
            if live:
                epoch = max(e for e, _ in live.values())
                leaders = {leader for e, leader in live.values() if e == epoch}
                # One leader named at the newest epoch, and alive: an election in
                # progress names -1, a killed leader is not running.
                if len(leaders) == 1 and (leader := leaders.pop()) in running:
                    return leader
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(
                    f"no active controller agreed on within {timeout} s (quorum states {states})"
                )
            time.sleep(0.2)
