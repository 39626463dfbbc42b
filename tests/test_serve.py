"""`mlflow models serve` answers /invocations with the logits of the ONNX model that
`pipeline export-onnx` logged, the same logits onnxruntime gives locally. It serves it the
way the README does: by the registry alias that `pipeline promote` moves, models:/NAME@champion."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import load_split
from pipeline.predict import Predictor

STARTUP_TIMEOUT_S = 180  # a cold start on a busy 2-core machine; usually ~15 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def post_json(url: str, payload: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until_up(server: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if get(url)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url} in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """Stop mlflow and the uvicorn it started: they share the session started for them."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_onnx_logits(champion_uri, use_trained_run, trained_onnx, tmp_path):
    bin_dir = Path(sys.executable).parent  # the venv's mlflow, and the uvicorn it execs by name
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", champion_uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(server, f"{base}/ping", log)
        images = load_split(use_trained_run["data_dir"], "test").images[:6]
        batch = (images[:, None] / np.float32(255)).astype(np.float32)
        answer = post_json(f"{base}/invocations", {"inputs": batch.tolist()})
        logits = np.asarray(answer["predictions"]["logits"], dtype=np.float32)
        expected = Predictor(trained_onnx).predict_logits(batch)
        assert logits.shape == (6, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
        # A malformed request is refused with a client error, and the server keeps serving.
        try:
            post_json(f"{base}/invocations", {"inputs": [[1.0, 2.0]]})
            raise AssertionError("a (1, 2) input was accepted")
        except urllib.error.HTTPError as exc:
            assert 400 <= exc.code < 500
        assert get(f"{base}/ping")[0] == 200
    finally:
        stop(server)
    assert server.poll() is not None
    assert group_is_gone(server.pid), "uvicorn outlived `mlflow models serve`"


def group_is_gone(pgid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
