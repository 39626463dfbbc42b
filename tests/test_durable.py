"""Durable runs: SIGTERM handled like Ctrl-C, resume after kill -9 to the same result, stale runs,
stage reuse. The signal tests send real signals to real `pipeline` processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline import tracking
from pipeline.cli import cli
from tests.helpers import REPO, write_synthetic_dataset
from tests.warm import WarmPopen

# A DNN on 1,200 synthetic images in batches of 50: 24 steps an epoch, 4 epochs, a few seconds.
TRAIN_ARGS = ["train", "--model", "dnn", "--batch-size", "50", "--log-every", "5", "--allow-other-data"]
STEPS_PER_EPOCH = 24


@pytest.fixture(scope="module")
def data_1200(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic_1200"), n_train=1200)


def start_pipeline(*args: str, **popen) -> WarmPopen:
    """A real `pipeline` process on the test's store (MLFLOW_TRACKING_URI is in os.environ), started
    warm (tests/warm.py): the signals and the kill are what is tested, not the imports."""
    env = {**os.environ, "MLFLOW_EXPERIMENT_NAME": "tests", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_RUN_ID", None)
    return WarmPopen([sys.executable, "-m", "pipeline.cli", *args], env=env, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(condition, process: WarmPopen, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, f"the process ended before {what}: {process.stderr.read()[-2000:]}"
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no {what} after {timeout} s")


def running_run_checkpointed(min_step: int):
    """The test experiment's RUNNING run once its checkpoint_step tag reaches min_step."""

    def check():
        runs = mlflow.search_runs(experiment_names=["tests"], filter_string="attributes.status = 'RUNNING'")
        if runs.empty:
            return None
        run = mlflow.get_run(runs.run_id[0])
        return run if int(run.data.tags.get(tracking.CHECKPOINT_STEP_TAG, -1)) >= min_step else None

    return check


def run_id_of(output: str) -> str:
    return output.split("Run id:")[1].split()[0]


def histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.MlflowClient()
    keys = ("train_loss_step", "train_loss", "test_loss", "test_accuracy", "epoch")
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


# ----------------------------------------------------------------- the warm processes themselves

ECHO = """
import os, sys
line = sys.stdin.readline()
print(sys.argv[1:], os.environ["WARM_CHECK"], os.getcwd(), line.strip())
print("on stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise ValueError("raised")
sys.exit(sys.argv[1] if sys.argv[1] == "a message" else int(sys.argv[1]))
"""


@pytest.mark.slow
def test_a_warm_process_behaves_as_python_itself(tmp_path):
    """What the tests read of a process (exit code, stdout, stderr, its environment, folder and
    stdin) is the same from WarmPopen as from python itself; only the imports are done already."""
    env = {**os.environ, "WARM_CHECK": "env-given"}
    for arg in ("0", "3", "a message", "raise"):
        command = [sys.executable, "-c", ECHO, arg]
        cold = subprocess.run(command, input="line\n", env=env, cwd=tmp_path, capture_output=True, text=True)
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        warm = WarmPopen(command, env=env, cwd=tmp_path, **pipes)
        warm.stdin.write("line\n")
        out, err = warm.communicate(timeout=60)
        assert (warm.returncode, out) == (cold.returncode, cold.stdout), arg
        # A traceback names other frames (warm's own runner); its last line is the same.
        assert err.splitlines()[-1] == cold.stderr.splitlines()[-1] and err.startswith("on stderr"), arg
    assert "env-given" in out and str(tmp_path) in out

    sleeper = WarmPopen([sys.executable, "-c", "import time; time.sleep(60)"])
    sleeper.send_signal(signal.SIGTERM)
    assert sleeper.wait(timeout=30) == -signal.SIGTERM  # as Popen reports a death by signal
    warm = WarmPopen([sys.executable, "-c", "import sys; print('torch' in sys.modules)"], stdout=subprocess.PIPE)
    assert warm.communicate(timeout=60)[0] == b"True\n"  # and it started warm


# ----------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_during_training_marks_the_run_killed_and_exits_143(synthetic_data_dir, tracking_store):
    process = start_pipeline(*TRAIN_ARGS, "--epochs", "1000", "--data-dir", str(synthetic_data_dir))
    run = wait_for(running_run_checkpointed(1), process, "first checkpoint")
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert code == 143, stderr[-3000:]
    assert "Terminated." in stderr and "Traceback" not in stderr
    ended = mlflow.get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and ended.info.end_time is not None


