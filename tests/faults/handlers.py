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
