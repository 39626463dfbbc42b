"""`mlflow models serve` answers /invocations with the logits of the ONNX model that
`pipeline export-onnx` logged, the same logits onnxruntime gives locally, and, from the image model
logged beside it, the classes of photos posted as base64, the same classes `pipeline predict` gives.
It serves them the way docs/stages/register.md does: by the registry alias that `pipeline promote`
moves, models:/NAME@champion and models:/NAME-images@champion."""

from __future__ import annotations

import base64
import contextlib
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
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.bench.photos import write_photos
from pipeline.cli import cli
from pipeline.data import load_split
from pipeline.predict import Predictor
from pipeline.tracking import registry

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


@contextlib.contextmanager
def serving(model_uri: str, tmp_path: Path):
    """`mlflow models serve` of the model on a free loopback port, as docs/stages/register.md runs it;
    yields (base URL, the server process, its log), and stops it and the uvicorn it started."""
    bin_dir = Path(sys.executable).parent  # the venv's mlflow, and the uvicorn it execs by name
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(server, f"{base}/ping", log)
        yield base, server, log
    finally:
        stop(server)
    assert server.poll() is not None
    assert group_is_gone(server.pid), "uvicorn outlived `mlflow models serve`"


def client_error(url: str, payload: dict) -> int:
    """The status of a request that must be refused (a 4xx, never a 500)."""
    try:
        post_json(url, payload)
    except urllib.error.HTTPError as exc:
        return exc.code
    raise AssertionError(f"{payload} was accepted")


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_onnx_logits(champion_uri, use_trained_run, trained_onnx, tmp_path):
    with serving(champion_uri, tmp_path) as (base, _, _):
        images = load_split(use_trained_run["data_dir"], "test").images[:6]
        batch = (images[:, None] / np.float32(255)).astype(np.float32)
        answer = post_json(f"{base}/invocations", {"inputs": batch.tolist()})
        logits = np.asarray(answer["predictions"]["logits"], dtype=np.float32)
        expected = Predictor(trained_onnx).predict_logits(batch)
        assert logits.shape == (6, 10)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
        # A malformed request is refused with a client error, and the server keeps serving.
        assert 400 <= client_error(f"{base}/invocations", {"inputs": [[1.0, 2.0]]}) < 500
        assert get(f"{base}/ping")[0] == 200


@pytest.mark.slow
def test_the_images_model_serves_photos_as_predict_classifies_them(
    champion_uri, use_trained_run, trained_onnx, tmp_path
):
    """models:/NAME-images@champion, which `register` and `promote` keep with the ONNX model, takes
    PNG and JPEG photos as base64 in MLflow's JSON and answers what `pipeline predict` answers."""
    paths = write_photos(load_split(use_trained_run["data_dir"], "test").images[:8], tmp_path / "photos")
    assert {p.suffix for p in paths} == {".jpg", ".png"}
    out = tmp_path / "predicted.csv"
    result = CliRunner().invoke(cli, ["predict", "--model", str(trained_onnx), "-o", str(out), *map(str, paths)])
    assert result.exit_code == 0, result.output
    expected = pd.read_csv(out)
    assert (expected["preprocessing"] == "whitened,trimmed,inverted").all()

    payloads = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    payloads.append(base64.b64encode(b"a text file, not a photo").decode())
    images_uri = champion_uri.replace("@", f"{registry.IMAGES_SUFFIX}@")
    with serving(images_uri, tmp_path) as (base, _, log):
        url = f"{base}/invocations"
        answer = post_json(url, {"dataframe_split": {"columns": ["image"], "data": [[p] for p in payloads]}})
        rows = answer["predictions"]
        assert [row["class"] for row in rows[:-1]] == expected["predicted_class"].tolist()
        assert [row["class_id"] for row in rows[:-1]] == expected["predicted_id"].tolist()
        np.testing.assert_allclose([row["probability"] for row in rows[:-1]], expected["confidence"], atol=1e-5)
        assert all(len(row["top_k"]) == 3 and row["top_k"][0]["class"] == row["class"] for row in rows[:-1])
        # Not an image: an error in its row, the other rows answered.
        assert rows[-1]["class"] is None and "not an image" in rows[-1]["error"]
        # The `inputs` form, and top_k as a parameter.
        answer = post_json(url, {"inputs": {"image": payloads[:2]}, "params": {"top_k": 5}})
        assert [row["class"] for row in answer["predictions"]] == expected["predicted_class"].tolist()[:2]
        assert len(answer["predictions"][0]["top_k"]) == 5
        # Malformed requests: a client error each, never a 500, and the server keeps serving.
        for bad in (
            {"dataframe_split": {"columns": ["image"], "data": [["not base64 !"]]}},
            {"dataframe_split": {"columns": ["picture"], "data": [[payloads[0]]]}},
            {"images": payloads[:1]},
        ):
            assert 400 <= client_error(url, bad) < 500, bad
        assert get(f"{base}/ping")[0] == 200
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_the_images_model_loads_without_torch(champion_uri, use_trained_run, tmp_path):
    """The served image model's code is the conversion and onnxruntime: loading and using it imports no torch."""
    photo = tmp_path / "photo.png"
    write_photos(load_split(use_trained_run["data_dir"], "test").images[:1], tmp_path / "p", formats=("png",))[
        0
    ].rename(photo)
    images_uri = champion_uri.replace("@", f"{registry.IMAGES_SUFFIX}@")
    code = (
        "import sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({images_uri!r})\n"
        f"rows = model.predict(pd.DataFrame({{'image': [open({str(photo)!r}, 'rb').read()]}}))\n"
        "assert rows['error'].isna().all() and rows['class'].notna().all(), rows\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # MLFLOW_TRACKING_URI comes from use_trained_run


def group_is_gone(pgid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
