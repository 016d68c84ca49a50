"""Review of issue 14: settings that cannot mean what they say should stop at load."""

from __future__ import annotations

from typing import Any

import pytest

from dedupe_consumer import Settings
from dedupe_consumer.errors import ConfigError

BASE: dict[str, Any] = {
    "kafka": {"bootstrap_servers": "x", "group_id": "g", "topics": ["t"]},
    "processing": {"dead_letter_topic": "dlq"},
}


def test_rev14_scope_partitions_without_topic_scope_is_refused() -> None:
    """``dedupe.scope_partitions`` only means something with ``dedupe.scope = "topic"``;
    with the default scope it is silently ignored (the user believes a by-id topic
    exists and IDs are deduplicated across partitions)."""
    with pytest.raises((ConfigError, ValueError), match="scope_partitions"):
        Settings.load(**BASE, dedupe={"scope_partitions": 8})


def test_rev14_partition_ordering_with_topic_scope_is_refused() -> None:
    """``processing.ordering = "partition"`` promises each partition strictly in order;
    topic scope reorders every partition by event ID (see
    test_rev14_topic_scope_keeps_partition_order_when_asked_to): the combination
    should stop at load naming both keys, or be documented as dropping the order."""
    with pytest.raises((ConfigError, ValueError), match="ordering"):
        Settings.load(
            kafka=BASE["kafka"],
            dedupe={"scope": "topic"},
            processing={"ordering": "partition", **BASE["processing"]},
        )
