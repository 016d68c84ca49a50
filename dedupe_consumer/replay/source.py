"""Feed a list of records to the consumer loop as Kafka would, restarts included.

The source behaves like a consumer that was assigned every partition of the
recording: it resumes each partition where the listener says, hands out
batches in offset order, and can redeliver each batch once more, as a consumer
restarted between persist and commit would see it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dedupe_consumer.contracts import AssignmentListener
from dedupe_consumer.models import TopicPartition
from dedupe_consumer.replay.records import Record


class ReplaySource:
    def __init__(
        self,
        records: Sequence[Record],
        listener: AssignmentListener,
        *,
        redeliver_batches: bool = False,
    ) -> None:
        self.redeliver_batches = redeliver_batches
        self.committed: dict[TopicPartition, int] = {}
        tps = list(dict.fromkeys(TopicPartition(r.topic_, r.partition_) for r in records))
        resume = listener.on_assigned(tps)
        self._records = [
            r
            for r in records
            if r.offset_ >= (resume.get(TopicPartition(r.topic_, r.partition_)) or 0)
        ]
        self._position = 0
        self._again: list[Record] | None = None
        self._last: list[Record] = []

    @property
    def exhausted(self) -> bool:
        return self._position >= len(self._records) and self._again is None

    def poll(self, max_messages: int, timeout_s: float) -> list[Record]:
        if self._again is not None:
            batch, self._again = self._again, None
            self._last = batch
            return batch
        batch = self._records[self._position : self._position + max_messages]
        self._position += len(batch)
        self._last = batch
        if self.redeliver_batches and batch:
            self._again = batch
        return batch

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.committed.update(offsets)

    def keep_alive(self) -> None:
        """A recording has no group to keep."""

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Hand the undecided rest of the last batch out again, as a Kafka seek would."""
        again = [
            r
            for r in self._last
            if r.offset_ >= offsets.get(TopicPartition(r.topic_, r.partition_), r.offset_ + 1)
        ]
        if again and self._again is None:
            self._again = again

    def close(self) -> None:
        return None


class ReplayFeed:
    """A source factory over ``records``: the loop opens one :class:`ReplaySource` per run."""

    def __init__(self, records: Sequence[Record], *, redeliver_batches: bool = False) -> None:
        self.records = records
        self.redeliver_batches = redeliver_batches
        self.opened: ReplaySource | None = None
        """The source of the last run (None: not opened yet)."""

    def __call__(self, listener: AssignmentListener) -> ReplaySource:
        self.opened = ReplaySource(self.records, listener, redeliver_batches=self.redeliver_batches)
        return self.opened

    @property
    def exhausted(self) -> bool:
        """Whether the opened source has handed out every record (False before it opens)."""
        return self.opened is not None and self.opened.exhausted

    @property
    def committed(self) -> dict[TopicPartition, int]:
        """What the loop committed (empty before the source opens)."""
        return {} if self.opened is None else self.opened.committed
