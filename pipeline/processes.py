"""Processes on this machine, read from /proc (torch-free): alive or not, and which process a pid is now.

A pid names a process only while it lives: once it has exited, the kernel hands the number to
the next process. So what this project starts and later signals (the tracking server) is
recorded as its pid plus its start time and command line, and signalled only while those still
match; and what a process leaves behind (temporary files) carries its host and pid, so a later
run can tell a dead writer's leftovers from a live one's.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessIdentity:
    """Which process a pid meant when it was recorded: (pid, start time) is unique until a reboot."""

    pid: int
    start_time: int  # clock ticks after boot: field 22 of /proc/PID/stat
    command: tuple[str, ...]  # /proc/PID/cmdline


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; the command name before it may hold spaces and ')'."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (exited, waiting for its parent to collect it)."""
    fields = _stat_fields(pid) if pid > 0 else None
    return fields is not None and fields[0] != "Z"


def identity(pid: int) -> ProcessIdentity | None:
    """The live process `pid` is now; None if there is none (or only a zombie)."""
    fields = _stat_fields(pid) if pid > 0 else None
    if fields is None or fields[0] == "Z":
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return ProcessIdentity(pid, int(fields[19]), tuple(os.fsdecode(part) for part in raw.split(b"\0") if part))


def launched(pid: int, argv: list[str]) -> ProcessIdentity:
    """The identity of a child just started with `argv`, read while its pid is certainly ours (unreaped).

    The command is `argv` itself, not /proc/PID/cmdline: Popen returns once the child's close-on-exec
    pipe closes, which the kernel does before the new program's arguments are in place, so cmdline can
    still read empty. Start time -1 if even the stat cannot be read (the child already failed)."""
    fields = _stat_fields(pid)
    return ProcessIdentity(pid, int(fields[19]) if fields else -1, tuple(argv))


def same_process(recorded: ProcessIdentity) -> bool | None:
    """True while `recorded`'s process still runs (a zombie of it counts: its pid is not free yet),
    False if its pid is now another process, None if no process has that pid."""
    fields = _stat_fields(recorded.pid)
    if fields is None:
        return None
    if int(fields[19]) != recorded.start_time:
        return False
    if fields[0] == "Z":
        return True
    now = identity(recorded.pid)
    if now is None:  # gone between the two reads
        return None
    # Same pid and start time is the same process; an empty command line is one mid-exec (or exiting),
    # a different one means it has since exec'd another program.
    return not now.command or now.command == recorded.command


def describe(pid: int) -> str:
    """'pid 123 (sleep 600)' for messages, or 'pid 123' when it cannot be read."""
    found = identity(pid)
    command = " ".join(found.command) if found else ""
    if len(command) > 80:
        command = command[:77] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def host_tag() -> str:
    """8 hex digits naming this host in file names: a pid means something on its own host only."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
