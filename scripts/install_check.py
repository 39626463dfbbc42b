"""Would `make setup` install on another Python? pip resolves every pin for that version without installing.

Only the Python that runs the suite is tested; this checks the others can install at all: each pin
(and the dev extra) has a wheel for that version and platform, and requires-python admits it.

    python scripts/install_check.py 3.12 3.13
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements() -> tuple[list[str], SpecifierSet]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    pins = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return pins, SpecifierSet(project["requires-python"])


def check(version: str, pins: list[str], supported: SpecifierSet) -> str | None:
    """None if pip finds wheels for every pin on `version`, else why not."""
    if f"{version}.0" not in supported:
        return f"requires-python is {supported}"
    with tempfile.TemporaryDirectory() as target:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
             "--only-binary=:all:", "--python-version", version, "--target", target, *pins],
            capture_output=True, text=True,
        )  # fmt: skip
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["pip failed"])[-1]
    return None


def main(versions: list[str]) -> int:
    pins, supported = requirements()
    failed = 0
    for version in versions:
        why = check(version, pins, supported)
        print(f"Python {version}: {'installs' if why is None else 'FAILS: ' + why} ({len(pins)} pins)")
        failed += why is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["3.12", "3.13"]))
