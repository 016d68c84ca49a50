"""Bookkeeping for a concurrent engine: which events may start, which offsets are settled.

Two small structures, free of Kafka, threads and the store, so that their rules
can be checked on their own:

- :class:`Lanes` hands out events so that events sharing a *lane* (the same key
  of a partition, the same event ID of a partition, or the whole partition under
  ``ordering = "partition"``) start strictly in the order they were submitted,
  one at a time, while events on other lanes run in parallel.
- :class:`Progress` follows one partition's offsets from the moment they are
  taken to the moment they are decided, and tells the end of the contiguous run
  of decided offsets: what the watermark and the committed offset may cover
  (invariants 1 and 2). Decisions above a gap wait for it to close.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class Ticket(Generic[T]):
    """One submitted event: what it carries and the lanes it waits on."""

    item: T
    lanes: tuple[Hashable, ...]
    started: bool = False
    finished: bool = False


@dataclass(slots=True)
class Lanes(Generic[T]):
    """Per-lane FIFO queues: a ticket starts once it heads every one of its lanes.

    Deadlock-free: lanes are filled in submission order, so the oldest unfinished
    ticket heads all of its lanes; it is either running or ready.
    """

    _lanes: dict[Hashable, deque[Ticket[T]]] = field(default_factory=dict)
    _ready: deque[Ticket[T]] = field(default_factory=deque)
    _waiting: int = 0
    """Tickets submitted and not yet started (ready or blocked)."""

    def submit(self, item: T, lanes: Iterable[Hashable]) -> Ticket[T]:
        ticket = Ticket(item, tuple(dict.fromkeys(lanes)))
        if not ticket.lanes:
            raise ValueError("a ticket needs at least one lane")
        for lane in ticket.lanes:
            self._lanes.setdefault(lane, deque()).append(ticket)
        self._waiting += 1
        if self._heads_all(ticket):
            self._ready.append(ticket)
        return ticket

    def take(self, limit: int) -> list[Ticket[T]]:
        """Up to ``limit`` ready tickets, oldest first; they count as started."""
        out: list[Ticket[T]] = []
        while self._ready and len(out) < limit:
            ticket = self._ready.popleft()
            if ticket.started or ticket.finished:  # dropped meanwhile
                continue
            ticket.started = True
            self._waiting -= 1
            out.append(ticket)
        return out

    def finish(self, ticket: Ticket[T]) -> None:
        """The ticket's event is decided: the next ticket of each of its lanes may start."""
        if ticket.finished:
            return
        if not ticket.started:
            self._waiting -= 1
        ticket.finished = True
        for lane in ticket.lanes:
            queue = self._lanes.get(lane)
            if not queue or queue[0] is not ticket:
                continue  # the lane was dropped (a revoked partition)
            queue.popleft()
            if not queue:
                del self._lanes[lane]
                continue
            head = queue[0]
            if not head.started and self._heads_all(head):
                self._ready.append(head)

    def drop(self, lanes_of: Iterable[Hashable]) -> list[Ticket[T]]:
        """Forget these lanes; return their tickets not started (they will not be decided).

        Started tickets stay the caller's: it still finishes them.
        """
        dropped: list[Ticket[T]] = []
        for lane in lanes_of:
            for ticket in self._lanes.pop(lane, ()):
                if not ticket.started and not ticket.finished:
                    ticket.finished = True
                    self._waiting -= 1
                    dropped.append(ticket)
        return dropped

    def lanes(self) -> Iterator[Hashable]:
        return iter(list(self._lanes))

    @property
    def waiting(self) -> int:
        return self._waiting

    def _heads_all(self, ticket: Ticket[T]) -> bool:
        return all(self._lanes[lane][0] is ticket for lane in ticket.lanes)


@dataclass(slots=True)
class Progress:
    """One partition's offsets between being taken and being settled.

    ``take`` offsets in increasing order (Kafka may skip numbers: transaction
    markers, compaction); ``decide`` them in any order. ``settled`` is the last
    offset of the contiguous run of decided offsets, which only moves forward.
    """

    settled: int | None = None
    _taken: deque[int] = field(default_factory=deque)
    _decided: set[int] = field(default_factory=set)

    def take(self, offset: int) -> None:
        last = self._taken[-1] if self._taken else self.settled
        if last is not None and offset <= last:
            raise ValueError(f"offset {offset} taken after {last}: offsets must increase")
        self._taken.append(offset)

    def decide(self, offset: int) -> int | None:
        """Mark ``offset`` decided; return the new end of the settled run (or None)."""
        self._decided.add(offset)
        taken, decided = self._taken, self._decided
        while taken and taken[0] in decided:
            self.settled = taken.popleft()
            decided.discard(self.settled)
        return self.settled

    @property
    def open(self) -> int:
        """Offsets taken and not yet settled (in flight, waiting, or decided above a gap)."""
        return len(self._taken)

    @property
    def first_open(self) -> int | None:
        """The oldest offset not settled: where a re-read must start."""
        return self._taken[0] if self._taken else None
