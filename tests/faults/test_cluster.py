"""Broker faults on a real three-node cluster (issue 17), short: one fault per mode.

``bench/broker_faults.py`` runs every fault in every mode with 50k events; here the
``kafka_cluster`` fixture's three KRaft nodes (replication factor 3,
``min.insync.replicas`` 2) take one SIGKILLed partition leader in plain mode, one
SIGKILLed active controller with claim+reconcile, and one SIGKILLed leader with
transactional effects, while a real consumer process works through 2,000 events.
Nothing may be lost; repeated effects only in plain mode, within its bound.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AdminClient,
    ConfigResource,
    ResourceType,
)
from confluent_kafka.cimpl import NewTopic

from dedupe_consumer import Settings
from dedupe_consumer.kafka.topics import ensure_dead_letter_topic
from dedupe_consumer.store.changelog_codec import changelog_topic
from dedupe_consumer.testing import LocalKafkaCluster

from .cluster_suite import CLUSTER_MODES, Fault, run_broker_fault

pytestmark = pytest.mark.kafka

EVENTS = 2_000
BATCH = 200


def _topics(cluster: LocalKafkaCluster) -> Any:
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    return admin.list_topics(timeout=10).topics


def test_three_nodes_replicate_and_name_their_leaders(kafka_cluster: LocalKafkaCluster) -> None:
    """All three registered; a topic gets three replicas by default; the active
    controller found in the quorum-state files is the node whose log says it won."""
    assert kafka_cluster.registered_brokers() == {1, 2, 3}
    admin = AdminClient({"bootstrap.servers": kafka_cluster.bootstrap_servers})
    admin.create_topics([NewTopic("cluster-probe", 3)])["cluster-probe"].result(timeout=30)
    kafka_cluster.wait_fully_replicated(60)
    partitions = _topics(kafka_cluster)["cluster-probe"].partitions
    assert {len(p.replicas) for p in partitions.values()} == {3}
    assert kafka_cluster.leader("cluster-probe", 0) == partitions[0].leader

    # Acknowledged writes need two of the three copies: one node may die.
    broker = ConfigResource(ResourceType.BROKER, "1")
    configs = admin.describe_configs([broker])[broker].result(timeout=30)
    assert configs["min.insync.replicas"].value == "2"
    assert configs["transaction.state.log.min.isr"].value == "2"

    controller = kafka_cluster.active_controller()
    epoch, leader = kafka_cluster.quorum_states()[controller]
    assert leader == controller
    log = kafka_cluster.node(controller).log_file
    assert log is not None
    won = re.findall(
        rf"\[RaftManager id={controller}\] Completed transition to Leader\(.*?\bepoch=(\d+)",
        log.read_text(),
    )
    assert epoch in map(int, won), (epoch, won)


CASES: list[tuple[str, Fault]] = [
    ("plain", "leader"),
    ("claim+reconcile", "controller"),
    ("transactional", "leader"),
]


@pytest.mark.parametrize(("mode_name", "fault"), CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_a_broker_fault_loses_nothing_and_repeats_nothing_outside_plain_mode(
    kafka_cluster: LocalKafkaCluster, tmp_path: Path, mode_name: str, fault: Fault
) -> None:
    [mode] = [m for m in CLUSTER_MODES if m.name == mode_name]
    before = kafka_cluster.active_controller() if fault == "controller" else None
    result = run_broker_fault(
        kafka_cluster,
        tmp_path,
        mode,
        fault,
        events=EVENTS,
        duplicates=0.1,
        seed=sum(map(ord, mode_name)),
        batch=BATCH,
        rate=1000,
        timeout_s=150,
        down_s=3,
    )
    out = result.outcome
    print(result.row(mode, BATCH))
    assert result.nodes_stopped == 1 and result.killed_node in (1, 2, 3)
    if fault == "controller":
        assert result.killed_node == before
        assert kafka_cluster.active_controller() != before  # a new one was elected
    assert out.lost == [], f"{len(out.lost)} events lost: {out.notes}"
    assert result.consumer_exits == [], out.notes
    assert out.exit_codes == [0], "the consumer must stop cleanly on SIGTERM"
    assert result.extra_calls <= result.bound(mode, BATCH), out.duplicate_effects
    if mode.mode != "plain" or mode.transactional:
        assert out.duplicate_effects == {}
    # The library's own topics are replicated like the source: three copies each.
    topics = _topics(kafka_cluster)
    ours = [changelog_topic(f"{result.topic}-group", result.topic), f"{result.topic}.dlq"]
    for name in ours:
        assert {len(p.replicas) for p in topics[name].partitions.values()} == {3}, name


def test_a_topic_made_while_a_broker_is_down_still_gets_three_replicas(
    kafka_cluster: LocalKafkaCluster,
) -> None:
    """The metadata of a cluster with a SIGKILLed node lists two brokers; the library's
    topics must still get three replicas (KRaft places the third on the dead node, which
    copies it when it returns), not two for good."""
    source, dlq = f"rf-source-{uuid.uuid4().hex[:8]}", f"rf-dlq-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_cluster.bootstrap_servers})
    admin.create_topics([NewTopic(source, 2)])[source].result(timeout=30)
    kafka_cluster.wait_fully_replicated(60)
    down = 3
    kafka_cluster.node(down).stop_process(graceful=False)
    try:
        deadline = time.monotonic() + 30
        while down in kafka_cluster.registered_brokers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert down not in kafka_cluster.registered_brokers()
        settings = Settings.load(
            kafka={
                "bootstrap_servers": kafka_cluster.bootstrap_servers,
                "group_id": f"{source}-group",
                "topics": [source],
            },
            processing={"dead_letter_topic": dlq},
        )
        ensure_dead_letter_topic(settings, 30)
    finally:
        kafka_cluster.node(down).start_process()
        kafka_cluster.wait_until_registered(120)
    kafka_cluster.wait_fully_replicated(120)
    partitions = _topics(kafka_cluster)[dlq].partitions
    assert {len(p.replicas) for p in partitions.values()} == {3}, partitions
