"""The recording codec: byte-exact round trips, readable text, precise errors."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer import DedupeError
from dedupe_consumer.replay import Record, RecordingError, read_recording
from dedupe_consumer.replay.format import (
    RecordingHeader,
    RecordingReader,
    RecordingWriter,
    decode_bytes,
    encode_bytes,
    partial_path,
)
from dedupe_consumer.replay.recorder import parse_start
from dedupe_consumer.replay.records import TIMESTAMP_LOG_APPEND_TIME

TOPIC = "payments"

AWKWARD = [
    Record(TOPIC, 0, 0, b"plain-key", b'{"id": "a"}', [("event-id", b"a")], 1_700_000_000_000),
    Record(
        TOPIC,
        0,
        1,
        b"\x00\xff\xfe binary",  # not UTF-8
        bytes(range(256)),
        [
            ("trace", b"one"),
            ("trace", b"two"),  # repeated header, order kept
            ("sig", b"\x80\x81\x82"),  # binary header value
            ("empty", b""),
            ("null", None),
        ],
        1_700_000_000_001,
    ),
    Record(TOPIC, 1, 7, None, None, [], None),  # tombstone without key or timestamp
    Record(TOPIC, 1, 9, b"", b"", [], 5, TIMESTAMP_LOG_APPEND_TIME),  # empty is not null
    Record(
        TOPIC, 2, 3, "ключ €".encode(), "zürich \n\t\u2028 ✓".encode(), [("ü", "ß".encode())], 0
    ),
]


def header(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": "dedupe-consumer-recording",
        "version": 1,
        "topic": TOPIC,
        "partitions": 3,
        "recorded_at": "2024-06-01T00:00:00Z",
    }
    return {**base, **overrides}


def message(partition: int = 0, offset: int = 0, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "topic": TOPIC,
        "partition": partition,
        "offset": offset,
        "timestamp": 1,
        "key": "k",
        "value": "v",
        "headers": [],
    }
    return {**base, **overrides}


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def normalized(record: Record) -> tuple[Any, ...]:
    headers = [(k, v.encode() if isinstance(v, str) else v) for k, v in record.headers_]
    return (
        record.topic_,
        record.partition_,
        record.offset_,
        record.key_,
        record.value_,
        headers,
        record.timestamp(),
    )


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz"])
def test_round_trip_is_byte_exact(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with RecordingWriter(path, RecordingHeader.new(TOPIC, 3, note="x")) as writer:
        for record in AWKWARD:
            writer.write(record)
    assert writer.messages == len(AWKWARD)
    assert path.read_bytes().startswith(b"\x1f\x8b") == name.endswith(".gz")

    recording = read_recording(path)

    assert recording.header.topic == TOPIC
    assert recording.header.partitions == 3
    assert recording.header.extra == {"note": "x"}
    assert [normalized(r) for r in recording.records] == [normalized(r) for r in AWKWARD]


def test_text_stays_readable_and_only_binary_is_base64(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with RecordingWriter(path, RecordingHeader.new(TOPIC, 3)) as writer:
        writer.write(AWKWARD[0])
        writer.write(AWKWARD[1])
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["format"] == "dedupe-consumer-recording" and lines[0]["version"] == 1
    assert lines[1]["key"] == "plain-key"
    assert lines[1]["value"] == '{"id": "a"}'
    assert lines[1]["timestamp"] == 1_700_000_000_000
    assert lines[1]["timestamp_type"] == "CreateTime"
    assert lines[2]["key"] == {"base64": "AP/+IGJpbmFyeQ=="}
    assert lines[2]["headers"] == [
        ["trace", "one"],
        ["trace", "two"],
        ["sig", {"base64": "gIGC"}],
        ["empty", ""],
        ["null", None],
    ]


def test_encode_decode_bytes_cover_all_forms() -> None:
    assert encode_bytes(None) is None
    assert encode_bytes(b"") == ""
    assert encode_bytes(b"\xc0\xaf") == {"base64": "wK8="}  # overlong UTF-8 is not text
    assert decode_bytes({"base64": "wK8="}, "x") == b"\xc0\xaf"
    assert decode_bytes("é", "x") == "é".encode()


def test_writer_keeps_a_partial_file_and_no_final_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError), RecordingWriter(path, RecordingHeader.new(TOPIC, 1)) as w:
        w.write(AWKWARD[0])
        raise RuntimeError("kafka went away")
    assert not path.exists()
    assert partial_path(path).read_text().count("\n") == 2  # header + one message, flushed


def test_blank_lines_and_unknown_fields_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(
        json.dumps(header(future_field=1))
        + "\n"
        + json.dumps(message(0, 0, new_field="ignored"))
        + "\n\n"
        + json.dumps({"topic": TOPIC, "partition": 0, "offset": 1})  # optional fields omitted
    )  # and no newline at the end
    records = read_recording(path).records
    assert [(r.offset_, r.key_, r.value_, r.headers_, r.timestamp_ms) for r in records] == [
        (0, b"k", b"v", [], 1),
        (1, None, None, [], None),
    ]


@pytest.mark.parametrize(
    ("lines", "line_no", "says"),
    [
        ([header(), message(0, 0), "{not json"], 3, "not valid JSON"),
        ([header(), message(0, 0), {**message(0, 1), "offset": "1"}], 3, '"offset" must be'),
        ([header(), message(0, 0, key={"base64": "%%%"})], 2, "invalid base64"),
        ([header(), message(0, 0, value={"b64": "AA=="})], 2, '"value": expected'),
        ([header(), message(0, 0, headers=[["a"]])], 2, "headers[0] must be a [name, value]"),
        ([header(), message(0, 0, headers={"a": "b"})], 2, '"headers" must be a list'),
        ([header(), message(0, 5), message(1, 0), message(0, 5)], 4, "does not follow"),
        ([header(), message(0, 0, topic="other")], 2, "differs from the header"),
        ([header(), message(3, 0)], 2, "out of range"),
        ([header(), message(0, 0, timestamp_type="Now")], 2, '"timestamp_type"'),
        ([header(), [1, 2]], 2, "must be a JSON object"),
        ([message(0, 0)], 1, "not a recording"),
        ([header(version=2)], 1, "newer than this dedupe-consumer reads"),
        ([header(partitions=0)], 1, '"partitions" must be'),
    ],
)
def test_malformed_lines_name_their_line(
    tmp_path: Path, lines: list[object], line_no: int, says: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(RecordingError) as caught:
        read_recording(path)
    assert isinstance(caught.value, DedupeError)
    assert caught.value.line == line_no
    assert f"line {line_no}: " in str(caught.value)
    assert says in str(caught.value)


def test_invalid_utf8_line_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(header()).encode() + b'\n{"topic": "\xff"}\n')
    with pytest.raises(RecordingError, match=r"line 2: not UTF-8"):
        read_recording(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(RecordingError, match="empty file"):
        read_recording(tmp_path / "empty.jsonl")
    with pytest.raises(RecordingError, match="cannot open"):
        read_recording(tmp_path / "absent.jsonl")


def _gzip_recording(tmp_path: Path, messages: int) -> bytes:
    path = tmp_path / "full.jsonl.gz"
    with RecordingWriter(path, RecordingHeader.new(TOPIC, 1)) as writer:
        for n in range(messages):
            # Incompressible values, so a cut in the middle of the file is a cut in the middle.
            writer.write(Record(TOPIC, 0, n, None, zlib.crc32(str(n).encode()).to_bytes(4) * 40))
    return path.read_bytes()


def test_truncated_gzip_says_how_many_lines_were_read(tmp_path: Path) -> None:
    data = _gzip_recording(tmp_path, 200)
    cut = data[: len(data) // 2]
    expected = zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")  # complete lines
    assert 1 < expected < 201
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)

    read: list[Record] = []
    with pytest.raises(RecordingError) as caught, RecordingReader(path) as reader:
        read.extend(reader)

    message = str(caught.value)
    assert f"truncated or corrupt after {expected} complete line(s) read" in message
    assert f"the header and {expected - 1} message(s)" in message
    assert len(read) == expected - 1  # everything before the cut was delivered


def test_gzip_without_its_trailer_is_reported_after_all_lines(tmp_path: Path) -> None:
    data = _gzip_recording(tmp_path, 10)
    path = tmp_path / "no-trailer.jsonl.gz"
    path.write_bytes(data[:-8])  # the CRC and length are what prove the end was reached
    with pytest.raises(RecordingError, match=r"after 11 complete line\(s\) read"):
        read_recording(path)


def test_corrupt_gzip_is_a_recording_error(tmp_path: Path) -> None:
    data = bytearray(_gzip_recording(tmp_path, 50))
    data[-6] ^= 0x5A  # inside the CRC32 trailer: only the checksum can tell
    path = tmp_path / "bad-crc.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError, match=r"truncated or corrupt after 51 complete line"):
        read_recording(path)

    data = bytearray(_gzip_recording(tmp_path, 50))
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A  # in the middle: garbled lines, or a deflate error, or the CRC
    path.write_bytes(bytes(data))
    with pytest.raises(RecordingError):
        read_recording(path)


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "renamed.jsonl"
    lines = json.dumps(header()) + "\n" + json.dumps(message(0, 0)) + "\n"
    path.write_bytes(gzip.compress(lines.encode()))
    assert [r.value_ for r in read_recording(path).records] == [b"v"]


def test_parse_start() -> None:
    assert parse_start("earliest") == "earliest"
    assert parse_start("latest") == "latest"
    zulu = parse_start("2024-05-01T12:00:00Z")
    naive = parse_start("2024-05-01T12:00:00")
    assert not isinstance(zulu, str) and not isinstance(naive, str)
    assert zulu == naive  # no zone means UTC
    assert int(zulu.timestamp()) == 1_714_564_800
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_start("yesterday")
