"""`pip install ARGS`, done by uv with pip's own configuration: the same indexes, links and constraints.

pip unpacks one wheel at a time; torch's CUDA build is 6 GB of them, which takes pip about 70 s
here and uv about 15 s. uv does not read pip's configuration, so this passes it on: without it,
uv would download torch from PyPI instead of taking the copy this machine's pip config points
at. Exits non-zero on any failure, so that the Makefile falls back to plain pip.

    python scripts/uv_install.py -e '.[dev]'
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

# pip option -> uv option; values may hold several space-separated entries, as in pip.
PASSED_ON = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_config() -> dict[str, list[str]]:
    """pip's effective settings (files and PIP_* variables), as `pip config list` shows them."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    settings: dict[str, list[str]] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]  # 'global.find-links' and ':env:.find-links' alike
        for entry in shlex.split(value)[0].split() if value else []:
            if entry not in settings.setdefault(name, []):
                settings[name].append(entry)
    return settings


def uv_command(args: list[str], settings: dict[str, list[str]]) -> list[str]:
    # pip takes the best version across all its indexes; uv's default stops at the first index
    # that has the package at all.
    command = [sys.executable, "-m", "uv", "pip", "install", "--python", sys.executable]
    command += ["--index-strategy", "unsafe-best-match"]
    # pip writes every module's bytecode at install time and uv does not: without this, a process
    # run with PYTHONDONTWRITEBYTECODE (as here) compiles torch and mlflow from source at each start.
    command += ["--compile-bytecode"]
    for name, flag in PASSED_ON.items():
        for value in settings.get(name, []):
            command += [flag, value]
    return command + args


def main() -> int:
    settings = pip_config()
    env = dict(os.environ)
    if settings.get("cert"):
        env.setdefault("SSL_CERT_FILE", settings["cert"][0])  # the CA bundle pip was told to trust
    return subprocess.run(uv_command(sys.argv[1:], settings), env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
