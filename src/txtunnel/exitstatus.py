# -*- test-case-name: tests.test_contract -*-
"""
A non-zero exit status for a relay or agent that gives up under C{twistd}.

C{twistd} exits 0 whenever its reactor stops, so a relay that cannot listen
or an agent whose token is refused would look to systemd, Docker or a shell
script like a clean stop.  L{exitWithStatus} arranges for the process to
exit with a given status once C{twistd} has finished its own shutdown
(pid file removed, logs flushed).
"""

from __future__ import annotations

import atexit
import os
import sys

__all__ = ["exitWithStatus"]


def exitWithStatus(status: int = 1) -> None:
    """
    Exit the process with C{status} at interpreter exit, after C{twistd}'s
    own clean-up.  Only for the C{twistd} entry points: the C{txtunnel}
    command returns its status from C{main} instead.
    """

    def _exit() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    atexit.register(_exit)
