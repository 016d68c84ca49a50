"""Named crash points for the fault tests: a real SIGKILL of the real process.

``DEDUPE_FAULT_POINT=after_persist DEDUPE_FAULT_AFTER=3`` kills the process
the third time it reaches ``after_persist``; ``DEDUPE_FAULT_SIGNAL=SIGSTOP`` stops
it there instead (a zombie in the making: the test wakes it with SIGCONT). Unset
(production), each call is one string comparison.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_claim", "after_handler", "before_persist", "after_persist", "after_commit")
_target = os.environ.get("DEDUPE_FAULT_POINT")
_remaining = int(os.environ.get("DEDUPE_FAULT_AFTER", "1"))
_signal = signal.Signals[os.environ.get("DEDUPE_FAULT_SIGNAL", "SIGKILL")]


def fault_point(name: str) -> None:
    global _remaining
    if _target != name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), _signal)  # SIGSTOP: resumes here on SIGCONT
