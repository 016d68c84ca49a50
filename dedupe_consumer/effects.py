"""Transactional effects: handler writes that commit in the dedupe record's WriteBatch.

A handler that keeps its result in the store (``event.stage(key, value)``)
gets both-or-neither with the dedupe decision: a crash before the batch is
persisted loses the effect *and* the record, so the redelivered event is
handled again and the effect happens exactly once. Staged values live in a
per-partition column family and travel with the partition in the changelog.
"""

from __future__ import annotations

from collections.abc import Callable


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


class Effects:
    """The staged writes of one handler call, readable before they are committed.

    Reads see, in order: this call's staged writes, earlier successful calls of
    the same batch, then the store. A call that fails discards its writes.
    """

    __slots__ = ("_read", "batch", "max_bytes", "staged")

    def __init__(
        self,
        read: Callable[[bytes], bytes | None],
        batch: dict[bytes, bytes | None],
        max_bytes: int | None = None,
    ) -> None:
        self._read = read
        self.batch = batch
        self.max_bytes = max_bytes
        """Largest key + value one staged write may have (it becomes one changelog record)."""
        self.staged: dict[bytes, bytes | None] = {}

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
