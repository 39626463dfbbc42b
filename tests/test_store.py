"""Which store and experiment every entry lands in: MLflow's own defaults, shared by `mlflow run`,
`pipeline` and `mlflow ui`; an old store moved into place; names that are never paths."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from pipeline import config, jobs, tracking
from pipeline.cli import cli
from pipeline.errors import PipelineError
from pipeline.tracking import store


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project root with nothing exported: no MLFLOW_TRACKING_URI, no experiment, no run."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setattr(config, "project_root", lambda: root)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return root


def test_the_project_store_is_mlflows_default_and_its_experiment_the_default_one(project):
    assert tracking.tracking_uri() == f"sqlite:///{project / 'mlflow.db'}"
    tracking.configure()
    client = mlflow.MlflowClient()
    default = client.get_experiment("0")
    assert default.name == config.DEFAULT_EXPERIMENT  # MLflow's `Default`, renamed: where `mlflow run .` logs
    assert default.artifact_location == (project / "mlruns" / "0").as_uri()  # MLflow's own layout, at the root
    assert [e.name for e in client.search_experiments()] == [config.DEFAULT_EXPERIMENT]
    runs_link, _ = tracking.ui_links(None, "http://127.0.0.1:5000")
    assert runs_link.startswith("http://127.0.0.1:5000/#/experiments/0/runs?")
    assert client.get_experiment("0").tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


def test_an_other_experiment_name_leaves_the_default_one_alone(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    tracking.configure()
    client = mlflow.MlflowClient()
    assert client.get_experiment("0").name == "Default"
    assert client.get_experiment_by_name("mine").artifact_location == (project / "mlruns" / "mine").as_uri()


def test_an_old_store_moves_to_the_default_place_with_its_studies(project, empty_store, caplog):
    (project / "mlruns").mkdir()
    shutil.copyfile(empty_store, project / "mlruns" / "mlflow.db")
    (project / "mlruns" / "optuna.db").write_bytes(b"studies")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        tracking.connect()
    assert (project / "mlflow.db").is_file() and not (project / "mlruns" / "mlflow.db").exists()
    assert (project / "mlflow-optuna.db").read_bytes() == b"studies"
    assert tracking.default_optuna_storage() == f"sqlite:///{project / 'mlflow-optuna.db'}"
    assert "moved the project's tracking store" in caplog.text


def test_inside_mlflow_run_the_default_experiment_becomes_the_projects(project, caplog):
    tracking.connect()
    client = mlflow.MlflowClient()
    run_id = client.create_run("0").info.run_id  # what `mlflow run .` does with no --experiment-name
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_RUN_ID", run_id)
        tracking.configure()
    assert client.get_experiment("0").name == config.DEFAULT_EXPERIMENT

    # An older store where both exist: the run stays where `mlflow run` put it, and the user is told.
    client.rename_experiment("0", "Default")
    client.create_experiment(config.DEFAULT_EXPERIMENT)
    with pytest.MonkeyPatch.context() as env, caplog.at_level(logging.WARNING, logger="pipeline"):
        env.setenv("MLFLOW_RUN_ID", run_id)
        tracking.configure()
    assert "pass `--experiment-name fashion-mnist` to `mlflow run`" in caplog.text


def test_a_deleted_experiment_is_named_with_how_to_restore_it(tracking_store, synthetic_data_dir):
    client = mlflow.MlflowClient()
    client.delete_experiment(client.create_experiment("base"))
    args = ["train", "--model", "dnn", "--max-steps", "5", "--no-system-metrics", "--experiment", "base"]
    result = CliRunner().invoke(cli, [*args, "--allow-other-data", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "experiment 'base' is deleted" in result.output and "mlflow experiments restore" in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b"])
def test_an_experiment_name_is_never_a_path(tracking_store, name):
    tracking.configure(name)
    root = Path(tracking_store.removeprefix("sqlite:///")).parent / "mlruns"
    location = mlflow.get_experiment_by_name(name).artifact_location
    assert location.startswith(root.as_uri() + "/") and "/" not in location.removeprefix(root.as_uri() + "/")
    with tracking.run(experiment=name) as active:
        tracking.log_params({"x": 1})
        mlflow.log_text("kept inside", "note.txt")
    path = Path(mlflow.artifacts.download_artifacts(run_id=active.run_id, artifact_path="note.txt"))
    assert path.read_text() == "kept inside"
    assert mlflow.get_run(active.run_id).info.artifact_uri.startswith(root.as_uri())


def test_each_tracking_store_has_its_own_optuna_storage(tmp_path, monkeypatch):
    storages = set()
    for name in ("a.db", "b.db"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / name}")
        storages.add(tracking.default_optuna_storage())
    assert storages == {f"sqlite:///{tmp_path / 'a-optuna.db'}", f"sqlite:///{tmp_path / 'b-optuna.db'}"}


def test_listing_runs_reads_a_read_only_store(tracking_store, make_unwritable):
    with tracking.run(run_name="listed") as active:
        pass
    make_unwritable(Path(tracking_store.removeprefix("sqlite:///")).parent)
    store._opened.clear()
    result = CliRunner().invoke(cli, ["runs"])
    assert result.exit_code == 0 and active.run_id in result.output, result.output
    closing = CliRunner().invoke(cli, ["runs", "--stale", "--mark-failed"])
    assert closing.exit_code == 1 and "not writable" in closing.output and "Traceback" not in closing.output


def test_tune_inside_mlflow_run_keeps_the_study_in_its_parent_run(tracking_store, synthetic_data_dir, tmp_path):
    """`mlflow run . -e tune`: its run is the study's parent; every trial is a new run nested in it."""
    from pipeline import tune

    tracking.configure()
    parent = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("tests").experiment_id).info.run_id
    settings = tune.TuneConfig(
        model="dnn", n_trials=2, study_name="inside", storage=f"sqlite:///{tmp_path / 'optuna.db'}", val_size=100,
        max_steps=2, data_dir=synthetic_data_dir, allow_other_data=True,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_RUN_ID", parent)
        job = jobs.tune_model(settings)
    assert job.parent_run_id == parent
    run = mlflow.get_run(parent)
    assert run.info.run_name == "tune inside" and run.data.tags[tracking.STAGE_TAG] == tracking.STUDY_STAGE
    children = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(children["tags.mlflow.runName"]) == ["trial-0", "trial-1"]


def test_a_postgresql_uri_without_its_driver_says_which_url_works(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(PipelineError, match=r"postgresql\+psycopg2://"):
        tracking.connect()


def test_a_server_refusing_the_experiment_is_one_line_naming_it(tracking_store, synthetic_data_dir, monkeypatch):
    """What a team server with logins answers a user in another's experiment (seen against `make server AUTH=1`:
    HTTP 403, PERMISSION_DENIED), stood in for here; the message is the one that server run printed."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    def refuse(*args, **kwargs):
        raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

    monkeypatch.setattr(mlflow, "start_run", refuse)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    args = ["train", "--model", "dnn", "--max-steps", "2", "--no-system-metrics", "--experiment", "teamexp"]
    result = CliRunner().invoke(cli, [*args, "--allow-other-data", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "does not let bob log runs into experiment 'teamexp'" in result.output
    assert "EDIT permission" in result.output


@pytest.mark.parametrize(
    "refusal",
    [
        '(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "params_pk"',
        "(sqlite3.IntegrityError) UNIQUE constraint failed: latest_metrics.key, latest_metrics.run_uuid",
    ],
)
def test_a_write_that_lost_a_duplicate_key_race_is_made_once_more(refusal):
    """Tuning workers write the same params, tags and metrics into their study's parent run at once."""
    calls = []

    def write():
        calls.append(1)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException(refusal)
        return "written"

    assert tracking.runs.retried_if_raced(write) == "written" and len(calls) == 2


def test_a_dataset_whose_row_another_training_made_first_is_still_linked(tracking_store, tmp_path, monkeypatch):
    """Trainings started at once in one experiment race to make its dataset rows: the loser's insert
    fails on the unique key (seen with four trainings on a fresh store), and is made once more."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    log_inputs, refused = SqlAlchemyStore.log_inputs, []

    def lost_the_race(self, *args, **kwargs):
        if not refused:
            refused.append(True)
            log_inputs(self, *args, **kwargs)  # the other training's row, made first
            raise mlflow.exceptions.MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
                "datasets.digest"
            )
        return log_inputs(self, *args, **kwargs)

    monkeypatch.setattr(SqlAlchemyStore, "log_inputs", lost_the_race)
    split = tracking.DataSplit("test", tmp_path, {"t10k-images-idx3-ubyte": "ab" * 32}, 10)
    with tracking.run(run_name="raced") as active:
        tracking.log_datasets([split])
    assert refused
    inputs = mlflow.get_run(active.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [("fashion-mnist-test", "testing")]


def test_any_other_refusal_of_a_write_is_not_retried():
    calls = []

    def write():
        calls.append(1)
        raise mlflow.exceptions.MlflowException("Changing param values is not allowed")

    with pytest.raises(mlflow.exceptions.MlflowException, match="Changing param"):
        tracking.runs.retried_if_raced(write)
    assert len(calls) == 1


def test_a_run_whose_end_meets_a_locked_database_is_still_ended(tracking_store, monkeypatch):
    """SQLite refuses the end's write at once when the system-metrics thread's last batch meets it,
    and mlflow.end_run has already let go of the run: it is marked ended again, and stays so."""
    client = mlflow.MlflowClient()
    set_terminated, refused = client.set_terminated, []

    def locked_once(self, run_id, status=None, end_time=None):
        if not refused:
            refused.append(run_id)
            raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")
        return set_terminated(run_id, status, end_time)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", locked_once)
    with pytest.raises(KeyboardInterrupt), tracking.run(run_name="locked at the end") as active:
        raise KeyboardInterrupt
    assert refused == [active.run_id]
    assert mlflow.get_run(active.run_id).info.status == "KILLED" and mlflow.active_run() is None


def test_mlflows_traceback_for_a_locked_database_is_left_out_and_nothing_else():
    import logging

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("mlflow.store.db.utils", logging.ERROR, "", 0, "db error", (), (type(exc), exc, None))

    locked = Exception("(sqlite3.OperationalError) database is locked")
    assert not tracking.runs.not_a_lock_retried(record(locked))
    assert tracking.runs.not_a_lock_retried(record(Exception("(sqlite3.OperationalError) no such table: runs")))


def test_our_models_are_logged_without_scanning_the_whole_environment(tracking_store, monkeypatch):
    """Their requirements are given and pinned; MLflow's map of every module to its package (a ~2 s
    scan per process) is not built for them, and is left for a model whose requirements it infers."""
    import numpy as np
    import torch
    from mlflow.utils import requirements_utils

    from pipeline.models import build_model

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a fresh process

    scans = []  # (MLflow catches what its check raises: a raising stand-in would go unseen)
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", lambda: scans.append(1) or {})
    example = np.zeros((2, 1, 28, 28), dtype=np.float32)
    with tracking.run(experiment="tests"):
        uri = tracking.log_torch_model(build_model("dnn"), example, [str(n) for n in range(10)])
    assert not scans and requirements_utils._MODULES_TO_PACKAGES is None
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert (
        f"torch=={torch.__version__.split('+')[0]}" in requirements and f"mlflow=={mlflow.__version__}" in requirements
    )
