"""What it takes to reproduce a run: the library versions and the git commit of the code.

Read from package metadata and git, never by importing the libraries, so asking costs
nothing and works in the torch-free predictor too. `mlflow run` records the commit itself
(tag mlflow.source.git.commit); `pipeline train` started by hand needs it from here.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

from pipeline.config import project_root

# The distributions whose versions decide what a run computes, and the param each one goes to.
TRACKED_PACKAGES: tuple[str, ...] = ("torch", "torchvision", "mlflow", "onnx", "onnxruntime", "numpy")
UNKNOWN = "unknown"


def library_versions() -> dict[str, str]:
    """{"torch_version": "2.14.1+cu130", ..., "python_version": "3.11.2"}; "unknown" when not installed.

    A library already imported reports its own __version__, which for torch names the build
    (+cpu, +cu130) that the package metadata leaves out.
    """
    found = {}
    for package in TRACKED_PACKAGES:
        loaded = getattr(sys.modules.get(package), "__version__", None)
        try:
            found[f"{package}_version"] = str(loaded or version(package))
        except PackageNotFoundError:
            found[f"{package}_version"] = UNKNOWN
    found["python_version"] = platform.python_version()
    return found


def git_commit() -> str:
    """The checkout's HEAD commit, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    root = project_root()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return f"{commit}-dirty" if dirty else commit
