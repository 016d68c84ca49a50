"""Transactional effects: handler writes that commit in the dedupe record's WriteBatch.

A handler that keeps its result in the store (``event.stage(key, value)``)
gets both-or-neither with the dedupe decision: a crash before the batch is
persisted loses the effect *and* the record, so the redelivered event is
handled again and the effect happens exactly once. Staged values live in a
per-partition column family and travel with the partition in the changelog.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from dedupe_consumer.store.base import Output

OutputHeaders = Mapping[str, bytes | str | None] | Sequence[tuple[str, bytes | str | None]]
"""The headers ``emit`` takes: a mapping, or ``(name, value)`` pairs (repeats kept)."""

_INTERNAL = (".dedupe-changelog", ".dedupe-by-id")
"""Topics of this library's own: an output never goes there."""


_OVERHEAD = 512
"""Bytes a record needs besides its key, value and headers (record and batch headers)."""


class OutputError(ValueError):
    """An output that cannot be produced (``event.emit`` or a reply): the attempt fails,
    is retried, and its event is dead-lettered with reason ``output-failed`` at the end."""


def check_topic(topic: object, refused: frozenset[str]) -> None:
    """Raise :class:`OutputError` unless ``topic`` may receive an output: a non-empty
    name that is not one of this library's topics (nor a ``refused`` one)."""
    if not isinstance(topic, str) or not topic:
        raise OutputError(f"emit: the topic must be a non-empty string, not {topic!r}")
    if topic.startswith("__"):
        raise OutputError(
            f"emit: {topic!r} is a Kafka internal topic ('__...'): outputs never go there"
        )
    if topic.endswith(_INTERNAL) or topic in refused:
        raise OutputError(
            f"emit: {topic!r} is a topic of dedupe_consumer's own (a changelog, by-id or "
            "dead-letter topic) or one this consumer reads: outputs never go there"
        )


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _data(data: object, what: str) -> bytes | None:
    """An output's key, value or header value: bytes, text (UTF-8) or None only; what the
    producer would refuse fails the attempt here, not the batch's transaction."""
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    raise OutputError(
        f"emit: the {what} must be bytes, str or None, not {type(data).__name__} "
        "(serialize it first, e.g. json.dumps(...))"
    )


def _name(name: object) -> str:
    if isinstance(name, str):
        return name
    if isinstance(name, bytes):
        try:
            return name.decode()
        except UnicodeDecodeError:
            pass
    raise OutputError(f"emit: a header name must be text, not {name!r}")


class Effects:
    """The staged writes of one handler call, readable before they are committed.

    Reads see, in order: this call's staged writes, earlier successful calls of
    the same batch, then the store. A call that fails discards its writes.
    """

    __slots__ = (
        "_read",
        "batch",
        "max_bytes",
        "max_outputs",
        "outputs",
        "refused_topics",
        "staged",
        "topic_limit",
        "unemittable",
    )

    def __init__(
        self,
        read: Callable[[bytes], bytes | None],
        batch: dict[bytes, bytes | None],
        max_bytes: int | None = None,
        *,
        topic_limit: Callable[[str], int | None] | None = None,
        unemittable: str | None = None,
        refused_topics: frozenset[str] = frozenset(),
        max_outputs: int | None = None,
    ) -> None:
        self._read = read
        self.batch = batch
        self.max_bytes = max_bytes
        """Largest key + value one staged write may have (it becomes one changelog record)."""
        self.staged: dict[bytes, bytes | None] = {}
        self.outputs: list[Output] = []
        """This call's emitted messages, in the order emitted."""
        self.topic_limit = topic_limit
        """An output topic's ``max.message.bytes``, None when it does not exist (not
        checked without it)."""
        self.unemittable = unemittable
        """Why nothing can be emitted here (no transactional changelog), or None."""
        self.refused_topics = refused_topics
        """Topics an output never goes to (the dead-letter topic)."""
        self.max_outputs = max_outputs
        """How many messages one call may emit (``processing.max_outputs_per_event``)."""

    def get(self, key: bytes | str) -> bytes | None:
        k = _bytes(key)
        if k in self.staged:
            return self.staged[k]
        if k in self.batch:
            return self.batch[k]
        return self._read(k)

    def stage(self, key: bytes | str, value: bytes | str | None) -> None:
        """Write ``value`` under ``key`` (``None`` deletes) when the batch is persisted.

        Raises ``ValueError`` for a write too large for one changelog record: the
        attempt fails (and is retried, then dead-lettered) instead of the batch.
        """
        k = _bytes(key)
        v = None if value is None else _bytes(value)
        size = len(k) + (0 if v is None else len(v))
        if self.max_bytes is not None and size > self.max_bytes:
            raise ValueError(
                f"staged effect {k[:40]!r} is {size} bytes (key + value), over the limit of "
                f"{self.max_bytes} bytes: the changelog producer's message.max.bytes "
                "([kafka.producer] message.max.bytes) minus record overhead; stage smaller "
                "values or raise that setting (and the changelog topic's max.message.bytes)"
            )
        self.staged[k] = v

    def emit(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        headers: OutputHeaders | None = None,
    ) -> None:
        """Produce a message to ``topic`` when the batch is persisted, in its transaction.

        Raises :class:`OutputError` (a ``ValueError``: the attempt fails, is retried,
        then dead-lettered as ``output-failed``) for a topic that does not exist or is
        one of this library's, a message too large for the producer, or one output
        more than ``processing.max_outputs_per_event``; ``RuntimeError`` where nothing
        can be emitted.
        """
        if self.unemittable is not None:
            raise RuntimeError(self.unemittable)
        if self.max_outputs is not None and len(self.outputs) >= self.max_outputs:
            raise OutputError(
                f"emit: more than {self.max_outputs} messages from one handler call "
                "(processing.max_outputs_per_event): every output of a batch is held until "
                "its transaction; raise the setting if this handler really fans out that far"
            )
        check_topic(topic, self.refused_topics)
        pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
        kept = tuple((_name(n), _data(x, f"header {n!r}")) for n, x in pairs)
        k = _data(key, "key")
        v = _data(value, "value")
        size = len(k or b"") + len(v or b"") + sum(len(n.encode()) + len(x or b"") for n, x in kept)
        limit = self.max_bytes
        topic_max = self.topic_limit(topic) if self.topic_limit is not None else 0
        if topic_max is None:
            raise OutputError(
                f"emit: output topic {topic!r} does not exist; create it, or set "
                "processing.create_output_topics = true (outputs are never sent to a topic "
                "the broker would create on its own)"
            )
        if topic_max and (limit is None or topic_max - _OVERHEAD < limit):
            limit = topic_max - _OVERHEAD
        if limit is not None and size > limit:
            raise OutputError(
                f"emit: a message of {size} bytes (key, value and headers) to {topic!r} is "
                f"over the limit of {limit} bytes (the smaller of the topic's "
                "max.message.bytes and the producer's message.max.bytes, minus record "
                "overhead)"
            )
        self.outputs.append(Output(topic, v, k, kept))
