"""Concurrent runs on one store: four trainings started at once on a fresh sqlite store, all
creating the same new experiment, must all finish with every metric point and artifact."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import pytest

from tests.helpers import REPO
from tests.warm import WarmPopen

PROCESSES = 4
STEPS = 3

# Imports first (seconds each), then a barrier, so the four processes really open the fresh
# store, migrate it and create the experiment at the same moment.
WORKER = """
import os, sys, time
from pathlib import Path
import mlflow, torch  # noqa: F401
from pipeline.cli import cli
Path(sys.argv[1], "ready-" + sys.argv[2]).touch()
while not Path(sys.argv[1], "go").exists():
    time.sleep(0.005)
cli(sys.argv[3:])
"""


@pytest.mark.slow
def test_four_trainings_at_once_on_a_fresh_store(tmp_path, synthetic_data_dir):
    store = tmp_path / "mlruns" / "mlflow.db"  # does not exist yet: the first runs create it
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    train = ["train", "--model", "dnn", "--max-steps", str(STEPS), "--log-every", "1", "--batch-size", "50"]
    train += ["--allow-other-data", "--data-dir", str(synthetic_data_dir), "--experiment", "race"]
    workers = [
        WarmPopen(  # tests/warm.py: forked with mlflow and torch imported, as WORKER imports them before the barrier
            [sys.executable, "-c", WORKER, str(tmp_path), str(i), *train],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("ready-*"))) < PROCESSES and time.monotonic() < deadline:
            assert all(w.poll() is None for w in workers), [w.communicate()[0] for w in workers]
            time.sleep(0.05)
        assert not store.exists()  # nothing touched the store before the barrier
        (tmp_path / "go").touch()
        outputs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0] * PROCESSES, "\n---\n".join(outputs)
    assert all("Traceback" not in out for out in outputs)

    mlflow.set_tracking_uri(f"sqlite:///{store}")
    client = mlflow.MlflowClient()
    experiments = client.search_experiments(filter_string="name = 'race'")
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    run_ids = {out.split("Run id:")[1].split()[0] for out in outputs}
    assert {run.info.run_id for run in runs} == run_ids and len(run_ids) == PROCESSES
    models = mlflow.search_logged_models(experiment_ids=[experiments[0].experiment_id], output_format="list")
    assert sorted(m.source_run_id for m in models) == sorted(run_ids)
    for run in runs:
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "train_loss_step")] == list(range(1, STEPS + 1))
        for key in ("test_loss", "test_accuracy", "epoch"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [STEPS], key
        for key in ("train_loss", "steps", "wall_time_s", "train_images_per_s"):
            assert key in run.data.metrics, key
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"checkpoint", "class_names.json", "history.json"} <= artifacts
        checkpoints = {a.path: a.file_size for a in client.list_artifacts(run_id, "checkpoint")}
        assert checkpoints.get("checkpoint/model.pt", 0) > 0


def test_an_experiment_another_process_just_created_is_used(tracking_store, monkeypatch):
    """The window the four processes above may or may not hit: our look finds no experiment, then
    another process creates it before our create. Ours must fetch theirs, not fail."""
    from pipeline import tracking

    tracking.configure("shared")  # the other process, first
    theirs = mlflow.get_experiment_by_name("shared").experiment_id
    monkeypatch.setattr(mlflow, "get_experiment_by_name", lambda name: None)  # our look came before it
    tracking.configure("shared")
    with tracking.run(experiment="shared") as active:
        pass
    assert active.experiment_id == theirs
