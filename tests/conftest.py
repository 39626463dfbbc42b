"""Shared fixtures and hooks: small synthetic Fashion-MNIST in the real IDX format, a throwaway
MLflow store, and a tiny trained run that later stages (evaluate, export, predict) use.
Test modules import shared helpers from tests/helpers.py, never from here.
"""

from __future__ import annotations

import fcntl
import gc
import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline.allocator import keep_freed_memory
from pipeline.collector import collect_for_a_command
from pipeline.data import SYSTEM_COPY
from tests import schedule
from tests.helpers import REAL_DATA_DIR, real_data_available, write_synthetic_dataset

# The fixtures import mlflow themselves: the xdist controller loads this file too, and importing
# mlflow here would add 1.4 s to the start of every run.


def pytest_addoption(parser):
    parser.addoption(
        "--record-durations",
        action="store_true",
        help=f"write each test's seconds into tests/{schedule.DURATIONS.name}, which orders the files "
        "heaviest first (run the whole suite, as CI does)",
    )


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: a file weighs what is left of it
def pytest_collection_modifyitems(items):
    # Whole files heaviest first (tests/schedule.py); the order inside a file is kept.
    schedule.sort_by_file_duration(items, schedule.load_durations())


def pytest_collection_finish(session):
    # What collection imported (torch, MLflow, the test modules: a few hundred thousand objects)
    # lives as long as the worker. Frozen, it is out of the full collections during the session and
    # of the two pytest makes at its end to find unraisable exceptions; what the tests create is not.
    gc.collect()
    gc.freeze()


def pytest_configure(config):
    """Each of N workers gets its share of the cores for torch (and the `pipeline` processes its tests
    start): two workers with two OpenMP threads each on two cores spin-wait on each other, and every
    torch step gets several times slower. A run without workers keeps torch's default."""
    if config.getoption("record_durations") and not hasattr(config, "workerinput"):  # the controller adds up
        config.pluginmanager.register(DurationRecorder(), "record-durations")
    keep_freed_memory()  # as every `pipeline` command does (pipeline.allocator): tests train in-process too
    collect_for_a_command()  # as every `pipeline` command does (pipeline.collector): before collection's imports
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


