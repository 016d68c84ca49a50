"""Recorded topics as a source: replay real traffic through the same engine."""

from dedupe_consumer.replay.records import Record
from dedupe_consumer.replay.source import ReplaySource

__all__ = ["Record", "ReplaySource"]
