"""The processed-ID store: what has been decided, per partition, durably."""

from dedupe_consumer.store.base import (
    EPOCH,
    RECORDED_AS,
    IdRecord,
    ProcessedStore,
    RecordStatus,
    WriteSet,
)
from dedupe_consumer.store.changelog import Changelog, NotOwnerError, changelog_topic
from dedupe_consumer.store.rocks import RocksStore

__all__ = [
    "EPOCH",
    "RECORDED_AS",
    "Changelog",
    "IdRecord",
    "NotOwnerError",
    "ProcessedStore",
    "RecordStatus",
    "RocksStore",
    "WriteSet",
    "changelog_topic",
]
