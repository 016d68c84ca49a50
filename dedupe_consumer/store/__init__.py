"""The processed-ID store: what has been decided, per partition, durably."""

from dedupe_consumer.store.base import (
    EPOCH,
    RECORDED_AS,
    IdRecord,
    Output,
    ProcessedStore,
    RecordStatus,
    Response,
    StateChangelog,
    WriteSet,
)
from dedupe_consumer.store.changelog_codec import changelog_topic
from dedupe_consumer.store.rocks import RocksStore

__all__ = [
    "EPOCH",
    "RECORDED_AS",
    "IdRecord",
    "Output",
    "ProcessedStore",
    "RecordStatus",
    "Response",
    "RocksStore",
    "StateChangelog",
    "WriteSet",
    "changelog_topic",
]
