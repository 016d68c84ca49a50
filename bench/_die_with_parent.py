"""``python -m bench._die_with_parent CMD...``: run CMD, which gets SIGTERM when its parent dies.

The sidecar row runs ``dedupe-consumer sidecar`` as a child of its contender
process; when ``bench.compare`` kills a contender that timed out, the sidecar
must not stay behind consuming. Linux's ``PR_SET_PDEATHSIG`` does it and
survives ``exec``. It is set here, in a fresh process, rather than in a
``preexec_fn``, which is unsafe in a parent that runs threads (librdkafka's,
the HTTP target's). Elsewhere than Linux the command just runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    command = sys.argv[1:]
    if not command:
        raise SystemExit("usage: python -m bench._die_with_parent CMD [ARG...]")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
