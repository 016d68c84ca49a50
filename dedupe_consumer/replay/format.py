"""The recording format: JSON Lines, one header line, then one line per message.

The schema is specified (and versioned) in ``docs/recording-format.md``; this
module is its only implementation, so the recorder, the replay harness and the
re-producer cannot disagree about it.

Why JSON Lines and not Kafka's own bytes: a recording is test data that people
read in review, grep and sometimes write by hand. Keys, values and header
values are therefore stored as text when they are valid UTF-8 (the common
case) and only fall back to ``{"base64": ...}`` otherwise, which keeps every
byte exact without making the usual JSON payloads unreadable.

Two failure modes get precise errors because they are the ones that happen in
practice: a hand-edited line that is wrong (the error names the line) and a
``.gz`` file cut short by a full disk or a killed copy (the error says how
many lines were read before the stream ended). The writer itself never leaves
a half-written file under the final name: it writes ``<name>.partial`` and
renames it when the recording is complete.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BufferedReader, BufferedWriter
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeGuard

from dedupe_consumer.errors import DedupeError
from dedupe_consumer.models import SourceMessage, as_bytes, header_pairs
from dedupe_consumer.replay.records import (
    TIMESTAMP_CREATE_TIME,
    TIMESTAMP_LOG_APPEND_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    Record,
)

FORMAT_NAME: Final = "dedupe-consumer-recording"
FORMAT_VERSION: Final = 1
"""Bumped only when a reader of the old version would misread new files; adding
an optional field does not bump it (readers ignore fields they do not know)."""

_GZIP_MAGIC: Final = b"\x1f\x8b"
_TIMESTAMP_TYPES: Final = {
    TIMESTAMP_CREATE_TIME: "CreateTime",
    TIMESTAMP_LOG_APPEND_TIME: "LogAppendTime",
}
_TIMESTAMP_TYPE_CODES: Final = {name: code for code, name in _TIMESTAMP_TYPES.items()}

Encoded = str | dict[str, str] | None
"""A key, value or header value in a recording: text, ``{"base64": ...}`` or null."""


class RecordingError(DedupeError):
    """A recording cannot be read (or written); the message names the file and line."""

    def __init__(self, message: str, *, path: Path | None = None, line: int | None = None) -> None:
        where = f"{path}" if path is not None else "recording"
        if line is not None:
            where += f", line {line}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


# -- header ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordingHeader:
    """The first line of a recording: what was recorded, from where, and when."""

    topic: str
    partitions: int
    """Partition count of the source topic when it was recorded."""
    recorded_at: str
    """ISO-8601 UTC time the recording started."""
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    """Optional, informational fields (recorder, from, start/end offsets...)."""

    @classmethod
    def new(cls, topic: str, partitions: int, **extra: Any) -> RecordingHeader:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return cls(topic, partitions, now, FORMAT_VERSION, extra)

    def to_line(self) -> str:
        body: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": self.version,
            "topic": self.topic,
            "partitions": self.partitions,
            "recorded_at": self.recorded_at,
            **self.extra,
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n"

    @classmethod
    def parse(cls, obj: object, path: Path | None, line: int = 1) -> RecordingHeader:
        def bad(why: str) -> RecordingError:
            return RecordingError(why, path=path, line=line)

        if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
            raise bad(
                f"not a recording: the first line must be a header object with "
                f'"format": "{FORMAT_NAME}" (see docs/recording-format.md)'
            )
        version = obj.get("version")
        if not _is_int(version) or version < 1:
            raise bad(f'"version" must be a positive integer, got {version!r}')
        if version > FORMAT_VERSION:
            raise bad(
                f"recording format version {version} is newer than this dedupe-consumer "
                f"reads (up to {FORMAT_VERSION}); upgrade dedupe-consumer"
            )
        topic = obj.get("topic")
        if not isinstance(topic, str) or not topic:
            raise bad(f'"topic" must be a non-empty string, got {topic!r}')
        partitions = obj.get("partitions")
        if not _is_int(partitions) or partitions < 1:
            raise bad(f'"partitions" must be a positive integer, got {partitions!r}')
        recorded_at = obj.get("recorded_at")
        if not isinstance(recorded_at, str):
            raise bad(f'"recorded_at" must be an ISO-8601 string, got {recorded_at!r}')
        known = {"format", "version", "topic", "partitions", "recorded_at"}
        extra = {k: v for k, v in obj.items() if k not in known}
        return cls(topic, partitions, recorded_at, version, extra)


# -- bytes <-> JSON -------------------------------------------------------------------------


def encode_bytes(data: bytes | None) -> Encoded:
    """Text when ``data`` is valid UTF-8, else ``{"base64": ...}``; None stays null.

    Strict UTF-8 decoding round-trips exactly (it rejects overlong forms and
    encoded surrogates), so the text form loses no byte.
    """
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def decode_bytes(encoded: object, what: str) -> bytes | None:
    """Inverse of :func:`encode_bytes`; ``ValueError`` says what is wrong with ``what``."""
    if encoded is None:
        return None
    if isinstance(encoded, str):
        return encoded.encode("utf-8")
    if isinstance(encoded, dict) and set(encoded) == {"base64"}:
        text = encoded["base64"]
        if not isinstance(text, str):
            raise ValueError(f"{what}: base64 must be a string, got {text!r}")
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{what}: invalid base64 ({exc})") from None
    raise ValueError(
        f'{what}: expected a string (UTF-8 text), {{"base64": "..."}} or null, got {encoded!r}'
    )


def encode_message(message: SourceMessage) -> str:
    """One recording line (with its newline) for a consumed message."""
    kind, ms = message.timestamp()
    has_ts = kind != TIMESTAMP_NOT_AVAILABLE and ms >= 0
    body = {
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": ms if has_ts else None,
        "timestamp_type": _TIMESTAMP_TYPES.get(kind) if has_ts else None,
        "key": encode_bytes(as_bytes(message.key())),
        "value": encode_bytes(as_bytes(message.value())),
        "headers": [[name, encode_bytes(value)] for name, value in header_pairs(message)],
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n"


def decode_message(obj: object) -> Record:
    """A message line (already parsed from JSON) as a :class:`Record`; ``ValueError`` if bad."""
    if not isinstance(obj, dict):
        raise ValueError(f"a message line must be a JSON object, got {type(obj).__name__}")
    topic = obj.get("topic")
    if not isinstance(topic, str) or not topic:
        raise ValueError(f'"topic" must be a non-empty string, got {topic!r}')
    partition = obj.get("partition")
    if not _is_int(partition) or partition < 0:
        raise ValueError(f'"partition" must be an integer >= 0, got {partition!r}')
    offset = obj.get("offset")
    if not _is_int(offset) or offset < 0:
        raise ValueError(f'"offset" must be an integer >= 0, got {offset!r}')
    timestamp = obj.get("timestamp")
    if timestamp is not None and (not _is_int(timestamp) or timestamp < 0):
        raise ValueError(f'"timestamp" must be milliseconds >= 0 or null, got {timestamp!r}')
    kind_name = obj.get("timestamp_type") or "CreateTime"
    if kind_name not in _TIMESTAMP_TYPE_CODES:
        raise ValueError(
            f'"timestamp_type" must be "CreateTime", "LogAppendTime" or null, got {kind_name!r}'
        )
    raw_headers = obj.get("headers", [])
    if not isinstance(raw_headers, list):
        raise ValueError(f'"headers" must be a list of [name, value] pairs, got {raw_headers!r}')
    headers: list[tuple[str, str | bytes | None]] = []
    for n, pair in enumerate(raw_headers):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ValueError(f"headers[{n}] must be a [name, value] pair, got {pair!r}")
        headers.append((pair[0], decode_bytes(pair[1], f"headers[{n}] ({pair[0]!r})")))
    return Record(
        topic,
        partition,
        offset,
        decode_bytes(obj.get("key"), '"key"'),
        decode_bytes(obj.get("value"), '"value"'),
        headers,
        timestamp,
        _TIMESTAMP_TYPE_CODES[kind_name],
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# -- writing --------------------------------------------------------------------------------


def partial_path(path: Path) -> Path:
    """Where a recording is written until it is complete."""
    return path.with_name(path.name + ".partial")


class RecordingWriter:
    """Writes a recording; gzip when the name ends in ``.gz``.

    Lines go to ``<name>.partial``; :meth:`close` syncs and renames it, so a
    file under the final name is always a complete recording. Leaving the
    ``with`` block on an exception keeps the ``.partial`` file for inspection
    instead of passing it off as complete.
    """

    def __init__(self, path: str | Path, header: RecordingHeader) -> None:
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.header = header
        self.messages = 0
        try:
            self._raw: BufferedWriter = self.partial.open("wb")
        except OSError as exc:
            raise RecordingError(f"cannot write: {exc.strerror or exc}", path=self.path) from None
        self._out: gzip.GzipFile | BufferedWriter = (
            # mtime=0 and the final name: the same messages give the same bytes.
            gzip.GzipFile(filename=self.path.name, mode="wb", fileobj=self._raw, mtime=0)
            if self.path.name.endswith(".gz")
            else self._raw
        )
        self._out.write(header.to_line().encode("utf-8"))
        self._closed = False

    def write(self, message: SourceMessage) -> None:
        self._out.write(encode_message(message).encode("utf-8"))
        self.messages += 1

    def close(self) -> Path:
        """Finish the file and move it to its final name; returns that name."""
        if not self._closed:
            self._finish()
            os.replace(self.partial, self.path)
        return self.path

    def _finish(self) -> None:
        self._closed = True
        if self._out is not self._raw:
            self._out.close()  # writes the gzip trailer; leaves the raw file open
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._finish()  # keep <name>.partial: incomplete, and named so


# -- reading --------------------------------------------------------------------------------


class RecordingReader:
    """Streams a recording: ``header`` on open, then :class:`Record` s by iteration.

    Besides decoding, it checks what the replay relies on: one topic (the
    header's), partitions within the header's count, and offsets strictly
    increasing within each partition (the order Kafka delivers them in).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lines_read = 0
        """Complete lines read so far, header included."""
        try:
            self._raw: BufferedReader = self.path.open("rb")
        except OSError as exc:
            raise RecordingError(f"cannot open: {exc.strerror or exc}", path=self.path) from None
        self.compressed = self._raw.read(2) == _GZIP_MAGIC
        self._raw.seek(0)
        self._in: gzip.GzipFile | BufferedReader = (
            gzip.GzipFile(fileobj=self._raw) if self.compressed else self._raw
        )
        self._lines = self._numbered_lines()
        first = next(self._lines, None)
        if first is None:
            self.close()
            raise RecordingError(
                "empty file: a recording starts with a header line", path=self.path
            )
        try:
            self.header = RecordingHeader.parse(first[1], self.path, first[0])
        except RecordingError:
            self.close()
            raise

    def __iter__(self) -> Iterator[Record]:
        header = self.header
        last: dict[int, int] = {}
        for line_no, obj in self._lines:
            try:
                record = decode_message(obj)
            except ValueError as exc:
                raise RecordingError(str(exc), path=self.path, line=line_no) from None
            if record.topic_ != header.topic:
                raise RecordingError(
                    f"topic {record.topic_!r} differs from the header's {header.topic!r} "
                    "(a recording holds one topic)",
                    path=self.path,
                    line=line_no,
                )
            if record.partition_ >= header.partitions:
                raise RecordingError(
                    f"partition {record.partition_} is out of range: the header says the "
                    f"topic has {header.partitions} partition(s)",
                    path=self.path,
                    line=line_no,
                )
            previous = last.get(record.partition_)
            if previous is not None and record.offset_ <= previous:
                raise RecordingError(
                    f"offset {record.offset_} of partition {record.partition_} does not "
                    f"follow offset {previous}: offsets must increase within a partition",
                    path=self.path,
                    line=line_no,
                )
            last[record.partition_] = record.offset_
            yield record

    def _numbered_lines(self) -> Iterator[tuple[int, object]]:
        line_no = 0
        stream = iter(self._in)
        while True:
            try:
                raw = next(stream)
            except StopIteration:
                return
            except (EOFError, OSError, zlib.error) as exc:
                if not self.compressed:
                    raise
                # EOFError: gzip stream cut short; BadGzipFile (an OSError) / zlib.error:
                # corrupt. Either way, say how far we got: that is what to look for.
                raise RecordingError(
                    f"gzip stream is truncated or corrupt after {self.lines_read} complete "
                    f"line(s) read (the header and {max(self.lines_read - 1, 0)} message(s)): "
                    f"{exc}",
                    path=self.path,
                ) from None
            line_no += 1
            if not raw.strip():
                self.lines_read = line_no
                continue  # a blank line (say, at the end of a hand-edited file) carries nothing
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise RecordingError(
                    f"not UTF-8 at byte {exc.start}", path=self.path, line=line_no
                ) from None
            except json.JSONDecodeError as exc:
                raise RecordingError(
                    f"not valid JSON: {exc.msg} (column {exc.colno})", path=self.path, line=line_no
                ) from None
            self.lines_read = line_no
            yield line_no, obj

    def close(self) -> None:
        if self._in is not self._raw:
            self._in.close()
        self._raw.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Recording:
    """A whole recording in memory (what a replay through the engine needs)."""

    header: RecordingHeader
    records: list[Record]


def read_recording(path: str | Path) -> Recording:
    """Read and validate a whole recording; raises :class:`RecordingError`."""
    with RecordingReader(path) as reader:
        return Recording(reader.header, list(reader))
