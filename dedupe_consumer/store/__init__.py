"""The processed-ID store: what has been decided, per partition, durably."""

from dedupe_consumer.store.base import (
    EPOCH,
    ProcessedStore,
    StateChangelog,
    Status,
    StoredDecision,
    WriteSet,
)
from dedupe_consumer.store.changelog_codec import changelog_topic
from dedupe_consumer.store.rocks import RocksStore

__all__ = [
    "EPOCH",
    "ProcessedStore",
    "RocksStore",
    "StateChangelog",
    "Status",
    "StoredDecision",
    "WriteSet",
    "changelog_topic",
]
