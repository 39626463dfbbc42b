"""The one way this project writes a file: atomically, durably, and readable by others.

Every stage that leaves a file behind (data, ONNX models, figures, tables, predictions,
benchmark reports) writes it through `atomic_write`, so a crash, Ctrl-C or SIGTERM never
leaves a half-written file under the real name, and a tracking server running as another
user can serve what we wrote.

A SIGKILL runs no cleanup, so the temporary files and folders made here carry the writer's
host and pid in their names (`.NAME.XXXXXXXX.HOST-PID.tmp`, `PREFIX-HOST-PID-XXXXXXXX`): the
next write of the same file, or the next temporary folder of the same kind, removes the ones
whose writer is gone from this host, and only those.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline import processes, signals
from pipeline.errors import PipelineError

# Not mkstemp's 0600: an artifact store or web server running as another user must read these.
FILE_MODE = 0o644
# The longest file name most filesystems take (bytes), when the folder cannot be asked.
NAME_MAX = 255
# What mkstemp and mkdtemp add between prefix and suffix.
RANDOM_CHARS = 8


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def _remove_stale(folder: Path, pattern: str, writer: re.Pattern[str]) -> None:
    """Remove what matches `pattern` in `folder` whose writer (the pid `writer` captures) is gone:
    ours (same owner), from this host (the pattern has the host tag), and not this process."""
    for leftover in folder.glob(pattern):
        found = writer.search(leftover.name)
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            if pid == os.getpid() or processes.alive(pid) or leftover.lstat().st_uid != os.getuid():
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except OSError:  # someone else removed it first, or we may not: it is not ours to fight over
            continue


def _temporary_name_parts(path: Path) -> tuple[str, str, str]:
    """mkstemp's prefix and suffix for a temporary file beside `path`, and the glob of its stale twins.

    The final name is cut short where needed so the temporary name is no longer than the longest
    name the folder takes: a file name that fits must not fail for its temporary twin.
    """
    suffix = f".{processes.host_tag()}-{os.getpid()}.tmp"
    room = _name_max(path.parent) - len(os.fsencode(f"..{suffix}")) - RANDOM_CHARS
    stem = os.fsdecode(os.fsencode(path.name)[: max(room, 1)])
    return f".{stem}.", suffix, f".{glob.escape(stem)}.*.{processes.host_tag()}-*.tmp"


TEMPORARY_FILE_WRITER = re.compile(r"\.[0-9a-f]{8}-(\d+)\.tmp$")


@contextmanager
def atomic_write(path: Path | str, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it, make it 0644 and rename it onto `path`.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary file is removed
    and `path` is left as it was. A folder that cannot be written is a PipelineError that names it.
    Temporary files that an earlier writer of `path` left when it was killed are removed first.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing only ('w' or 'wb'), not {mode!r}")
    path = Path(path)
    if len(os.fsencode(path.name)) > _name_max(path.parent):
        raise PipelineError(f"cannot write {path}: its name is longer than the folder takes; choose a shorter name")
    prefix, suffix, stale = _temporary_name_parts(path)
    _remove_stale(path.parent, stale, TEMPORARY_FILE_WRITER)
    tmp: Path | None = None
    try:
        # SIGTERM held while the file is made and named: raised any earlier, the finally below
        # would not know the file it has to remove.
        with signals.held():
            try:
                fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
            except OSError as exc:
                raise PipelineError(f"cannot write {path}: {exc.strerror or exc}; choose another location") from None
            tmp = Path(tmp_name)
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            try:
                handle.flush()
                os.fsync(handle.fileno())
                os.fchmod(handle.fileno(), FILE_MODE)
            except OSError as exc:  # a full disk shows here, not at write()
                raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            os.replace(tmp, path)
        except OSError as exc:  # the name is too long, or a folder sits there
            raise PipelineError(f"cannot write {path}: {exc.strerror or exc}; choose another location") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_bytes(path: Path | str, content: bytes) -> Path:
    """`content` into `path` through atomic_write; returns the path."""
    with atomic_write(path, "wb") as handle:
        handle.write(content)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


@contextmanager
def temporary_folder(kind: str) -> Iterator[Path]:
    """A fresh folder in the system's temporary folder, removed with what it holds on the way out.

    tempfile.TemporaryDirectory, but named `KIND-HOST-PID-XXXXXXXX`, so the folders that processes
    of the same kind left when they were killed (SIGKILL runs no cleanup) are removed first.
    """
    base = Path(tempfile.gettempdir())
    tag = f"{kind}-{processes.host_tag()}-"
    _remove_stale(base, f"{glob.escape(tag)}*", re.compile(rf"^{re.escape(tag)}(\d+)-[a-z0-9_]+$"))
    folder = Path(tempfile.mkdtemp(prefix=f"{tag}{os.getpid()}-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def writable_folder(folder: Path, what: str, hint: str) -> Path:
    """Create `folder` (and its parents) if needed, or fail before any work on one that can't hold files:
    'cannot write WHAT FOLDER: WHY; HINT'."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = f"{exc.strerror or exc} ({exc.filename or folder})"
    else:
        if os.access(folder, os.W_OK):
            return folder
        why = "not writable"
    raise PipelineError(f"cannot write {what} {folder}: {why}; {hint}")
