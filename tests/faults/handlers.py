"""Handlers run inside consumer subprocesses by the fault tests."""

from __future__ import annotations

import os
import signal
import zlib

from dedupe_consumer import Event, Handler


def effect_line(event_id: str) -> bytes:
    """One line of the effects file: the event ID, then, when ``DEDUPE_TEST_TAG`` is set,
    a space and that tag (the storm names each process incarnation with it, so a
    repeated effect can be traced to the process that made the first one)."""
    tag = os.environ.get("DEDUPE_TEST_TAG")
    return f"{event_id} {tag}\n".encode() if tag else f"{event_id}\n".encode()


def fail_first_attempt(event: Event) -> None:
    """With ``DEDUPE_TEST_FLAKY=n``, the first attempt of one event in ``n`` (by ID)
    fails before any effect: its retry waits out a backoff, so its lane is carried."""
    every = int(os.environ.get("DEDUPE_TEST_FLAKY", "0"))
    if every and event.attempt == 1 and zlib.crc32(event.id.encode()) % every == 0:
        raise RuntimeError("flaky downstream: try again")


class AppendHandler(Handler):
    """Appends each call's event ID to ``$DEDUPE_TEST_EFFECTS``: the effect, outside the store.

    One ``write`` on an O_APPEND descriptor per call: a SIGKILL cannot tear a line,
    and the kernel keeps what was written even though the process dies.
    """

    def setup(self) -> None:
        self._fd = os.open(
            os.environ["DEDUPE_TEST_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT
        )

    def handle(self, event: Event) -> object:
        fail_first_attempt(event)
        os.write(self._fd, effect_line(event.id))
        return None

    def teardown(self) -> None:
        os.close(self._fd)


class EmitHandler(AppendHandler):
    """Emits its event's ID to ``<topic>.out`` (``event.emit``), after logging the call:
    the output is the effect, exactly once whatever the kills."""

    def handle(self, event: Event) -> str:
        super().handle(event)
        event.emit(f"{event.topic}.out", event.id, key=event.key)
        # The response differs per process and attempt: a duplicate's reply that is
        # byte-identical to the first one was stored, not computed again.
        return f"{event.id}|{os.getpid()}|{event.attempt}"


class ReconcilingHandler(AppendHandler):
    """The effects file doubles as the downstream system that ``reconcile`` asks."""

    def reconcile(self, event: Event) -> bool:
        with open(os.environ["DEDUPE_TEST_EFFECTS"]) as fh:
            return any(line.split()[:1] == [event.id] for line in fh)


class LedgerHandler(Handler):
    """Transactional effects: a per-ID counter staged in the store, plus a call log.

    ``count:<id>`` must end at exactly 1 for every handled ID whatever the kills,
    because the counter commits in the same WriteBatch as the dedupe record.
    """

    def setup(self) -> None:
        self._fd = os.open(
            os.environ["DEDUPE_TEST_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT
        )

    def handle(self, event: Event) -> None:
        fail_first_attempt(event)
        key = b"count:" + event.id.encode()
        event.stage(key, str(int(event.staged(key) or b"0") + 1))
        os.write(self._fd, effect_line(event.id))  # calls, not effects

    def teardown(self) -> None:
        os.close(self._fd)


class PausingLedger(Handler):
    """Transactional effects that a lost write would show: a per-ID counter and a running
    total per partition (a zombie's stale total overwriting a newer one would be visible).

    With ``DEDUPE_TEST_PAUSE_AT=n`` the process SIGSTOPs itself at its n-th call, in the
    middle of a batch, after creating ``$DEDUPE_TEST_PAUSED``: a zombie in the making.
    """

    def setup(self) -> None:
        self._fd = os.open(
            os.environ["DEDUPE_TEST_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT
        )
        self._pause_at = int(os.environ.get("DEDUPE_TEST_PAUSE_AT", "0"))
        self._calls = 0

    def handle(self, event: Event) -> None:
        self._calls += 1
        if self._calls == self._pause_at:
            with open(os.environ["DEDUPE_TEST_PAUSED"], "w") as marker:
                marker.write(str(event.offset))
            os.kill(os.getpid(), signal.SIGSTOP)  # resumes here on SIGCONT
        key = b"count:" + event.id.encode()
        event.stage(key, str(int(event.staged(key) or b"0") + 1))
        event.stage(b"total", str(int(event.staged(b"total") or b"0") + 1))
        os.write(self._fd, effect_line(event.id))  # calls, not effects

    def teardown(self) -> None:
        os.close(self._fd)
