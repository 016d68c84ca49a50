"""Recorded topics: record a topic to a file, replay it through the same engine.

What a test author needs:

* :func:`record_topic` (``dedupe-consumer record``) writes a recording and
  returns a :class:`RecordSummary`;
* :func:`replay_recording` (``dedupe-consumer replay --handler``) runs it
  through the real consumer loop and engine with no broker, and returns a
  :class:`ReplayReport` (its :class:`LostEvent` entries name what went missing);
* :func:`read_recording` loads a recording (:class:`Recording`, a list of
  :class:`Record`), and :class:`Record` builds messages by hand; a
  :class:`ReplaySource` feeds records to a ``DedupeConsumer``;
* :func:`produce_recording` (``dedupe-consumer replay --to-topic``) sends it
  back to a topic, for integration tests of a real consumer, and returns a
  :class:`ProduceSummary`;
* :func:`edges` feeds records to a :class:`~dedupe_consumer.DedupeConsumer` you
  build yourself (what :func:`replay_recording` does).

The file format is specified in ``docs/recording-format.md``; its reader and
writer live in :mod:`dedupe_consumer.replay.format`.
"""

from dedupe_consumer.replay.format import Recording, RecordingError, read_recording
from dedupe_consumer.replay.harness import replay_recording
from dedupe_consumer.replay.producer import ProduceError, ProduceSummary, produce_recording
from dedupe_consumer.replay.recorder import RecordSummary, record_topic
from dedupe_consumer.replay.records import Record
from dedupe_consumer.replay.report import LostEvent, ReplayReport
from dedupe_consumer.replay.source import ReplaySource
from dedupe_consumer.replay.wiring import edges

__all__ = [
    "LostEvent",
    "ProduceError",
    "ProduceSummary",
    "Record",
    "RecordSummary",
    "Recording",
    "RecordingError",
    "ReplayReport",
    "ReplaySource",
    "edges",
    "produce_recording",
    "read_recording",
    "record_topic",
    "replay_recording",
]
