"""The CLI and the MLflow boundary: instant help, a tracked training run, clean failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from pipeline import tracking
from pipeline.cli import cli
from pipeline.config import CLASS_NAMES


def test_help_is_instant_and_imports_nothing_heavy():
    code = (
        "import sys; from pipeline.cli import cli\n"
        "heavy = [m for m in ('torch', 'mlflow', 'onnxruntime', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# Five 8 MiB blocks alive at once and then freed, as a forward pass's activations are, 21 times;
# prints the page faults of the last 20 rounds (the first round's fresh pages aside).
FAULTS_OF_FREED_BLOCKS = """
import resource, sys
import numpy as np
from pipeline.allocator import freed_memory_kept, keep_freed_memory
assert not freed_memory_kept()  # asking sets nothing
if sys.argv[1] == "kept":
    assert keep_freed_memory() and freed_memory_kept()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for round in range(21):
    if round == 1:
        before = faults()
    blocks = [np.empty(8 << 20, np.uint8) for _ in range(5)]
    for block in blocks:
        block.fill(round)
    del blocks, block
print(faults() - before)
"""


def test_freed_memory_is_kept_for_the_next_step_and_every_command_asks_for_it(monkeypatch):
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_FREED_BLOCKS, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    given_back, kept = faults("default"), faults("kept")
    assert given_back > 20 * 1000  # glibc's defaults: thousands of pages faulted in again every round
    assert kept < given_back / 20

    from pipeline import allocator

    asked = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: asked.append(True))
    CliRunner().invoke(cli, ["train", "--model", "no-such-model"])
    assert asked == [True]


# A `pipeline` process (pipeline.collector): main() collects less often, and freezes the heap after
# every exit handler registered after it (this one was registered before it, so it runs last), so
# the interpreter's final collection skips it.
COLLECTOR_OF_A_COMMAND = """
import atexit, gc, sys
atexit.register(lambda: print("threshold", gc.get_threshold()[0], "frozen", gc.get_freeze_count()))
sys.argv = ["pipeline", "--version"]
from pipeline.cli import main
main()
"""


def test_a_command_collects_less_often_and_not_its_whole_heap_at_exit():
    from pipeline.collector import YOUNG_THRESHOLD

    done = subprocess.run([sys.executable, "-c", COLLECTOR_OF_A_COMMAND], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "version" in done.stdout
    threshold, frozen = map(int, done.stdout.split("threshold")[1].split("frozen"))
    assert threshold == YOUNG_THRESHOLD > 700  # CPython's default
    assert frozen > 10_000  # the objects of every module imported: the final collection has nothing left to walk


def test_every_command_has_help():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, name


def test_train_help_shows_chapter_defaults():
    out = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    for default in ("[default: 5]", "[default: 100]", "[default: 0.001]", "[default: auto]"):
        assert default in out
    assert "--seed INTEGER RANGE Seeds weights, dropout and shuffling. [default: 0; 0<=x<=4294967295]" in out


def test_train_logs_everything_to_mlflow(synthetic_data_dir, tracking_store):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--model",
            "dnn",
            "--epochs",
            "2",
            "--batch-size",
            "50",
            "--log-every",
            "5",
            "--allow-other-data",
            "--data-dir",
            str(synthetic_data_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    run_id = result.output.split("Run id:")[1].split()[0]
    assert "test accuracy" in result.output

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert params["model"] == "dnn" and params["epochs"] == "2" and params["batch_size"] == "50"
    assert params["lr"] == "0.001" and params["seed"] == "0" and params["device"] == "cpu"
    assert "torch_version" in params and len(params["sha256_t10k-labels-idx1-ubyte"]) == 64
    assert json.loads(params["class_names"]) == list(CLASS_NAMES)
    for key in ("train_loss", "test_loss", "test_accuracy", "wall_time_s", "train_images_per_s", "train_loss_step"):
        assert key in metrics, key
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "test_accuracy")] == [12, 24]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss_step")] == [5, 10, 15, 20]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoint", "class_names.json", "history.json"} <= artifacts

    # The mlflow.pytorch model: a LoggedModel with a signature, loadable, batch-size agnostic.
    model_uri = result.output.split("Model:")[1].split()[0]
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature is not None and info.saved_input_example_info is not None
    import numpy as np

    logits = mlflow.pyfunc.load_model(model_uri).predict(np.zeros((5, 1, 28, 28), dtype=np.float32))
    assert np.asarray(logits).shape == (5, 10)

    # The checkpoint rebuilds the same network.
    model, names = tracking.load_run_model(run_id)
    assert names == list(CLASS_NAMES) and type(model).__name__ == "FashionDNN"


def test_unknown_model_lists_known_ones(synthetic_data_dir, tracking_store):
    result = CliRunner().invoke(cli, ["train", "--model", "vgg", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 2  # Click's usage error: refused before torch or mlflow is loaded
    assert "'vgg' is not one of 'dnn', 'cnn'" in result.output and "Traceback" not in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty  # no run was created


def test_cli_model_choices_are_the_registry():
    from pipeline.config import MODEL_NAMES
    from pipeline.models import MODELS, register

    assert set(MODEL_NAMES) == set(MODELS)
    with pytest.raises(ValueError, match="MODEL_NAMES"):
        register("not_listed")


def test_missing_data_says_run_download(tmp_path, tracking_store):
    result = CliRunner().invoke(cli, ["train", "--data-dir", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "pipeline download" in result.output
    assert "Traceback" not in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty  # checked before a run was created


@pytest.mark.parametrize(
    ("mistake", "says"),
    [("missing data", "pipeline download"), ("other data", "--allow-other-data"), ("no cuda", "--device cpu")],
)
def test_a_failed_check_before_training_leaves_no_run(
    synthetic_data_dir, tmp_path, tracking_store, monkeypatch, mistake, says
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = {
        "missing data": ["--data-dir", str(tmp_path / "empty")],
        "other data": ["--data-dir", str(synthetic_data_dir)],  # without --allow-other-data
        "no cuda": ["--device", "cuda", "--allow-other-data", "--data-dir", str(synthetic_data_dir)],
    }[mistake]
    result = CliRunner().invoke(cli, ["train", "--max-steps", "1", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert says in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_bad_option_values_are_refused_before_torch_and_mlflow_load(tmp_path):
    # One process for all cases: each is refused by Click (exit 2) and nothing heavy is imported.
    code = f"""
