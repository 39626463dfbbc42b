"""SIGTERM handled like Ctrl-C.

systemd, docker, CI timeouts and a plain `kill` send SIGTERM, whose default action ends the
process on the spot: no `finally` runs, so a run stays RUNNING and a temporary file stays
behind. Raising a KeyboardInterrupt subclass instead lets every context manager clean up
(tracking.run ends the run KILLED, files.atomic_write removes its temporary file).

An exception raised from a signal handler can surface inside any library, and some catch it:
pydantic's schema builder wraps it in a SchemaError when the signal lands during an import,
and a database driver may turn it into its own error. So the arrival is also recorded:
`received()` tells the CLI and the tracking boundary that the error they see is a SIGTERM, and
`raise_if_received()` lets a long loop (training) stop at its next step if the exception
was swallowed on the way.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived. A KeyboardInterrupt, so code that cleans up after Ctrl-C does it here too."""

    exit_code = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


_received = threading.Event()


def received() -> bool:
    """Whether SIGTERM has arrived in this process (while `sigterm_raises` was in force)."""
    return _received.is_set()


def raise_if_received() -> None:
    """Terminated, if SIGTERM arrived: for loops that must stop even where the first raise was swallowed."""
    if _received.is_set():
        raise Terminated()


def not_an_interrupt(record: logging.LogRecord) -> bool:
    """A log filter: False for what a library logs about an interrupt it caught and went on from.

    SQLAlchemy's pool, when SIGTERM (or Ctrl-C) lands while it resets a connection, logs the
    interrupt with its traceback; the interrupt is recorded (`received`) and still ends the command.
    """
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


_holding = threading.local()


def _raise_terminated(signum, frame) -> None:
    _received.set()
    # A second SIGTERM ends the process at once, like a second Ctrl-C would in most tools.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not getattr(_holding, "active", False):
        raise Terminated()


@contextmanager
def held() -> Iterator[None]:
    """A SIGTERM that lands inside the block is recorded, and raised as Terminated when the block ends.

    For the few steps that make something and then take charge of it, such as creating a temporary
    file and entering the `try` that removes it: a raise between the two would leave the file behind.
    Begin the `try` first and make the thing inside this block.
    """
    _holding.active = True
    try:
        yield
    finally:
        _holding.active = False
    raise_if_received()


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
