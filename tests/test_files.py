"""The one atomic writer: whole file or nothing, 0644, clear error for an unwritable folder."""

from __future__ import annotations

import stat

import pytest

from pipeline.errors import PipelineError
from pipeline.files import atomic_write, write_bytes


def test_writes_whole_file_readable_by_others(tmp_path):
    path = write_bytes(tmp_path / "out.bin", b"abc")
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failure_inside_the_block_leaves_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path, "w") as handle:
            handle.write("half a new ")
            raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_unwritable_folder_is_a_clear_error(tmp_path):
    not_a_folder = tmp_path / "raw"
    not_a_folder.write_text("a file where a folder should be")
    with pytest.raises(PipelineError, match=r"cannot write .*raw/x"):
        write_bytes(not_a_folder / "x", b"data")


def test_figures_are_readable_by_others(tmp_path):
    import os

    import numpy as np

    from pipeline.config import CLASS_NAMES
    from pipeline.figures import confusion_matrix_figure, save_figure

    old = os.umask(0o077)  # the strictest usual umask: mkstemp's 0600 would stay 0600
    try:
        path = save_figure(confusion_matrix_figure(np.eye(10, dtype=int), CLASS_NAMES), tmp_path / "cm.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_bytes()[:4] == b"\x89PNG"


def test_a_sigterm_landing_as_the_temporary_file_is_made_still_removes_it(tmp_path, monkeypatch):
    """SIGTERM right after mkstemp made the file, before atomic_write could take charge of it (as a
    busy machine can deschedule a process there): Terminated is raised and no temporary file is left."""
    import os
    import signal
    import tempfile

    from pipeline import files, signals

    made, mkstemp = [], tempfile.mkstemp

    def mkstemp_then_sigterm(**kwargs):
        fd, name = mkstemp(**kwargs)
        made.append(name)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs at the next bytecode, here
        return fd, name

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp_then_sigterm)  # tempfile's own, undone after the test
    try:
        with pytest.raises(signals.Terminated), signals.sigterm_raises():
            with atomic_write(tmp_path / "out.csv", "w") as handle:
                handle.write("never written")
    finally:
        signals._received.clear()
    assert len(made) == 1 and list(tmp_path.iterdir()) == []
