"""Real `python -m pipeline ...` processes for the tests, without each one's seconds of imports.

A fresh interpreter spends about 4 s of CPU importing torch (with dynamo, which the first optimizer
pulls in) and mlflow before the pipeline does anything; on 2 cores a test that starts four clients
at once pays that four times over. `WarmPopen(command, ...)` takes the command a test would give
`subprocess.Popen`, `[sys.executable, "-m", module, *args]` or `[sys.executable, "-c", code, *args]`,
and runs it in a process forked from a multiprocessing forkserver that has those modules imported
(and nothing else run: no thread pool, no store, no run). The rest is a process of its own: its own
pid, environment, working folder, signals, stdio and exit code, reaped like a child. At its end it
does what an interpreter does on exit (threading's exit hooks run and non-daemon threads joined,
atexit handlers run, stdio flushed).

What it cannot stand in for: a process whose imports are the subject (predict staying torch-free,
the --max-cpu-isa cap, which must act before torch loads) and commands that start their own
interpreters (torchrun, `mlflow run`, `mlflow server`). Those tests use subprocess, as before.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback
from multiprocessing import reduction
from typing import IO, Any

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["tests.warm_imports", __name__])


class _Fd:
    """A file descriptor handed to the forked process (multiprocessing passes it over the forkserver's socket)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _Fd._rebuilt, (reduction.DupFd(self.fd),)

    @staticmethod
    def _rebuilt(dup) -> _Fd:
        return _Fd(dup.detach())


def _exit_status(code: Any) -> int:
    """What the interpreter makes of SystemExit's code."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run(command: list[str], env: dict[str, str], cwd: str | None, stdio: list[_Fd | None]) -> None:
    """In the forked process: become `python <command>` and exit as it would."""
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for target, given in enumerate(stdio):
        if given is not None:
            os.dup2(given.fd, target)
    for given in {g.fd for g in stdio if g is not None}:
        os.close(given)
    # Fresh text streams over fds 0-2, as a new interpreter has (multiprocessing put devnull on stdin).
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    if "OMP_NUM_THREADS" in env:  # read by torch when its pool starts, which a fresh process does after this
        import torch  # already imported by the forkserver (tests/warm_imports.py)

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    status = 0
    try:
        option, target, *args = command[1:]
        if option == "-m":
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = ["-c", *args]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as exit:
        status = _exit_status(exit.code)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        # What the interpreter calls first on exit: threading's own exit hooks (concurrent.futures tells
        # its idle pool workers to stop there), then every non-daemon thread joined. Joined without
        # the hooks, a pool nobody collected yet (MLflow's artifact uploads) would wait forever.
        threading._shutdown()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)


class WarmPopen:
    """The part of subprocess.Popen the tests use, for a command run warm (see the module's docstring).

    stdin may be PIPE; stdout and stderr PIPE (or stderr STDOUT), read through files, so a child that
    writes a lot never blocks on a full pipe.
    """

    def __init__(
        self,
        command: list[str],
        env: dict[str, str] | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        text: bool = False,
        cwd: str | os.PathLike | None = None,
    ):
        if command[:1] != [sys.executable] or len(command) < 3 or command[1] not in ("-m", "-c"):
            raise ValueError(f"not a `{sys.executable} -m|-c` command: {command[:3]}")
        self.args = command
        self.stdin: IO | None = None
        self.stdout: IO | None = None
        self.stderr: IO | None = None
        child_ends: list[_Fd | None] = [None, None, None]
        to_close: list[int] = []
        if stdin == subprocess.PIPE:
            read, write = os.pipe()
            child_ends[0] = _Fd(read)
            to_close.append(read)
            self.stdin = open(write, "w" if text else "wb")  # noqa: SIM115
        for index, (name, spec) in enumerate((("stdout", stdout), ("stderr", stderr)), start=1):
            if spec == subprocess.STDOUT:
                child_ends[index] = child_ends[1]
            elif spec == subprocess.PIPE:
                # A file, opened twice: the child's writes and our reads keep offsets of their own.
                fd, path = tempfile.mkstemp(prefix=f"warm-{name}-")
                child_ends[index] = _Fd(fd)
                to_close.append(fd)
                setattr(self, name, open(path, "r" if text else "rb"))  # noqa: SIM115
                os.unlink(path)
            elif spec is not None:
                raise ValueError(f"{name}={spec!r}: only PIPE (and stderr=STDOUT) or None")
        self._process = _CONTEXT.Process(
            target=_run, args=(command, dict(os.environ if env is None else env), cwd and str(cwd), child_ends)
        )
        try:
            self._process.start()
        finally:
            for fd in to_close:
                os.close(fd)
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        if self.stdin is not None and not self.stdin.closed:
            self.stdin.close()
        self.wait(timeout)
        return tuple(stream.read() if stream is not None else None for stream in (self.stdout, self.stderr))

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # never a pid that may belong to another process by now
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        if self.poll() is None:
            self._process.kill()
