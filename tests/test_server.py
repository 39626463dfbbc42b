"""The team tracking server: a real `mlflow server` on loopback over a real PostgreSQL cluster.

One server for the module (initdb + the schema + the workers' start-up are the slow part).
The stages run against it as a user runs them, then the runs are read back through the
API and counted again in PostgreSQL itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psycopg2
import pytest
from click.testing import CliRunner

from pipeline import tracking
from pipeline.cli import cli
from pipeline.errors import PipelineError
from pipeline.server import PG_DATABASE, PG_USER, ServerConfig, start_server, stop_server
from tests.warm import WarmPopen

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def team_server():
    # Not under pytest's tmp_path: that is closed to other users, and the cluster belongs to
    # `postgres` when the tests run as root.
    folder = Path(tempfile.mkdtemp(prefix="pipeline-server-"))
    folder.chmod(0o755)
    config = ServerConfig(db="postgresql", port=free_port(), workers=1, folder=folder)  # one: the start is the cost
    with pytest.MonkeyPatch.context() as env:
        # MLflow's job execution (a runner and seven huey consumers, each importing mlflow: seconds of
        # CPU per start) serves MLflow's GenAI jobs, which the pipeline never submits.
        env.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        try:
            start_server(config)
            yield config
        finally:
            stop_server(folder)
            shutil.rmtree(folder, ignore_errors=True)


def client_env(server: ServerConfig, experiment: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_EXPERIMENT_NAME": experiment, "MLFLOW_RUN_ID": None}


@pytest.fixture
def on_server(team_server, monkeypatch):
    for name, value in client_env(team_server, "team").items():
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    for name in tracking.HTTP_DEFAULTS:  # tracking sets them in-process; undone after the test
        monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(name, tracking.HTTP_DEFAULTS[name])
    mlflow.set_tracking_uri(team_server.url)
    return team_server


def invoke(args: list[str], env: dict | None = None) -> str:
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    return result.output


def postgres(server: ServerConfig, query: str, *args) -> list[tuple]:
    """Straight from the cluster, not through MLflow."""
    with psycopg2.connect(host=str(server.folder / "postgresql"), user=PG_USER, dbname=PG_DATABASE) as conn:
        with conn.cursor() as cursor:
            cursor.execute(query, args)
            return cursor.fetchall()


def all_artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def metric_points(client: mlflow.MlflowClient, run) -> dict[str, list[int]]:
    return {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}


@pytest.mark.slow
def test_train_evaluate_export_register_land_in_postgresql_and_the_artifact_proxy(on_server, synthetic_data_dir):
    data = ["--data-dir", str(synthetic_data_dir)]
    trained = invoke(["train", "--model", "cnn", "--epochs", "2", "--log-every", "2", "--allow-other-data", *data])
    run_id = trained.split("Run id:")[1].split()[0]
    invoke(["evaluate", "--run-id", run_id, "--no-explain", *data])  # explanations: test_evaluate's
    invoke(["export-onnx", "--run-id", run_id, *data])
    invoke(["register", "--run-id", run_id, "--name", "fashion-cnn-server-test"])

    client = mlflow.MlflowClient(on_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["parity"] == "passed"
    params = run.data.params
    assert (params["model"], params["epochs"], params["log_every"]) == ("cnn", "2", "2")
    points = metric_points(client, run)
    assert points["train_loss_step"] == [2, 4, 6, 8, 10, 12]  # 600 images / 100 per step x 2 epochs
    assert points["test_accuracy"][:2] == [6, 12]  # once per epoch; evaluate logs at the last step
    assert {"test_macro_f1", "parity_max_abs_diff", "onnx_test_accuracy"} <= set(points)

    artifacts = all_artifacts(client, run_id)
    figures = {"confusion_matrix.png", "misclassified.png", "samples.png", "training_curves.png"}
    assert figures | {"checkpoint/model.pt", "history.json", "per_class.csv", "parity.json"} <= artifacts
    # Proxied: the files are in the server's artifact folder, and the client was given no path to it.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    stored = on_server.folder / "artifacts" / run.info.experiment_id / run_id / "artifacts"
    assert {p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()} >= artifacts

    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert {m.name for m in logged if m.source_run_id == run_id} == {
        tracking.TORCH_MODEL_NAME,
        "onnx_model",
        "image_model",
    }
    # The registry lives in the same database.
    version = client.get_model_version_by_alias("fashion-cnn-server-test", "candidate")
    assert version.run_id == run_id

    # And all of it is in PostgreSQL, row for row.
    rows = dict(postgres(on_server, "SELECT key, count(*) FROM metrics WHERE run_uuid = %s GROUP BY key", run_id))
    assert rows == {key: len(steps) for key, steps in points.items()}
    assert postgres(on_server, "SELECT count(*) FROM params WHERE run_uuid = %s", run_id)[0][0] == len(params)
    assert postgres(on_server, "SELECT run_id FROM model_versions WHERE name = %s", "fashion-cnn-server-test") == [
        (run_id,)
    ]


@pytest.fixture(scope="module")
def load_base_runs(team_server, synthetic_data_dir) -> list[str]:
    """Two trained runs for the load test's evaluate/export clients."""
    env = client_env(team_server, "load")
    args = ["train", "--model", "dnn", "--max-steps", "6", "--allow-other-data", "--data-dir", str(synthetic_data_dir)]
    return [invoke([*args, "--seed", str(seed)], env).split("Run id:")[1].split()[0] for seed in (1, 2)]


