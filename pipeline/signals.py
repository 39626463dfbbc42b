"""SIGTERM handled like Ctrl-C.

systemd, docker, CI timeouts and a plain `kill` send SIGTERM, whose default action ends the
process on the spot: no `finally` runs, so a run stays RUNNING and a temporary file stays
behind. Raising a KeyboardInterrupt subclass instead lets every context manager clean up
(tracking.run ends the run KILLED, files.atomic_write removes its temporary file).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so code that cleans up after Ctrl-C does it here too."""

    exit_code = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


def _raise_terminated(signum, frame) -> None:
    # A second SIGTERM ends the process at once, like a second Ctrl-C would in most tools.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread; the old handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
