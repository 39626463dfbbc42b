"""Hostile input, round two (issue 21): every row's exact input gets one clear line and a non-zero
exit, never a traceback; a command that refuses before it starts leaves no run, and nothing is
written outside the place the command was meant to write.

Servers the tests talk to listen on 127.0.0.1 (or ::1) only, and every request loop is bounded.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline import cli_args, data, processes, server
from pipeline.cli import cli
from pipeline.config import MAX_EXPERIMENT_NAME_LENGTH, MAX_NPROC, ONNX_OPSETS, TrainConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_write, temporary_folder
from pipeline.idx import encode_idx

REPO = Path(__file__).resolve().parent.parent


def T(data_dir: Path, *extra: str) -> list[str]:
    """The issue's T: `pipeline train --model dnn --max-steps 5 --no-system-metrics --experiment e`,
    on the synthetic data."""
    args = ["train", "--model", "dnn", "--max-steps", "5", "--no-system-metrics", "--experiment", "e"]
    return args + ["--allow-other-data", "--data-dir", str(data_dir), *extra]


def refused(result, exit_code: int | None = None) -> str:
    """The one error line of a command that failed cleanly."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code != 0 if exit_code is None else result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def no_runs() -> bool:
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return not experiments or not client.search_runs(experiments)


def invoke(args: list[str], **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def dead_pid() -> int:
    """The pid of a process that has exited (and been collected)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def sleeper():
    """A process of the test's own, a group leader as the tracking server is: `sleep 600`."""
    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    yield child
    child.kill()
    child.wait()


# ----------------------------------------------------------------- 1. download: a deadline and a size cap


# A byte every DRIP_S: each read is answered well within the download's --timeout, so only a
# deadline for the whole transfer can stop it.
DRIP_S = 0.2


class Drip(http.server.BaseHTTPRequestHandler):
    """Answers every GET slowly or without end, as `mode` says; every loop is bounded and stops with the test."""

    mode = "body"
    stop: threading.Event

    def log_message(self, *args):
        pass

    def do_GET(self):
        try:
            if self.mode == "headers":  # the status line itself, five bytes a second
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"[:60]:
                    if self.stop.wait(DRIP_S):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
            elif self.mode == "body":  # headers at once, then five bytes a second of a 10 MB body
                self.send_response(200)
                self.send_header("Content-Length", str(10_000_000))
                self.end_headers()
                for _ in range(300):
                    self.wfile.write(b"\x1f")
                    self.wfile.flush()
                    if self.stop.wait(DRIP_S):
                        return
            else:  # endless: zeros as fast as the client takes them, up to 4x the cap
                self.send_response(200)
                self.end_headers()
                chunk = bytes(1 << 16)
                for _ in range(4 * data.MAX_SOURCE_BYTES // len(chunk)):
                    if self.stop.is_set():
                        return
                    self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def hostile_source(monkeypatch):
    """Start a Drip server in a mode; only it is a source (no Debian copy, no mirrors)."""
    monkeypatch.setattr(data, "SYSTEM_COPY", Path("/nonexistent/fashion-mnist"))
    monkeypatch.setattr(data, "TORCHVISION_MIRRORS", ())
    started = []

    def start(mode: str) -> str:
        stop = threading.Event()
        handler = type("Handler", (Drip,), {"mode": mode, "stop": stop})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        started.append((httpd, stop))
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield start
    for httpd, stop in started:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("mode", ["body", "headers"])
def test_download_timeout_is_a_deadline_for_the_whole_transfer(hostile_source, tmp_path, mode):
    url = hostile_source(mode)
    began = time.monotonic()
    result = invoke(["download", "--source", url, "--timeout", "1", "--data-dir", tmp_path / "data"])
    took = time.monotonic() - began
    assert took < 10, f"a 1 s deadline took {took:.0f} s"
    line = refused(result, 1)
    assert "could not find" in line
    assert f"{url}: no complete answer within --timeout 1 s" in result.output
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_endless_body_stops_at_the_cap_on_disk_not_in_memory(hostile_source, tmp_path):
    import tracemalloc

    url = hostile_source("endless")
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError) as info:
            data.download(tmp_path / "data", data.default_sources(url, timeout=30))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and f"larger than {data.MAX_SOURCE_BYTES:,} bytes" in message and url in message
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB in memory"  # the cap is 64 MiB, and it went to disk
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    # And through the CLI: one line, exit 1.
    result = invoke(["download", "--source", url, "--timeout", "30", "--data-dir", tmp_path / "data"])
    assert "larger than" in refused(result, 1)


def test_the_cap_covers_the_largest_real_file():
    assert max(data.SIZES.values()) < data.MAX_SOURCE_BYTES  # a raw train-images file still fits


# ----------------------------------------------------------------- 2. server stop/start: only the server we started


def server_json(folder: Path, pid: int, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "url": "http://127.0.0.1:5050",
        "pid": pid,
        "db": "sqlite",
        "backend_store_uri": "sqlite:///x.db",
        "artifacts_destination": str(folder / "artifacts"),
        "log": str(folder / "mlflow-server.log"),
        **extra,
    }
    (folder / "server.json").write_text(json.dumps(state))
    return folder / "server.json"


def mlflow_server_identity(pid: int) -> dict:
    """What `server start` records, for a pid that is now some other process: a different start time."""
    start = processes.identity(pid).start_time
    return {"start_time": start + 1, "command": [sys.executable, "-m", "mlflow", "server", "--port", "5050"]}


@pytest.mark.parametrize("recorded", ["nothing (an older server.json)", "another process", "a non-mlflow command"])
def test_server_stop_never_signals_a_pid_that_is_another_process_now(sleeper, tmp_path, recorded):
    if recorded == "another process":
        extra = mlflow_server_identity(sleeper.pid)
    elif recorded == "a non-mlflow command":  # the sleep's true identity: still not a server of ours
        me = processes.identity(sleeper.pid)
        extra = {"start_time": me.start_time, "command": list(me.command)}
    else:
        extra = {}
    state = server_json(tmp_path / "srv", sleeper.pid, **extra)
    result = invoke(["server", "stop", "--folder", tmp_path / "srv"])
    line = refused(result, 1)
    assert f"pid {sleeper.pid} (sleep 600)" in line and "not signalled" in line
    time.sleep(0.2)
    assert sleeper.poll() is None  # still alive: not SIGTERMed, not SIGKILLed
    assert state.is_file()  # refused: nothing changed


def test_the_identity_recorded_at_launch_is_the_one_later_checks_see():
    """Read at once after Popen (when /proc/PID/cmdline may still be empty mid-exec), the recorded
    identity must still be the child's: stop relies on it to signal only the server it started."""
    argv = [sys.executable, "-c", "import time; time.sleep(600)", "mlflow", "server"]
    for _ in range(20):  # the empty-cmdline window is short: try it often
        child = subprocess.Popen(argv)
        try:
            recorded = processes.launched(child.pid, argv)
            assert recorded.command == tuple(argv) and recorded.start_time > 0
            assert processes.same_process(recorded) is True  # even while its cmdline may read empty
            deadline = time.monotonic() + 30
            while not (now := processes.identity(child.pid)).command:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert now == recorded and processes.same_process(recorded) is True
        finally:
            child.kill()
            child.wait()
        assert processes.same_process(recorded) is None  # reaped: no process has that pid


def test_server_start_does_not_replace_a_pid_that_is_another_process_now(sleeper, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        folder = tmp_path / "srv"
        server_json(folder, sleeper.pid, url=f"http://127.0.0.1:{port}", **mlflow_server_identity(sleeper.pid))
        result = invoke(["server", "start", "--port", port, "--folder", folder])
    assert f"port {port} on 127.0.0.1 is in use" in refused(result, 1)
    time.sleep(0.2)
    assert sleeper.poll() is None


def test_server_stop_still_stops_the_process_it_recorded(tmp_path):
    # A stand-in whose command line reads like mlflow's server (sys.argv after -c is kept).
    code = "import time; time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code, "mlflow", "server"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while (found := processes.identity(child.pid)) is None or "mlflow" not in found.command:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server_json(tmp_path / "srv", child.pid, start_time=found.start_time, command=list(found.command))
        result = invoke(["server", "stop", "--folder", tmp_path / "srv"])
        assert result.exit_code == 0 and f"Stopped mlflow server at http://127.0.0.1:5050 (pid {child.pid})" in (
            result.output
        )
        child.wait(timeout=30)  # (stop may have collected it already: it is the test's child)
        assert not processes.alive(child.pid)
        assert not (tmp_path / "srv" / "server.json").exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# ----------------------------------------------------------------- 3. server folders and state files


def test_server_start_in_a_folder_under_proc_is_one_line():
    result = invoke(["server", "start", "--folder", "/proc/x", "--port", free_port()])
    assert "cannot write the server folder /proc/x" in refused(result, 1)


def test_server_start_in_a_read_only_folder_is_one_line_and_writes_nothing(tmp_path, make_unwritable):
    (tmp_path / "srv").mkdir()
    folder = make_unwritable(tmp_path / "srv")
    result = invoke(["server", "start", "--folder", folder, "--port", free_port()])
    assert f"cannot write the server folder {folder}: not writable" in refused(result, 1)
    assert list(folder.iterdir()) == []


@pytest.fixture
def tmp_srv(tmp_path) -> Path:
    (tmp_path / "srv").mkdir()
    return tmp_path / "srv"


def test_server_stop_in_a_read_only_folder_is_one_line(tmp_srv, make_unwritable):
    server_json(tmp_srv, dead_pid())  # a server that is gone: stop removes its state file
    make_unwritable(tmp_srv)
    result = invoke(["server", "stop", "--folder", tmp_srv])
    assert f"cannot remove {tmp_srv / 'server.json'}" in refused(result, 1)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"pid": 12}', "NOT_A_STATE", '{"url": "x", "pid": "12"}'])
@pytest.mark.parametrize("command", ["start", "stop"])
def test_a_corrupt_server_json_is_one_line(tmp_srv, content, command):
    if content == "NOT_A_STATE":  # the right keys, but a pid no server has (0 would be our own group)
        state = server_json(tmp_srv, 0)
        content = state.read_text()
    (tmp_srv / "server.json").write_text(content)
    result = invoke(["server", command, "--folder", tmp_srv, *(["--port", free_port()] if command == "start" else [])])
    line = refused(result, 1)
    assert f"{tmp_srv / 'server.json'} is not a state file `pipeline server start` wrote" in line
    assert (tmp_srv / "server.json").read_text() == content
    assert [p.name for p in tmp_srv.iterdir()] == ["server.json"]


# ----------------------------------------------------------------- 4. the host: its own address family; unresolvable


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def ipv6_loopback() -> bool:
    try:
        free_port("::1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_server_start_on_ipv6_probes_ipv6(tmp_path):
    port = free_port("::1")
    assert server._listen_problem("::1", port) is None  # the IPv4 probe called it "in use"
    assert server.ServerConfig(host="::1", port=port, folder=tmp_path).url == f"http://[::1]:{port}"
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", port))
        taken.listen()
        result = invoke(["server", "start", "--host", "::1", "--port", port, "--folder", tmp_path / "srv"])
    assert f"port {port} on ::1 is in use" in refused(result, 1)
    assert not (tmp_path / "srv").exists()


def test_server_start_on_an_unresolvable_host_says_so(tmp_path):
    result = invoke(["server", "start", "--host", "no.such.host.invalid", "--folder", tmp_path / "srv"])
    line = refused(result, 1)
    assert "--host no.such.host.invalid: cannot resolve it" in line and "in use" not in line
    assert not (tmp_path / "srv").exists()


# ----------------------------------------------------------------- 5. an explicit empty value is an error


@pytest.mark.parametrize(
    "args",
    [
        ["--resume", ""],
        ["--experiment", ""],
        ["register", "--run-id", "x", "--name", ""],
        ["download", "--source", ""],
        ["predict", "--model", "", "x.npy"],
        ["evaluate", "--run-id", " "],
    ],
    ids=["train --resume", "train --experiment", "register --name", "download --source", "predict", "evaluate"],
)
def test_an_empty_value_is_an_error_not_the_default(synthetic_data_dir, tracking_store, tmp_path, args):
    if args[0].startswith("--"):
        args = T(synthetic_data_dir, *args)
    elif args[0] == "download":
        args = [*args, "--data-dir", str(tmp_path / "data")]
    result = invoke(args)
    assert "it is empty (an unset variable?): give a value" in refused(result, 2)
    assert no_runs()
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------- 6. float options: finite, in range


@pytest.mark.parametrize(
    "option, value",
    [
        ("--weight-decay", "nan"),
        ("--weight-decay", "inf"),
        ("--weight-decay", "-1"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--label-smoothing", "nan"),
    ],
)
def test_float_options_must_be_finite_before_any_run(synthetic_data_dir, tracking_store, option, value):
    result = invoke(T(synthetic_data_dir, option, value))
    line = refused(result, 2)
    assert option in line
    assert no_runs()


def test_a_train_config_refuses_a_non_finite_weight_decay():
    for value in (float("nan"), float("inf")):
        with pytest.raises(PipelineError, match="weight_decay must be a finite number"):
            TrainConfig(weight_decay=value)


def test_bench_timing_seconds_must_be_finite(tmp_path):
    for value in ("nan", "inf"):
        result = invoke(["bench", "--timing-seconds", value, "--output-dir", tmp_path / "bench"])
        assert "--timing-seconds" in refused(result, 2)
    assert not (tmp_path / "bench").exists()


# ----------------------------------------------------------------- 7. batch sizes bounded by the data


def test_a_train_batch_larger_than_the_training_set_is_refused_before_any_run(synthetic_data_dir, tracking_store):
    result = invoke(T(synthetic_data_dir, "--batch-size", "99999999999999999999"))
    line = refused(result, 1)
    assert "--batch-size 99999999999999999999 is more than the 600 training images" in line
    assert "--batch-size 600 or less" in line
    assert no_runs()
    # With a validation split, the images left to train on are the bound.
    result = invoke(T(synthetic_data_dir, "--batch-size", "501", "--val-size", "100"))
    assert "is more than the 500 training images" in refused(result, 1)
    assert no_runs()


def test_predict_allocates_for_the_inputs_there_are(trained_onnx, tmp_path):
    import tracemalloc

    np.save(tmp_path / "x.npy", np.zeros((3, 28, 28), np.uint8))
    tracemalloc.start()
    try:
        result = invoke(
            ["predict", "--model", trained_onnx, "--batch-size", 10**9, "-o", tmp_path / "p.csv", tmp_path / "x.npy"]
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 3
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"  # 10**9 images would be 2.9 TiB
    typed = invoke(["predict", "--model", trained_onnx, "--batch-size", "1e9", "x"])
    assert "'1e9' is not a valid integer" in refused(typed, 2)


def test_iter_batches_grows_its_buffer_only_as_far_as_the_images():
    from pipeline.predict.inputs import Images
    from pipeline.predict.run import iter_batches

    images = np.random.default_rng(0).integers(0, 256, size=(2500, 28, 28), dtype=np.uint8)
    items = [Images("a", images[:1000], 0), Images("b", images[1000:], 0)]
    (batch,) = list(iter_batches(items, 10**12, (28, 28)))
    assert batch.images.shape == (2500, 1, 28, 28) and len(batch.sources) == 2500
    np.testing.assert_array_equal(batch.images[:, 0], images / np.float32(255))


# ----------------------------------------------------------------- 8. --experiment: MLflow's limit, checked first


def test_a_long_experiment_name_is_refused_before_the_store_is_touched(synthetic_data_dir, tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    args = T(synthetic_data_dir)
    args[args.index("e")] = "x" * 501
    line = refused(invoke(args), 2)
    assert "501 characters; at most 500 (MLflow's limit for an experiment name)" in line
    for command in (["runs"], ["compare"], ["ui-url"]):
        assert "at most 500" in refused(invoke([*command, "--experiment", "x" * 501]), 2)
    assert not store.exists()
    assert cli_args.EXPERIMENT_NAME.convert("x" * 500, None, None) == "x" * 500


def test_the_experiment_name_limit_is_mlflows():
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH as MLFLOWS

    assert MAX_EXPERIMENT_NAME_LENGTH == MLFLOWS


# ----------------------------------------------------------------- 9. --nproc: checked before torchrun starts


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--batch-size", "1"], "a global batch of 1 cannot be split over 2 ranks"),
        (["--batch-size", "99999999999999999999"], "is more than the 600 training images"),
        (["--batch-size", "400", "--per-rank-batch"], "2 ranks x --batch-size 400 is more than the 600 training"),
        (["--val-size", "600"], "val_size 600 leaves no training images"),
    ],
)
def test_nproc_mistakes_are_refused_before_any_rank_starts(synthetic_data_dir, tracking_store, extra, expected):
    began = time.monotonic()
    result = invoke(T(synthetic_data_dir, "--nproc", "2", *extra))
    assert expected in refused(result, 1)
    assert "torch.distributed" not in result.output and "ChildFailedError" not in result.output
    assert time.monotonic() - began < 10  # no torchrun, no ranks importing torch
    assert no_runs()


def test_nproc_is_bounded(synthetic_data_dir, tracking_store):
    line = refused(invoke(T(synthetic_data_dir, "--nproc", str(MAX_NPROC + 1))), 2)
    assert f"1<=x<={MAX_NPROC}" in line
    assert MAX_NPROC == 4 * os.cpu_count()


def test_nproc_without_data_is_refused_before_any_rank_starts(tmp_path, tracking_store):
    result = invoke(T(tmp_path / "nodata", "--nproc", "2"))
    assert "Fashion-MNIST not found" in refused(result, 1)
    assert no_runs() and not (tmp_path / "nodata").exists()


# ----------------------------------------------------------------- 10. --opset: the exporter's range, before any work


@pytest.mark.parametrize("opset", ["1", "7", "17", "24", "99999"])
def test_an_opset_the_exporter_does_not_build_is_refused_first(tmp_path, monkeypatch, opset):
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    result = invoke(["export-onnx", "--run-id", "x", "--opset", opset, "--data-dir", tmp_path / "data"])
    line = refused(result, 2)
    assert f"{opset} is not in the range {ONNX_OPSETS[0]}<=x<={ONNX_OPSETS[1]}" in line
    assert "try --opset" not in result.output
    assert not store.exists()


def test_the_opset_range_is_the_installed_exporters():
    from torch.onnx import _constants
    from torch.onnx._internal.exporter import _constants as exporter

    assert ONNX_OPSETS == (exporter.TORCHLIB_OPSET, _constants.ONNX_MAX_OPSET)


def test_export_onnx_refuses_an_opset_out_of_range_before_exporting(tmp_path):
    from pipeline.export import export_onnx
    from pipeline.models import build_model

    with pytest.raises(PipelineError, match=r"opset 7: torch's exporter builds opsets 18 to 23"):
        export_onnx(build_model("dnn"), tmp_path / "m.onnx", ["a"] * 10, "dnn", "run", opset=7)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- 11. predict --model http://...


@pytest.mark.parametrize("url", ["http://host/model.onnx", "HTTPS://127.0.0.1:9/x.onnx"])
def test_an_http_url_is_not_a_model_source(tmp_path, monkeypatch, url):
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    line = refused(invoke(["predict", "--model", url, tmp_path / "x.npy"]), 2)
    assert "an http(s) URL is not a model source" in line and "runs:/<run_id>/<name>" in line
    assert "unpack" not in line and not store.exists()


# ----------------------------------------------------------------- 12. a long output name


def test_a_long_output_name_gets_a_temporary_name_that_fits(trained_onnx, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    out = tmp_path / ("p" * 250 + ".csv")  # 254 bytes: the final name fits, ".NAME.XXXXXXXX.tmp" would not
    result = invoke(["predict", "--model", trained_onnx, "-o", out, tmp_path / "x.npy"])
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "x.npy"])
    too_long = tmp_path / ("p" * 252 + ".csv")  # 256 bytes: no name that long fits
    line = refused(invoke(["predict", "--model", trained_onnx, "-o", too_long, tmp_path / "x.npy"]), 1)
    assert "its name is longer than the folder takes" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "x.npy"])