@pytest.fixture
def sigterm_wrapped_by_a_library():
    """A call that gets SIGTERM and, as pydantic's schema builder does during an import, wraps the
    resulting exception in an error of its own. Forgets the SIGTERM after the test."""
    from pipeline import signals

    def call(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        except BaseException as exc:
            raise RuntimeError("a library's own error") from exc
        raise AssertionError("SIGTERM did not arrive")

    yield call
    signals._received.clear()


def test_a_sigterm_that_a_library_wrapped_still_exits_143(sigterm_wrapped_by_a_library, monkeypatch, tmp_path):
    from pipeline import jobs

    monkeypatch.setattr(jobs, "download_data", sigterm_wrapped_by_a_library)
    result = CliRunner().invoke(cli, ["download", "--data-dir", str(tmp_path)])
    assert result.exit_code == 143 and result.output.strip() == "Terminated."
    assert result.exc_info[0] is SystemExit  # no traceback for the user


def test_a_run_that_a_wrapped_sigterm_ended_is_killed_not_failed(sigterm_wrapped_by_a_library, tracking_store):
    from pipeline.signals import sigterm_raises

    with pytest.raises(RuntimeError, match="a library's own error"):
        with sigterm_raises(), tracking.run(run_name="wrapped") as active:
            sigterm_wrapped_by_a_library()
    assert mlflow.get_run(active.run_id).info.status == "KILLED"


@pytest.mark.slow
def test_sigterm_during_predict_leaves_no_output_and_exits_143(trained_onnx, tmp_path):
    image = tmp_path / "item.png"
    Image.new("L", (28, 28), 200).save(image)
    output = tmp_path / "out.csv"
    args = ["predict", "--model", str(trained_onnx), "--batch-size", "1", "--output", str(output), "-"]
    process = start_pipeline(*args, stdin=subprocess.PIPE)
    # One path, and stdin left open: predict writes its row, then waits for more paths.
    process.stdin.write(f"{image}\n")
    process.stdin.flush()
    wait_for(lambda: list(tmp_path.glob(".out.csv.*.tmp")), process, "temporary output file")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert "Traceback" not in process.stderr.read()
    process.stdin.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item.png"]  # no table, no .tmp


# ----------------------------------------------------------------- kill -9, stale, resume


@pytest.mark.slow
def test_resume_after_kill_9_gives_exactly_the_uninterrupted_result(data_1200, tracking_store):
    args = [*TRAIN_ARGS, "--epochs", "4", "--checkpoint-every", "5", "--data-dir", str(data_1200)]
    reference = CliRunner().invoke(cli, args)
    assert reference.exit_code == 0, reference.output
    reference_id = run_id_of(reference.output)

    # Killed in epoch 3, after its end-of-epoch-2 checkpoint (step 48); later ones are mid-epoch.
    process = start_pipeline(*args)
    run = wait_for(running_run_checkpointed(2 * STEPS_PER_EPOCH), process, "epoch-2 checkpoint")
    process.kill()
    process.wait(timeout=30)
    run_id = run.info.run_id
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # kill -9: nothing could clean up

    listed = CliRunner().invoke(cli, ["runs", "--stale"])
    assert listed.exit_code == 0 and run_id in listed.output
    assert f"its process {process.pid} on this host is gone" in listed.output

    resumed = CliRunner().invoke(cli, ["train", "--resume", run_id])
    assert resumed.exit_code == 0, resumed.output
    step = int(resumed.output.split("checkpoint at step")[1].split(".")[0].replace(",", ""))
    assert 2 * STEPS_PER_EPOCH <= step < 4 * STEPS_PER_EPOCH

    final, expected = mlflow.get_run(run_id), mlflow.get_run(reference_id)
    assert final.info.status == "FINISHED" and final.info.run_id == run_id_of(resumed.output)
    for key in ("test_loss", "test_accuracy", "train_loss", "steps"):
        assert final.data.metrics[key] == expected.data.metrics[key], key  # to the last bit
    # The same metric histories: every step once, with the uninterrupted run's values.
    assert histories(run_id) == histories(reference_id)
    model, _ = tracking.load_run_model(run_id)
    reference_model, _ = tracking.load_run_model(reference_id)
    for name, tensor in model.state_dict().items():
        assert tensor.equal(reference_model.state_dict()[name]), name


def test_a_runs_settings_come_back_from_its_logged_params():
    from dataclasses import asdict

    from pipeline.config import TrainConfig, train_config_from_params

    config = TrainConfig(
        model="dnn", epochs=3, lr=0.003, max_steps=7, channels_last=False, checkpoint_every=5, data_dir=Path("/d")
    )
    params = {key: str(value) for key, value in asdict(config).items()}  # as MLflow stores them
    assert train_config_from_params(params) == config
    # `mlflow run` logs its own spelling first: max_steps 0 is "no limit".
    assert train_config_from_params({**params, "max_steps": "0", "lr": "3e-3"}) == TrainConfig(
        **{**asdict(config), "max_steps": None}
    )
    assert train_config_from_params(params, data_dir=Path("/elsewhere")).data_dir == Path("/elsewhere")


def test_resume_refuses_what_cannot_be_resumed(tracking_store):
    def resume(run_id, *extra):
        result = CliRunner().invoke(cli, ["train", "--resume", run_id, *extra])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    client = mlflow.MlflowClient()
    tracking.configure()
    experiment_id = client.get_experiment_by_name("tests").experiment_id
    finished_id = client.create_run(experiment_id).info.run_id
    client.set_terminated(finished_id, "FINISHED")
    assert "is FINISHED: there is nothing to resume" in resume(finished_id)
    assert "no run 'deadbeef'" in resume("deadbeef")
    with pytest.raises(KeyboardInterrupt), tracking.run(run_name="killed early") as early:
        raise KeyboardInterrupt
    assert "has no training checkpoint to resume from" in resume(early.run_id)
    assert "drop --epochs" in resume(finished_id, "--epochs", "3")

    live = client.create_run(experiment_id, tags=alive_tags())
    assert "is still RUNNING (pid" in resume(live.info.run_id)


class StopAfterCheckpoint(tracking.MlflowTrainCallback):
    """Interrupts training right after its first checkpoint is logged."""

    def on_checkpoint(self, epoch, step, state):
        super().on_checkpoint(epoch, step, state)
        raise KeyboardInterrupt


def test_a_resumed_run_checks_its_data(data_1200, synthetic_data_dir, tracking_store):
    from pipeline.config import TrainConfig
    from pipeline.train import train

    with pytest.raises(KeyboardInterrupt), tracking.run(run_name="dnn") as active:
        train(
            TrainConfig(model="dnn", epochs=2, batch_size=50, data_dir=data_1200, allow_other_data=True),
            [StopAfterCheckpoint()],
        )
    assert mlflow.get_run(active.run_id).info.status == "KILLED"
    result = CliRunner().invoke(cli, ["train", "--resume", active.run_id, "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 1 and "is not what run" in result.output and "train-images-idx3-ubyte" in result.output


# ----------------------------------------------------------------- stale runs


def alive_tags(pid: int | None = None, host: str | None = None, heartbeat: float | None = None) -> dict[str, str]:
    return {
        tracking.PID_TAG: str(pid or os.getpid()),
        tracking.HOSTNAME_TAG: host or socket.gethostname(),
        tracking.HEARTBEAT_TAG: f"{heartbeat or time.time():.0f}",
    }


def test_runs_stale_lists_and_closes_runs_left_running_by_dead_processes(tracking_store):
    client = mlflow.MlflowClient()
    tracking.configure()
    experiment_id = client.get_experiment_by_name("tests").experiment_id
    dead = subprocess.Popen(["true"])
    dead.wait()
    runs = {}
    for name, tags in {
        "alive": alive_tags(),
        "dead_pid": alive_tags(pid=dead.pid),
        "old_heartbeat": alive_tags(pid=1, host="another-host", heartbeat=time.time() - 1000),
        "fresh_elsewhere": alive_tags(pid=1, host="another-host"),
        # Logged before the bookkeeping tags had their prefix: still read.
        "legacy_dead_pid": {"pid": str(dead.pid), "hostname": socket.gethostname(), "heartbeat": f"{time.time():.0f}"},
    }.items():
        runs[name] = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    with pytest.raises(KeyboardInterrupt), tracking.run(run_name="killed") as killed:
        raise KeyboardInterrupt

    listed = CliRunner().invoke(cli, ["runs", "--stale"])
    assert listed.exit_code == 0, listed.output
    assert all(runs[name] in listed.output for name in ("dead_pid", "old_heartbeat", "legacy_dead_pid"))
    assert "is gone" in listed.output and "no heartbeat for 1,0" in listed.output
    for name in ("alive", "fresh_elsewhere"):
        assert runs[name] not in listed.output
    assert killed.run_id not in listed.output
    assert "--mark-failed closes them" in listed.output
    # A shorter threshold than the heartbeat interval would call live runs stale.
    assert CliRunner().invoke(cli, ["runs", "--stale", "--stale-after", "5"]).exit_code == 2
    assert CliRunner().invoke(cli, ["runs", "--mark-failed"]).exit_code == 2

    closed = CliRunner().invoke(cli, ["runs", "--stale", "--mark-failed"])
    assert closed.exit_code == 0 and "Marked 3 stale run(s) FAILED." in closed.output
    for name in ("dead_pid", "old_heartbeat", "legacy_dead_pid"):
        run = mlflow.get_run(runs[name])
        assert run.info.status == "FAILED" and run.info.end_time is not None, name
        assert run.data.tags["closed_as_stale"]
    assert mlflow.get_run(runs["alive"]).info.status == "RUNNING"
    assert "No stale runs." in CliRunner().invoke(cli, ["runs", "--stale"]).output
    everything = CliRunner().invoke(cli, ["runs"]).output
    assert all(run_id in everything for run_id in runs.values()) and "KILLED" in everything


def test_the_heartbeat_is_refreshed_while_a_run_is_open(tracking_store):
    with tracking.run(run_name="beating") as active:
        run_id = active.run_id
        started = mlflow.get_run(run_id).data.tags
        assert started[tracking.PID_TAG] == str(os.getpid()) and started[tracking.HOSTNAME_TAG] == socket.gethostname()
        mlflow.set_tag(tracking.HEARTBEAT_TAG, "0")
        beat = tracking.Heartbeat(run_id, interval=0.05)
        time.sleep(0.5)
        beat.stop()
        assert float(mlflow.get_run(run_id).data.tags[tracking.HEARTBEAT_TAG]) > time.time() - 60


# ----------------------------------------------------------------- stage reuse


def test_main_entry_point_takes_reuse_off_by_default():
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["main"]
    assert spec["parameters"]["reuse"]["default"] == "false"
    assert spec["command"].startswith("PIPELINE_REUSE={reuse} ") and "pipeline run " in spec["command"]


@pytest.mark.slow
def test_reuse_skips_stages_a_finished_run_did_the_same_way(synthetic_data_dir, tracking_store, monkeypatch):
    """As `mlflow run . -P reuse=true` runs it: each stage inside the job's run (MLFLOW_RUN_ID)."""
    client = mlflow.MlflowClient()
    tracking.configure()
    experiment_id = client.get_experiment_by_name("tests").experiment_id
    data = ["--data-dir", str(synthetic_data_dir)]

    def job(*train_extra, stages=("train", "evaluate", "export-onnx")):
        job_run = client.create_run(experiment_id).info.run_id
        env = {"MLFLOW_RUN_ID": job_run, "PIPELINE_REUSE": "true"}
        commands = {
            "train": [*TRAIN_ARGS, "--max-steps", "6", *train_extra],
            "evaluate": ["evaluate", "--no-explain"],
            "export-onnx": ["export-onnx", "--no-fold"],
        }
        outputs = []
        for stage in stages:
            result = CliRunner().invoke(cli, [*commands[stage], *data], env=env)
            assert result.exit_code == 0, result.output
            outputs.append(result.output)
        client.set_terminated(job_run)
        return job_run, outputs

    first, outputs = job()
    assert not any("Reused" in output for output in outputs)

    second, outputs = job()
    assert outputs[0].startswith(f"Reused train: run {first} finished training")
    assert outputs[1].startswith(f"Reused evaluate: run {first}")
    assert outputs[2].startswith(f"Reused export-onnx: run {first}")
    assert {k: v for k, v in mlflow.get_run(second).data.tags.items() if k.startswith("reused.")} == {
        "reused.train": first,
        "reused.evaluate": first,
        "reused.export": first,
    }
    assert "test_loss" not in mlflow.get_run(second).data.metrics  # nothing was trained in it

    third, outputs = job("--seed", "1", stages=("train",))  # another seed: trained again
    assert "Reused" not in outputs[0] and mlflow.get_run(third).data.metrics["steps"] == 6

    # Without reuse, the default, the stages run as always.
    plain = CliRunner().invoke(cli, [*TRAIN_ARGS, "--max-steps", "6", *data])
    assert plain.exit_code == 0 and "Reused" not in plain.output
