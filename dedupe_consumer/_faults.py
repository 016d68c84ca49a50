"""Named crash points for the fault tests: a real SIGKILL of the real process.

``DEDUPE_FAULT_POINT=after_persist DEDUPE_FAULT_AFTER=3`` kills the process
the third time it reaches ``after_persist``. Unset (production), each call is
one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_claim", "after_handler", "after_persist", "after_commit")
_target = os.environ.get("DEDUPE_FAULT_POINT")
_remaining = int(os.environ.get("DEDUPE_FAULT_AFTER", "1"))


def fault_point(name: str) -> None:
    global _remaining
    if _target != name:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