def test_temporary_names_fit_with_multibyte_names(tmp_path):
    name = "é" * 125 + ".csv"  # 254 bytes in UTF-8
    with atomic_write(tmp_path / name, "w") as handle:
        (tmp,) = [p for p in tmp_path.iterdir()]
        assert len(os.fsencode(tmp.name)) <= 255 and tmp.name.startswith(".é")
        handle.write("ok")
    assert (tmp_path / name).read_text() == "ok"


# ----------------------------------------------------------------- 13. a gzip file with a flipped byte


def flipped(path: Path, where: str) -> Path:
    images = np.random.default_rng(0).integers(0, 256, size=(100, 28, 28), dtype=np.uint8)
    blob = bytearray(gzip.compress(encode_idx(images), compresslevel=0, mtime=0))  # stored: decodes anyway
    blob[len(blob) // 2 if where == "data" else -6] ^= 0x01  # a pixel, or the CRC-32 in the trailer
    path.write_bytes(bytes(blob))
    return path


@pytest.mark.parametrize("where", ["data", "crc"])
def test_a_gzip_file_with_a_flipped_byte_is_refused(trained_onnx, tmp_path, where):
    corrupt = flipped(tmp_path / "corrupt.idx.gz", where)
    out = tmp_path / "out.csv"
    result = invoke(["predict", "--model", trained_onnx, "-o", out, corrupt])
    assert "nothing was predicted" in refused(result, 1)
    table = pd.read_csv(out)
    assert len(table) == 1 and table["error"][0].startswith("corrupt gzip file (CRC check failed")
    # Beside a good input it is an error row (the run goes on), and --strict fails the run.
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    strict = invoke(["predict", "--model", trained_onnx, "--strict", "-o", out, corrupt, tmp_path / "x.npy"])
    assert "--strict: 1 input(s) failed" in refused(strict, 1)


# ----------------------------------------------------------------- 14. a checkpoint that pickles a callable


def test_resuming_from_a_checkpoint_that_pickles_a_callable_is_one_line(synthetic_data_dir, tracking_store, tmp_path):
    import torch

    from pipeline import tracking
    from pipeline.checkpoint import load_training_state
    from pipeline.train import train

    class StopAfterCheckpoint(tracking.MlflowTrainCallback):
        def on_checkpoint(self, epoch, step, state):
            super().on_checkpoint(epoch, step, state)
            raise KeyboardInterrupt

    config = TrainConfig(model="dnn", epochs=2, batch_size=100, data_dir=synthetic_data_dir, allow_other_data=True)
    with pytest.raises(KeyboardInterrupt), tracking.run(run_name="dnn") as active:
        train(config, [StopAfterCheckpoint()])
    run_id = active.run_id
    evil = tmp_path / "evil" / "training_state.pt"
    evil.parent.mkdir()
    torch.save({"model_name": "dnn", "step": 6, "hook": print}, evil)
    mlflow.MlflowClient().log_artifact(run_id, str(evil), "checkpoint")

    result = invoke(["train", "--resume", run_id])
    line = refused(result, 1)
    assert "not a usable training checkpoint: it holds Python objects other than tensors" in line
    assert "print" in line and "weights_only" not in result.output and "trust" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == "KILLED"
    experiment = client.get_run(run_id).info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [run_id]
    with pytest.raises(PipelineError) as info:
        load_training_state(evil)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- 15. runs --stale-after


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_stale_after_must_be_finite_and_positive(tracking_store, value):
    assert "--stale-after" in refused(invoke(["runs", "--stale", "--stale-after", value]), 2)


# ----------------------------------------------------------------- 16. SIGKILL leftovers


def test_a_killed_predicts_temporary_file_is_removed_by_the_next_predict(trained_onnx, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    out = tmp_path / "out.csv"
    # Paths from stdin, which stays open: the process waits with its temporary table open.
    code = f"from pipeline.cli import cli; cli({['predict', '--model', str(trained_onnx), '-o', str(out), '-']!r})"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    victim = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (left := list(tmp_path.glob(".out.csv.*.tmp"))):
            assert victim.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert [p.name for p in left] == [p.name for p in tmp_path.glob(".out.csv.*.tmp")]  # left behind
    assert f"-{victim.pid}.tmp" in left[0].name  # named after its writer
    result = invoke(["predict", "--model", trained_onnx, "-o", out, tmp_path / "x.npy"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "x.npy"]


def test_only_a_dead_writers_leftovers_are_removed(tmp_path, sleeper):
    tag = processes.host_tag()
    dead, live = dead_pid(), sleeper.pid
    leftovers = {
        "dead": tmp_path / f".out.csv.abcd1234.{tag}-{dead}.tmp",
        "live": tmp_path / f".out.csv.efgh5678.{tag}-{live}.tmp",
        "other host": tmp_path / f".out.csv.ijkl9012.00000000-{dead}.tmp",
        "other file": tmp_path / f".other.csv.mnop3456.{tag}-{dead}.tmp",
    }
    for path in leftovers.values():
        path.write_text("half a table")
    with atomic_write(tmp_path / "out.csv", "w") as handle:
        handle.write("done")
    assert not leftovers["dead"].exists()
    assert all(leftovers[k].exists() for k in ("live", "other host", "other file"))


def test_a_killed_exports_temporary_folder_is_removed_by_the_next_export(
    synthetic_data_dir, tracking_store, tmp_path, monkeypatch, sleeper
):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    tag = processes.host_tag()
    dead = tmp_path / "tmp" / f"export-onnx-{tag}-{dead_pid()}-abc123"
    live = tmp_path / "tmp" / f"export-onnx-{tag}-{sleeper.pid}-def456"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "dnn.onnx").write_bytes(bytes(1 << 20))  # what a SIGKILL mid-export leaves: ~1 MB
    trained = invoke(T(synthetic_data_dir))
    assert trained.exit_code == 0, trained.output
    run_id = trained.output.split("Run id:")[1].split()[0]
    exported = invoke(["export-onnx", "--run-id", run_id, "--data-dir", synthetic_data_dir])
    assert exported.exit_code == 0, exported.output
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [live.name]  # its own folder is gone too


def test_temporary_folder_is_named_for_its_writer_and_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with temporary_folder("pipeline-predict") as folder:
        assert folder.parent == tmp_path
        assert folder.name.startswith(f"pipeline-predict-{processes.host_tag()}-{os.getpid()}-")
        (folder / "model.onnx").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- 17. make clean


def test_make_clean_cleans_the_project_and_never_the_venv(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "Makefile").write_bytes((REPO / "Makefile").read_bytes())
    kept = [".venv/lib/python3.11/site-packages/pkg/__pycache__/m.pyc", ".venv/bin/python", "data/FashionMNIST/raw/x"]
    kept += [".server/server.json", "README.md", "pipeline/cli.py"]
    removed = ["pipeline/__pycache__/cli.cpython-311.pyc", "tests/__pycache__/t.pyc", "exports/cnn.onnx"]
    removed += ["predictions.csv", "predictions.parquet", "request.json", "mlruns/mlflow.db", "outputs/compare/c.csv"]
    removed += ["mlartifacts/1/a", ".pytest_cache/v", ".ruff_cache/x", "build/lib/x", "x.egg-info/PKG-INFO"]
    for name in kept + removed:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    done = subprocess.run(["make", "-C", str(root), "clean"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [name for name in kept if not (root / name).exists()] == []
    assert [name for name in removed if (root / name).exists()] == []
    assert not (root / "pipeline" / "__pycache__").exists() and not (root / "exports").exists()


def test_what_the_documented_commands_leave_is_ignored_by_git():
    names = ["exports/cnn.onnx", "predictions.csv", "predictions.jsonl", "request.json", "mlartifacts/x", ".server/x"]
    names += ["outputs/bench/bench.md", "mlruns/mlflow.db", "pipeline/__pycache__/x.pyc"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=REPO, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(names)


# ----------------------------------------------------------------- the shared option type


def test_the_empty_and_length_checks_are_one_click_type():
    assert cli_args.TEXT.convert("abc", None, None) == "abc"
    for blank in ("", "   "):
        with pytest.raises(click.BadParameter, match="it is empty"):
            cli_args.TEXT.convert(blank, None, None)
    with pytest.raises(click.BadParameter, match="at most 500"):
        cli_args.EXPERIMENT_NAME.convert("x" * 501, None, None)


@pytest.mark.parametrize("command", ["train", "run"])
def test_images_of_another_size_are_refused_before_a_run_exists(tracking_store, tmp_path, command):
    """Valid IDX files of 32x32 images: the models take 28x28, and the layer that noticed was a reshape."""
    from pipeline.data import SPLIT_FILES, raw_dir
    from pipeline.idx import write_idx

    folder = raw_dir(tmp_path / "big")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 50)):
        images_name, labels_name = SPLIT_FILES[split]
        write_idx(folder / images_name, rng.integers(0, 255, size=(n, 32, 32), dtype=np.uint8))
        write_idx(folder / labels_name, (np.arange(n) % 10).astype(np.uint8))
    args = T(tmp_path / "big")
    args[0] = command
    line = refused(invoke(args), exit_code=1)
    assert "images are 32x32" in line and "takes 28x28" in line
    assert no_runs()