import sys
from pipeline.cli import cli
cases = [["train", "--lr", v] for v in ("nan", "inf", "-inf", "0", "-1e-3")]
cases += [["train", "--seed", v] for v in ("99999999999999999999", "-1", str(2**32))]
cases += [["download", "--data-dir", {str(tmp_path)!r}, "--timeout", "-1"]]
for args in cases:
    try:
        cli(args)
    except SystemExit as exc:
        assert exc.code == 2, (args, exc.code)
    heavy = [m for m in ("torch", "mlflow") if m in sys.modules]
    assert not heavy, (args, heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("Invalid value for '--lr'") == 5 and done.stderr.count("Invalid value for '--seed'") == 3
    assert "Invalid value for '--timeout'" in done.stderr


def test_diverging_training_stops_failed_naming_the_step(synthetic_data_dir, tracking_store):
    args = ["train", "--model", "dnn", "--lr", "1e30", "--max-steps", "20", "--allow-other-data"]
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "training diverged" in result.output and "at step" in result.output
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]


@pytest.mark.parametrize("store", ["garbage://x", "/proc/nope/mlflow.db", "unwritable folder", "not sqlite"])
def test_unusable_tracking_store_fails_in_seconds(synthetic_data_dir, tmp_path, monkeypatch, make_unwritable, store):
    import time

    if store == "unwritable folder":
        (tmp_path / "store").mkdir()
        store = str(make_unwritable(tmp_path / "store") / "mlflow.db")
    elif store == "not sqlite":
        store = str(tmp_path / "notes.txt")
        Path(store).write_text("not a database")
    uri = store if "://" in store else f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    started = time.monotonic()
    result = CliRunner().invoke(
        cli, ["train", "--max-steps", "1", "--allow-other-data", "--data-dir", str(synthetic_data_dir)]
    )
    assert time.monotonic() - started < 15  # not ~100 s of engine retries
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"cannot use the tracking store {uri}" in result.output and "MLFLOW_TRACKING_URI" in result.output


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_interrupted_run_is_never_left_running(tracking_store, error, status):
    with pytest.raises(type(error)):
        with tracking.run(run_name="doomed") as active:
            raise error
    assert mlflow.get_run(active.run_id).info.status == status


def test_unknown_run_id_is_a_clear_error(tracking_store):
    from pipeline.errors import PipelineError

    tracking.configure()
    with pytest.raises(PipelineError, match="no run 'deadbeef'"):
        tracking.load_run_model("deadbeef")


@pytest.mark.real_data
@pytest.mark.parametrize("damage", ["labels shifted by one", "labels set to 0xFF"])
def test_damaged_real_labels_are_refused_naming_the_file(real_data_dir, tmp_path, tracking_store, damage):
    from pipeline.data import SHA256, raw_dir

    copy = raw_dir(tmp_path / "data")
    copy.mkdir(parents=True)
    for name in SHA256:
        (copy / name).symlink_to(raw_dir(real_data_dir) / name)
    victim = "train-labels-idx1-ubyte"
    content = (copy / victim).read_bytes()
    labels = bytes((b + 1) % 10 for b in content[8:]) if damage == "labels shifted by one" else b"\xff" * 60_000
    (copy / victim).unlink()
    (copy / victim).write_bytes(content[:8] + labels)

    # --allow-other-data lets other data through the digest check, but labels must still be class ids.
    options = [[]] if damage == "labels shifted by one" else [[], ["--allow-other-data"]]
    for allow in options:
        args = ["train", "--model", "dnn", "--max-steps", "1", *allow, "--data-dir", str(tmp_path / "data")]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        message = " ".join(result.output.split())
        assert str(copy / victim) in message and "corrupt" in message
        assert "label 255 is not a class id" in message or "differs from Fashion-MNIST's" in message
    assert mlflow.search_runs(search_all_experiments=True).empty
