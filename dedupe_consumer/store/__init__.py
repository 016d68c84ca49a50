"""The processed-ID store: what has been decided, per partition, durably."""

from dedupe_consumer.store.base import EPOCH, ProcessedStore, Status, StoredDecision, WriteSet
from dedupe_consumer.store.changelog import Changelog, NotOwnerError, changelog_topic
from dedupe_consumer.store.rocks import RocksStore

__all__ = [
    "EPOCH",
    "Changelog",
    "NotOwnerError",
    "ProcessedStore",
    "RocksStore",
    "Status",
    "StoredDecision",
    "WriteSet",
    "changelog_topic",
]
