"""The order test files are handed to the xdist workers, from pytest's own duration data.

pyproject's addopts run the files on 2 workers (--dist loadfile: a file runs whole on one worker,
so its module fixtures, e.g. test_server's one PostgreSQL + mlflow server, exist once). Files are
handed out in collection order (--no-loadscope-reorder), so conftest sorts them longest first and
the short ones fill in at the end: both workers finish about together.

The durations are committed (tests/durations.json: seconds per test, setup + call + teardown, as
pytest's reports measured them), since CI runs in a fresh clone without .pytest_cache. A file
weighs what its selected tests took, so the order also fits a selection (`-m "not slow"`, `-k`).
`pytest --record-durations` (the whole suite) refreshes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")

# A test the durations don't know yet counts as UNKNOWN_TEST_S in a file they know; a file they
# don't know at all (new or renamed) as UNKNOWN_FILE_S: after the known long ones, before the short
# ones that fill in at the end, and in its collection order among equals.
UNKNOWN_TEST_S = 1.0
UNKNOWN_FILE_S = 10.0


def file_of(nodeid: str) -> str:
    """'tests/test_x.py::test_y[1]' -> 'tests/test_x.py', the unit --dist loadfile hands out."""
    return nodeid.split("::", 1)[0]


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    try:
        return {str(nodeid): float(seconds) for nodeid, seconds in json.loads(path.read_text()).items()}
    except FileNotFoundError:
        return {}


def file_weights(nodeids: Iterable[str], durations: Mapping[str, float]) -> dict[str, float]:
    """Seconds per file for these tests, in the order the files first appear."""
    known_files = {file_of(nodeid) for nodeid in durations}
    weights: dict[str, float] = {}
    for nodeid in nodeids:
        name = file_of(nodeid)
        if name not in known_files:
            weights[name] = UNKNOWN_FILE_S
        else:
            weights[name] = weights.get(name, 0.0) + durations.get(nodeid, UNKNOWN_TEST_S)
    return weights


def file_rank(nodeids: Iterable[str], durations: Mapping[str, float]) -> dict[str, int]:
    """Each file's place: the heaviest first; files of equal weight in the order they come."""
    weights = file_weights(nodeids, durations)
    ordered = sorted(weights, key=lambda name: -weights[name])  # stable
    return {name: position for position, name in enumerate(ordered)}


def sort_by_file_duration(items: list, durations: Mapping[str, float]) -> None:
    """Sorts pytest items in place, whole files heaviest first; the order inside a file is kept."""
    rank = file_rank((item.nodeid for item in items), durations)
    items.sort(key=lambda item: rank[file_of(item.nodeid)])


def merged_durations(old: Mapping[str, float], measured: Mapping[str, float], root: Path) -> dict[str, float]:
    """The new figures for the files that ran (their old entries dropped: renamed or removed tests
    go), the old ones for the other files, files gone from the repository dropped; longest first."""
    ran = {file_of(nodeid) for nodeid in measured}
    merged = {nodeid: seconds for nodeid, seconds in old.items() if file_of(nodeid) not in ran}
    merged.update(measured)
    kept = {nodeid: round(seconds, 2) for nodeid, seconds in merged.items() if (root / file_of(nodeid)).is_file()}
    return dict(sorted(kept.items(), key=lambda item: (-item[1], item[0])))


def write_durations(durations: Mapping[str, float], path: Path = DURATIONS) -> None:
    path.write_text(json.dumps(durations, indent=1) + "\n")
