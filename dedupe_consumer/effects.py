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

    __slots__ = ("_read", "batch", "staged")

    def __init__(
        self, read: Callable[[bytes], bytes | None], batch: dict[bytes, bytes | None]
    ) -> None:
        self._read = read
        self.batch = batch
        self.staged: dict[bytes, bytes | None] = {}

    def get(self, key: bytes | str) -> bytes | None:
        k = _bytes(key)
        if k in self.staged:
            return self.staged[k]
        if k in self.batch:
            return self.batch[k]
        return self._read(k)

    def stage(self, key: bytes | str, value: bytes | str | None) -> None:
        """Write ``value`` under ``key`` (``None`` deletes) when the batch is persisted."""
        self.staged[_bytes(key)] = None if value is None else _bytes(value)
