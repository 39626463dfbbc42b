"""The one way this project writes a file: atomically, durably, and readable by others.

Every stage that leaves a file behind (data, ONNX models, figures, tables, predictions,
benchmark reports) writes it through `atomic_write`, so a crash, Ctrl-C or SIGTERM never
leaves a half-written file under the real name, and a tracking server running as another
user can serve what we wrote.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.errors import PipelineError

# Not mkstemp's 0600: an artifact store or web server running as another user must read these.
FILE_MODE = 0o644


@contextmanager
def atomic_write(path: Path | str, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it, make it 0644 and rename it onto `path`.

    On any exception (KeyboardInterrupt and SystemExit included) the temporary file is removed
    and `path` is left as it was. A folder that cannot be written is a PipelineError that names it.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing only ('w' or 'wb'), not {mode!r}")
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}; choose another location") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            try:
                handle.flush()
                os.fsync(handle.fileno())
                os.fchmod(handle.fileno(), FILE_MODE)
            except OSError as exc:  # a full disk shows here, not at write()
                raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from None
        os.replace(tmp, path)
    finally:
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