# Each stage as `pipeline <stage>` runs it; a failed stage ends the client with its exit code.
STAGES_IN_ONE_PROCESS = """
import json, sys
from pipeline.cli import cli
for args in json.loads(sys.argv[1]):
    try:
        cli.main(args, prog_name="pipeline")
    except SystemExit as exit:
        if exit.code:
            raise
"""


@pytest.mark.slow
def test_four_clients_at_once_lose_nothing_and_mix_nothing(on_server, synthetic_data_dir, load_base_runs):
    env = {**os.environ, "MLFLOW_TRACKING_URI": on_server.url, "MLFLOW_EXPERIMENT_NAME": "load"}
    env["PYTHONPATH"] = str(REPO)
    env.pop("MLFLOW_RUN_ID", None)
    pipeline = [sys.executable, "-m", "pipeline"]
    data = ["--data-dir", str(synthetic_data_dir)]
    steps = 40
    trainings = {  # seed -> lr: each run's params say which client made it
        11: "0.002",
        12: "0.003",
    }
    commands = [
        [*pipeline, "train", "--model", "dnn", "--max-steps", str(steps), "--batch-size", "10", "--log-every", "1"]
        + ["--seed", str(seed), "--lr", lr, "--allow-other-data", *data]
        for seed, lr in trainings.items()
    ]
    for run_id in load_base_runs:  # evaluate, then export-onnx: one process (torch and mlflow imported once)
        stages = [["evaluate", "--run-id", run_id, "--no-explain", *data], ["export-onnx", "--run-id", run_id, *data]]
        commands.append([sys.executable, "-c", STAGES_IN_ONE_PROCESS, json.dumps(stages)])

    started = time.monotonic()
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    clients = [WarmPopen(command, env=env, **pipes) for command in commands]  # tests/warm.py: no imports each
    outputs = [client.communicate(timeout=300) for client in clients]
    seconds = time.monotonic() - started
    failures = [out[1][-2000:] for client, out in zip(clients, outputs, strict=True) if client.returncode != 0]
    assert not failures, failures

    client = mlflow.MlflowClient(on_server.url)
    experiment = client.get_experiment_by_name("load")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    trained = {r.info.run_id: r for r in runs.values() if r.info.run_id not in load_base_runs}
    assert len(runs) == 4 and len(trained) == 2  # the two base runs were evaluated in place, not copied
    totals = {"metric points": 0, "params": 0, "artifacts": 0}
    for run_id, run in runs.items():
        assert run.info.status == "FINISHED"
        points = metric_points(client, run)
        artifacts = all_artifacts(client, run_id)
        totals["metric points"] += sum(map(len, points.values()))
        totals["params"] += len(run.data.params)
        totals["artifacts"] += len(artifacts)
        rows = dict(postgres(on_server, "SELECT key, count(*) FROM metrics WHERE run_uuid = %s GROUP BY key", run_id))
        assert rows == {key: len(s) for key, s in points.items()}  # the server's answer is the database's
        if run_id in trained:
            seed = int(run.data.params["seed"])
            assert run.data.params["lr"] == trainings[seed]  # each run carries its own client's settings
            assert points["train_loss_step"] == list(range(1, steps + 1))  # every step, once
            assert "test_macro_f1" not in points and "parity" not in run.data.tags  # no evaluation leaked in
            history = json.loads((Path(client.download_artifacts(run_id, "history.json"))).read_text())
            assert history[-1]["step"] == steps
            assert {"checkpoint/model.pt", "class_names.json", "history.json"} <= artifacts
        else:
            assert "train_loss_step" not in points  # 6 steps logged no step loss; none leaked in since
            assert run.data.tags["parity"] == "passed" and "test_macro_f1" in points
            assert {"confusion_matrix.png", "training_curves.png", "parity.json"} <= artifacts
            onnx_model = client.get_logged_model(run.data.tags["onnx_model_uri"].removeprefix("models:/"))
            assert onnx_model.source_run_id == run_id  # each export went into its own run
    print(f"\nload: {len(clients)} clients, {len(runs)} runs, {totals} in {seconds:.1f} s, {len(failures)} failures")


