"""The order the test files are handed to the workers (tests/schedule.py): heaviest first, from the
committed per-test durations of the tests selected; a file they don't know after the known long
ones; a file's own order kept."""

from __future__ import annotations

from types import SimpleNamespace

from tests import schedule


def items(*nodeids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(nodeid=nodeid) for nodeid in nodeids]


def test_files_go_heaviest_first_and_keep_their_own_order():
    collected = items("t/a.py::x", "t/a.py::y", "t/b.py::x", "t/c.py::x[1]", "t/c.py::x[2]", "t/b.py::y")
    durations = {"t/a.py::x": 1.0, "t/a.py::y": 0.5, "t/b.py::x": 40.0, "t/b.py::y": 10.0, "t/c.py::x[1]": 20.0}
    schedule.sort_by_file_duration(collected, {**durations, "t/c.py::x[2]": 0.1})
    assert [item.nodeid for item in collected] == [
        "t/b.py::x",
        "t/b.py::y",  # a file stays whole, in its order, even where collection interleaved it
        "t/c.py::x[1]",
        "t/c.py::x[2]",
        "t/a.py::x",
        "t/a.py::y",
    ]


def test_a_file_weighs_what_its_selected_tests_took():
    durations = {"t/slow.py::big": 100.0, "t/slow.py::small": 1.0, "t/mid.py::x": 20.0}
    everything = ["t/slow.py::big", "t/slow.py::small", "t/mid.py::x"]
    assert list(schedule.file_rank(everything, durations)) == ["t/slow.py", "t/mid.py"]
    # Without its big test (-m "not slow"), the file is light and goes after the other.
    assert list(schedule.file_rank(["t/slow.py::small", "t/mid.py::x"], durations)) == ["t/mid.py", "t/slow.py"]
    # A test they don't know yet, in a file they know, counts as UNKNOWN_TEST_S.
    weights = schedule.file_weights(["t/mid.py::x", "t/mid.py::new"], durations)
    assert weights == {"t/mid.py": 20.0 + schedule.UNKNOWN_TEST_S}


def test_unknown_files_come_after_the_known_long_ones_in_their_order():
    long, short = schedule.UNKNOWN_FILE_S * 3, schedule.UNKNOWN_FILE_S / 3
    durations = {"t/long.py::x": long, "t/short.py::x": short, "t/longer.py::x": 2 * long}
    nodeids = ["t/new2.py::x", "t/short.py::x", "t/long.py::x", "t/new1.py::x", "t/new1.py::y", "t/longer.py::x"]
    rank = schedule.file_rank(nodeids, durations)
    assert sorted(rank, key=rank.get) == ["t/longer.py", "t/long.py", "t/new2.py", "t/new1.py", "t/short.py"]
    # Without any durations (no file yet), collection order.
    assert list(schedule.file_rank(nodeids, {})) == ["t/new2.py", "t/short.py", "t/long.py", "t/new1.py", "t/longer.py"]


def test_recorded_durations_merge_by_file_drop_what_is_gone_and_round_trip(tmp_path):
    (tmp_path / "t").mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (tmp_path / "t" / name).touch()
    old = {"t/a.py::x": 5.0, "t/a.py::renamed": 3.0, "t/b.py::x": 9.0, "t/gone.py::x": 100.0}
    merged = schedule.merged_durations(old, {"t/a.py::x": 12.3456, "t/c.py::x": 0.001}, tmp_path)
    # Files that ran: their new figures only; not run: kept; deleted: dropped. Longest first.
    assert merged == {"t/a.py::x": 12.35, "t/b.py::x": 9.0, "t/c.py::x": 0.0}
    assert list(merged) == ["t/a.py::x", "t/b.py::x", "t/c.py::x"]
    path = tmp_path / "durations.json"
    schedule.write_durations(merged, path)
    assert schedule.load_durations(path) == merged
    assert schedule.load_durations(tmp_path / "none.json") == {}


def test_the_committed_durations_are_tests_of_this_repository():
    """A file renamed since the last refresh only falls back to the guesses; a missing or empty one
    would leave the whole order to them."""
    durations = schedule.load_durations()
    assert durations, f"{schedule.DURATIONS} is missing: pytest --record-durations writes it"
    assert all(nodeid.startswith("tests/test_") and "::" in nodeid for nodeid in durations)
    assert all(seconds >= 0 for seconds in durations.values())
    root = schedule.DURATIONS.parent.parent
    assert (root / schedule.file_of(next(iter(durations)))).is_file()  # the longest test's file
