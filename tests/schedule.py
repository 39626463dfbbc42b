"""The order test files are handed to the xdist workers, from pytest's own duration data.

pyproject's addopts run the files on 2 workers (--dist loadfile: a file runs whole on one worker,
so its module fixtures, e.g. test_server's one PostgreSQL + mlflow server, exist once). Files are
handed out in collection order (--no-loadscope-reorder), so conftest sorts them longest first and
the short ones fill in at the end: both workers finish about together.

The durations are committed (tests/durations.json: seconds per file, setup + call + teardown of
its tests, as the reports measured them), since CI runs in a fresh clone without .pytest_cache.
`pytest --record-durations` (the whole suite) refreshes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")

# A file the durations don't know yet (new or renamed) counts as this many seconds: after the known
# long ones, before the short ones that fill in at the end, and in its collection order among equals.
UNKNOWN_FILE_S = 10.0


def file_of(nodeid: str) -> str:
    """'tests/test_x.py::test_y[1]' -> 'tests/test_x.py', the unit --dist loadfile hands out."""
    return nodeid.split("::", 1)[0]


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    try:
        return {str(name): float(seconds) for name, seconds in json.loads(path.read_text()).items()}
    except FileNotFoundError:
        return {}


def file_rank(files: Iterable[str], durations: Mapping[str, float]) -> dict[str, int]:
    """Each file's place: the longest first; files of equal (or unknown) length in the given order."""
    unique = list(dict.fromkeys(files))
    ordered = sorted(unique, key=lambda name: -durations.get(name, UNKNOWN_FILE_S))  # stable
    return {name: position for position, name in enumerate(ordered)}


def sort_by_file_duration(items: list, durations: Mapping[str, float]) -> None:
    """Sorts pytest items in place, whole files longest first; the order inside a file is kept."""
    rank = file_rank((file_of(item.nodeid) for item in items), durations)
    items.sort(key=lambda item: rank[file_of(item.nodeid)])


def merged_durations(old: Mapping[str, float], measured: Mapping[str, float], root: Path) -> dict[str, float]:
    """The new figures for the files that ran, the old ones for the rest, files gone from the
    repository dropped; longest first, so the file reads as the order it gives."""
    merged = {**old, **measured}
    kept = {name: round(seconds, 1) for name, seconds in merged.items() if (root / name).is_file()}
    return dict(sorted(kept.items(), key=lambda item: (-item[1], item[0])))


def write_durations(durations: Mapping[str, float], path: Path = DURATIONS) -> None:
    path.write_text(json.dumps(durations, indent=2) + "\n")
