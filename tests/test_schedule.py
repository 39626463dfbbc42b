"""The order the test files are handed to the workers (tests/schedule.py): longest first, from the
committed durations; a file they don't know after the known long ones; a file's own order kept."""

from __future__ import annotations

from types import SimpleNamespace

from tests import schedule


def items(*nodeids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(nodeid=nodeid) for nodeid in nodeids]


def test_files_go_longest_first_and_keep_their_own_order():
    collected = items("t/a.py::x", "t/a.py::y", "t/b.py::x", "t/c.py::x[1]", "t/c.py::x[2]", "t/b.py::y")
    schedule.sort_by_file_duration(collected, {"t/a.py": 1.0, "t/b.py": 50.0, "t/c.py": 20.0})
    assert [item.nodeid for item in collected] == [
        "t/b.py::x",
        "t/b.py::y",  # a file stays whole, in its order, even where collection interleaved it
        "t/c.py::x[1]",
        "t/c.py::x[2]",
        "t/a.py::x",
        "t/a.py::y",
    ]


def test_unknown_files_come_after_the_known_long_ones_in_their_order():
    long, short = schedule.UNKNOWN_FILE_S * 3, schedule.UNKNOWN_FILE_S / 3
    durations = {"t/long.py": long, "t/short.py": short, "t/longer.py": 2 * long}
    files = ["t/new2.py", "t/short.py", "t/long.py", "t/new1.py", "t/longer.py"]
    rank = schedule.file_rank(files, durations)
    assert sorted(rank, key=rank.get) == ["t/longer.py", "t/long.py", "t/new2.py", "t/new1.py", "t/short.py"]
    # Without any durations (no file yet), collection order.
    assert list(schedule.file_rank(files, {})) == files


def test_recorded_durations_merge_drop_missing_files_and_round_trip(tmp_path):
    (tmp_path / "t").mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (tmp_path / "t" / name).touch()
    old = {"t/a.py": 5.0, "t/b.py": 9.0, "t/gone.py": 100.0}
    merged = schedule.merged_durations(old, {"t/a.py": 12.345, "t/c.py": 0.04}, tmp_path)
    assert merged == {"t/a.py": 12.3, "t/b.py": 9.0, "t/c.py": 0.0}  # ran: new; not run: kept; deleted: dropped
    assert list(merged) == ["t/a.py", "t/b.py", "t/c.py"]  # written longest first
    path = tmp_path / "durations.json"
    schedule.write_durations(merged, path)
    assert schedule.load_durations(path) == merged
    assert schedule.load_durations(tmp_path / "none.json") == {}


def test_the_committed_durations_name_test_files_of_this_repository():
    durations = schedule.load_durations()
    assert durations, f"{schedule.DURATIONS} is missing: pytest --record-durations writes it"
    root = schedule.DURATIONS.parent.parent
    assert all((root / name).is_file() and name.startswith("tests/test_") for name in durations)
    assert all(seconds >= 0 for seconds in durations.values())
