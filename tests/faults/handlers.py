"""Handlers run inside consumer subprocesses by the fault tests."""

from __future__ import annotations

import os

from dedupe_consumer import Event, Handler


class AppendHandler(Handler):
    """Appends each call's event ID to ``$DEDUPE_TEST_EFFECTS``: the effect, outside the store.

    One ``write`` on an O_APPEND descriptor per call: a SIGKILL cannot tear a line,
    and the kernel keeps what was written even though the process dies.
    """

    def setup(self) -> None:
        self._fd = os.open(
            os.environ["DEDUPE_TEST_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT
        )

    def handle(self, event: Event) -> None:
        os.write(self._fd, f"{event.id}\n".encode())

    def teardown(self) -> None:
        os.close(self._fd)


class ReconcilingHandler(AppendHandler):
    """The effects file doubles as the downstream system that ``reconcile`` asks."""

    def reconcile(self, event: Event) -> bool:
        with open(os.environ["DEDUPE_TEST_EFFECTS"]) as fh:
            return any(line.strip() == event.id for line in fh)


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
        key = b"count:" + event.id.encode()
        event.stage(key, str(int(event.staged(key) or b"0") + 1))
        os.write(self._fd, f"{event.id}\n".encode())  # calls, not effects

    def teardown(self) -> None:
        os.close(self._fd)
