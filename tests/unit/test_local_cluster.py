"""``LocalKafkaCluster.start`` without JVMs: the nodes' process handling is faked, the
cluster's own bookkeeping is real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer.testing import BrokerUnavailableError, LocalKafkaCluster

NODE = "dedupe_consumer.testing._local_cluster._ClusterNode"


class _Process:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


def _fake_nodes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dies: int) -> list[Any]:
    """Nodes that "start" at once; node ``dies`` exits just after it served metadata."""
    stopped: list[Any] = []

    def begin(self: Any) -> str:
        self._workdir = tmp_path / f"node-{self.node_id}"
        self._workdir.mkdir()
        return "java"

    def prepare(self: Any, java: str) -> None:
        self._port = self._requested_port
        self._cluster_id = self._requested_cluster_id or "cluster"

    def spawn(self: Any, java: str) -> None:
        self._process = _Process(1000 + self.node_id)

    def await_ready(self: Any, timeout: float | None = None) -> None:
        if self.node_id == dies:
            assert self._process is not None
            self._process.returncode = 1

    def stop_process(self: Any, *, graceful: bool = True, timeout: float = 0) -> None:
        stopped.append(self.node_id)
        self._process = None

    monkeypatch.setattr("dedupe_consumer.testing._local_cluster._java_executable", lambda: "java")
    monkeypatch.setattr(f"{NODE}._begin", begin)
    monkeypatch.setattr(f"{NODE}._prepare", prepare)
    monkeypatch.setattr(f"{NODE}._spawn", spawn)
    monkeypatch.setattr(f"{NODE}._await_ready", await_ready)
    monkeypatch.setattr(f"{NODE}.stop_process", stop_process)
    monkeypatch.setattr(f"{NODE}.log_tail", lambda self: f"(node {self.node_id}'s log)")
    return stopped


def test_a_node_that_dies_during_start_fails_the_start_and_stops_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Node 3 served metadata, then exited: the two live nodes are registered brokers,
    but a "three-node cluster" of two must not be handed to a test (its replication
    factor 3 topics could not be created, a fault test would kill one of two)."""
    stopped = _fake_nodes(monkeypatch, tmp_path, dies=3)
    monkeypatch.setattr(LocalKafkaCluster, "registered_brokers", lambda self: {1, 2})
    cluster = LocalKafkaCluster(3, startup_timeout=2)
    try:
        with pytest.raises(BrokerUnavailableError, match=r"node 3") as info:
            cluster.start()
    finally:
        cluster.stop()  # idempotent; while the fakes are in place
    assert "(node 3's log)" in str(info.value)
    assert sorted(set(stopped)) == [1, 2, 3]
    assert cluster.nodes == ()
    assert not any(tmp_path.iterdir()), "the nodes' directories were left behind"
