"""Recorded topics: record a topic to a file, replay it through the same engine.

* :func:`record_topic` (``dedupe-consumer record``) writes a recording;
* :func:`replay_recording` (``dedupe-consumer replay --handler``) runs it
  through the real consumer loop and engine with no broker, and returns a
  :class:`ReplayReport`;
* :func:`produce_recording` (``dedupe-consumer replay --to-topic``) sends it
  back to a topic, for integration tests of a real consumer;
* :func:`edges` feeds records to a :class:`~dedupe_consumer.DedupeConsumer` you
  build yourself (what :func:`replay_recording` does).

The file format is specified in ``docs/recording-format.md``.
"""

from dedupe_consumer.replay.format import (
    FORMAT_VERSION,
    Recording,
    RecordingError,
    RecordingHeader,
    RecordingReader,
    RecordingWriter,
    read_recording,
)
from dedupe_consumer.replay.harness import replay_recording
from dedupe_consumer.replay.producer import ProduceError, produce_recording
from dedupe_consumer.replay.recorder import record_topic
from dedupe_consumer.replay.records import Record
from dedupe_consumer.replay.report import LostEvent, ReplayReport
from dedupe_consumer.replay.source import ReplaySource
from dedupe_consumer.replay.wiring import edges

__all__ = [
    "FORMAT_VERSION",
    "LostEvent",
    "ProduceError",
    "Record",
    "Recording",
    "RecordingError",
    "RecordingHeader",
    "RecordingReader",
    "RecordingWriter",
    "ReplayReport",
    "ReplaySource",
    "edges",
    "produce_recording",
    "read_recording",
    "record_topic",
    "replay_recording",
]