class DurationRecorder:
    """Adds up setup + call + teardown per test from the reports (the workers' reports reach the
    controller too), and writes them at the end of the session."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def pytest_runtest_logreport(self, report):
        self.seconds[report.nodeid] += report.duration

    def pytest_sessionfinish(self, session):
        if self.seconds:
            root = Path(session.config.rootpath)
            merged = schedule.merged_durations(schedule.load_durations(), self.seconds, root)
            schedule.write_durations(merged)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A store with MLflow's schema and nothing else, made once per session: by the first xdist
    worker that needs it, while the other waits for it. Creating one runs about a hundred
    migrations, each committed with an fsync: seconds per test on a busy disk. Nobody writes to
    it; tests copy it. A fresh store's own creation is tested by test_concurrent, which starts from none."""
    from pipeline.tracking.store import open_store

    basetemp = tmp_path_factory.getbasetemp()
    session = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp  # the workers' common folder
    path = session / "empty_store" / "mlflow.db"
    with open(session / "empty_store.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.is_file():
            making = session / "empty_store.making" / "mlflow.db"  # renamed when whole: never half a store
            making.parent.mkdir(exist_ok=True)
            open_store(f"sqlite:///{making}")  # as the pipeline opens a new store: its files beside it
            making.parent.rename(path.parent)
    return path


@pytest.fixture
def tracking_store(tmp_path, monkeypatch, empty_store) -> str:
    """Every MLflow call in the test goes to a fresh (empty) sqlite store under tmp_path."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(empty_store, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    mlflow.set_tracking_uri(uri)  # mlflow caches the URI a previous test set
    return uri


@pytest.fixture
def make_unwritable():
    """Makes an existing folder one nobody may write in, until the test ends: read-only mode for a
    user, the immutable attribute for root (who ignores modes; chattr needs root and a filesystem
    with attributes: ext4, xfs, btrfs)."""
    locked: list[Path] = []

    def lock(folder: Path) -> Path:
        if os.geteuid() != 0:
            folder.chmod(0o555)
        else:
            done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"chattr +i {folder} failed ({done.stderr.strip()}); run the tests as a user, not root")
        locked.append(folder)
        return folder

    yield lock
    for folder in locked:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.fixture(scope="session")
def session_store(tmp_path_factory, empty_store) -> str:
    folder = tmp_path_factory.mktemp("session_mlruns")
    shutil.copyfile(empty_store, folder / "mlflow.db")  # not a fresh store's hundred migrations
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="session")
def trained_run(synthetic_data_dir, session_store) -> dict:
    """A tiny CNN trained on the synthetic data and logged through the real CLI.

    Returns the run id, store URI and data dir. Tests that use it must set
    MLFLOW_TRACKING_URI to `store` (use the `use_trained_run` fixture).
    """
    from click.testing import CliRunner

    from pipeline.cli import cli

    env = {"MLFLOW_TRACKING_URI": session_store, "MLFLOW_EXPERIMENT_NAME": "tests", "MLFLOW_RUN_ID": None}
    result = CliRunner().invoke(
        cli,
        ["train", "--model", "cnn", "--epochs", "3", "--allow-other-data", "--data-dir", str(synthetic_data_dir)],
        env=env,
    )
    assert result.exit_code == 0, result.output
    run_id = result.output.split("Run id:")[1].split()[0]
    return {"run_id": run_id, "store": session_store, "data_dir": synthetic_data_dir}


@pytest.fixture(scope="session")
def trained_onnx(trained_run, tmp_path_factory) -> Path:
    """The trained_run's CNN exported to one .onnx file by the real exporter (pipeline.export)."""
    import mlflow

    from pipeline import tracking
    from pipeline.export import export_onnx

    mlflow.set_tracking_uri(trained_run["store"])
    model, class_names = tracking.load_run_model(trained_run["run_id"])
    folder = tmp_path_factory.mktemp("onnx")
    return export_onnx(model, folder / "cnn.onnx", class_names, "cnn", trained_run["run_id"])


@pytest.fixture(scope="session")
def exported_onnx_uri(trained_run) -> str:
    """`pipeline export-onnx` run on trained_run (through the real CLI): the logged ONNX model's URI."""
    import mlflow
    from click.testing import CliRunner

    from pipeline import tracking
    from pipeline.cli import cli

    env = {"MLFLOW_TRACKING_URI": trained_run["store"], "MLFLOW_EXPERIMENT_NAME": "tests", "MLFLOW_RUN_ID": None}
    args = ["export-onnx", "--run-id", trained_run["run_id"], "--data-dir", str(trained_run["data_dir"])]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    mlflow.set_tracking_uri(trained_run["store"])
    return tracking.run_onnx_model_uri(trained_run["run_id"])


@pytest.fixture(scope="session")
def champion_uri(exported_onnx_uri, trained_run) -> str:
    """trained_run's logged ONNX model, parity re-checked, registered and promoted through the real CLI.

    The parity check runs again because other tests check deliberately broken files against
    this run, which tags it parity=failed, and `register` refuses such a run.
    """
    from click.testing import CliRunner

    from pipeline.cli import cli

    env = {"MLFLOW_TRACKING_URI": trained_run["store"], "MLFLOW_EXPERIMENT_NAME": "tests", "MLFLOW_RUN_ID": None}
    run_id, data_dir = trained_run["run_id"], str(trained_run["data_dir"])
    for args in (
        ["check-parity", "--run-id", run_id, "--data-dir", data_dir],
        ["register", "--run-id", run_id, "--name", "tests-cnn"],
        ["promote", "--name", "tests-cnn"],
    ):
        result = CliRunner().invoke(cli, args, env=env)
        assert result.exit_code == 0, result.output
    return "models:/tests-cnn@champion"


@pytest.fixture
def use_trained_run(trained_run, monkeypatch) -> dict:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_run["store"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(trained_run["store"])
    return trained_run


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real Fashion-MNIST. `make test` obtains it first, so a missing copy is a failure,
    not a skip: a test that silently skipped would prove nothing."""
    if not real_data_available():
        pytest.fail(
            f"real Fashion-MNIST not in {REAL_DATA_DIR}; run `make setup` (or `pipeline download`). "
            f"Debian's copy: {SYSTEM_COPY}"
        )
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def real_dnn(real_data_dir, tmp_path_factory) -> dict:
    """A DNN briefly trained on the real data (60 steps, no MLflow) and exported by the real exporter:
    a model that learned real garments (about 70 % accurate) in seconds."""
    from pipeline.export import export_onnx
    from pipeline.train import TrainConfig, train

    result = train(TrainConfig(model="dnn", epochs=1, max_steps=60, data_dir=real_data_dir), [])
    model = result.model.cpu().eval()
    class_names = result.params["class_names"]
    path = export_onnx(model, tmp_path_factory.mktemp("real_dnn") / "dnn.onnx", class_names, "dnn", "test")
    return {"model": model, "onnx": path, "class_names": class_names}