def test_a_port_with_nothing_listening_fails_in_seconds(tracking_store, synthetic_data_dir, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for name in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    args = ["train", "--max-steps", "1", "--allow-other-data", "--data-dir", str(synthetic_data_dir)]
    result = CliRunner().invoke(cli, args)
    assert time.monotonic() - started < 15  # MLflow's own retry defaults would take minutes
    assert result.exit_code == 1
    assert f"cannot reach the MLflow tracking server at {url} (connection refused)" in result.output
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_a_users_own_http_settings_are_kept(monkeypatch):
    for name in tracking.HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(PipelineError, match="cannot reach"):
        tracking.connect()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


@pytest.mark.slow
def test_two_tune_workers_started_at_once_share_one_study_and_one_parent_run(on_server, synthetic_data_dir):
    """Optuna's storage in the server's PostgreSQL: both workers create its tables and the study's
    parent run at the same moment; one study, 4 trials, one parent run is what must come out."""
    import optuna

    from pipeline import tune
    from pipeline.server import Postgres

    storage = Postgres(on_server.folder).create_database("optuna")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_EXPERIMENT_NAME": "tune-workers"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "pipeline", "tune", "--model", "dnn", "--n-trials", "2", "--study-name", "shared"]
    command += ["--storage", storage, "--val-size", "100", "--max-steps", "4", "--pruner", "none"]
    command += ["--allow-other-data", "--data-dir", str(synthetic_data_dir)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    workers = [WarmPopen(command, env=env, **pipes) for _ in range(2)]  # tests/warm.py
    outputs = [worker.communicate(timeout=240) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for _, err in outputs]

    study = optuna.load_study(study_name="shared", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    client = mlflow.MlflowClient(on_server.url)
    experiment_id = client.get_experiment_by_name("tune-workers").experiment_id
    parents = client.search_runs([experiment_id], f"tags.stage = '{tracking.STUDY_STAGE}'")
    assert [p.info.run_id for p in parents] == [study.user_attrs[tune.PARENT_RUN_ATTR]]
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == 4  # both workers' trials, under the one parent
    assert all(f"Parent run id: {parents[0].info.run_id}" in out for out, _ in outputs)


@pytest.mark.slow
def test_a_server_that_goes_away_mid_run_fails_it_clearly_and_comes_back(on_server, synthetic_data_dir):
    """Last in the module: it stops the server, then starts it again."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_EXPERIMENT_NAME": "faults"}
    data = ["--data-dir", str(synthetic_data_dir)]
    training = WarmPopen(  # tests/warm.py
        [sys.executable, "-m", "pipeline", "train", "--model", "dnn", "--epochs", "100000", "--log-every", "1"]
        + ["--allow-other-data", *data],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = mlflow.MlflowClient(on_server.url)
    try:
        deadline = time.monotonic() + 120
        run_id = None
        while run_id is None and time.monotonic() < deadline:  # until the run is logging
            assert training.poll() is None, training.communicate()[1][-2000:]
            experiment = client.get_experiment_by_name("faults")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, "train_loss_step"):
                run_id = runs[0].info.run_id
            time.sleep(0.5)
        assert run_id is not None
        stop_server(on_server.folder, database=False)
        gone = time.monotonic()
        _, stderr = training.communicate(timeout=120)
        failed_after = time.monotonic() - gone
    finally:
        if training.poll() is None:
            training.kill()
        start_server(on_server)  # back, for whatever runs after this module

    assert training.returncode == 1 and failed_after < 30
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: lost the MLflow tracking server at {on_server.url} during run {run_id}")
    # It could not tell the server, so the run says what the message says.
    assert client.get_run(run_id).info.status == ("FAILED" if "marked FAILED" in last else "RUNNING")

    # The same server (same database) takes the next run.
    again = invoke(
        ["train", "--model", "dnn", "--max-steps", "2", "--allow-other-data", *data], client_env(on_server, "faults")
    )
    assert client.get_run(again.split("Run id:")[1].split()[0]).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("faults").experiment_id])) == 2


def test_a_server_failure_that_still_lets_the_run_be_told_marks_it_failed(tracking_store):
    """E.g. the server answers, but only with errors from its artifact store: the status still gets there."""
    import requests

    with pytest.raises(PipelineError, match="it is marked FAILED") as raised:
        with tracking.run(run_name="upload") as active:
            try:
                raise requests.exceptions.RetryError("too many 500 error responses")
            except requests.RequestException as exc:
                raise mlflow.exceptions.MlflowException(f"API request failed with exception {exc}") from exc
    assert "lost the MLflow tracking server" in str(raised.value) and "(it answers with server errors)" in str(
        raised.value
    )
    assert mlflow.get_run(active.run_id).info.status == "FAILED"
    with pytest.raises(ValueError):  # anything else passes through untouched, run FAILED as before
        with tracking.run(run_name="bug") as other:
            raise ValueError("a bug")
    assert mlflow.get_run(other.run_id).info.status == "FAILED"
