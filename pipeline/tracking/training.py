"""Training and tuning as they happen, into MLflow: the training callback (metrics, checkpoints), one
nested run per tuning trial, and a finished study's summary."""

from __future__ import annotations

import hashlib
import posixpath
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from pipeline.callbacks import TrainCallback, TrainResult, TrialObserver
from pipeline.config import artifact_root, project_store
from pipeline.tracking.heartbeat import Heartbeat, liveness_tags
from pipeline.tracking.log import log_metrics, log_params, log_table
from pipeline.tracking.names import (
    CHECKPOINT_EPOCH_TAG,
    CHECKPOINT_STEP_TAG,
    STAGE_TAG,
    TRAINING_STATE_ARTIFACT,
    TRIAL_STAGE,
)
from pipeline.tracking.runs import active_run_id, end_active_run, get_run, set_tags_shared
from pipeline.tracking.store import server_lost, sqlite_path, tracking_uri

if TYPE_CHECKING:
    from pipeline.tune import StudyResult


class MlflowTrainCallback(TrainCallback):
    """Streams a training run into the active MLflow run, checkpoints included."""

    def __init__(self, logged_steps: dict[str, int] | None = None):
        # The last step logged for each metric. A resumed run starts from the store's (see
        # runs.last_logged_steps): what the killed process logged past its checkpoint is not logged twice.
        self.logged_steps = dict(logged_steps or {})

    def _log(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.logged_steps.get(k, -1)}
        if fresh:
            log_metrics(fresh, step=step)
            self.logged_steps.update(dict.fromkeys(fresh, step))

    def on_train_start(self, params: dict[str, Any]) -> None:
        log_params(params)
        # `mlflow run` tags the commit itself; `pipeline train` started by hand has only the param.
        commit = str(params.get("git_commit", "")).removesuffix("-dirty")
        if len(commit) == 40 and MLFLOW_GIT_COMMIT not in get_run(active_run_id()).tags:
            mlflow.set_tag(MLFLOW_GIT_COMMIT, commit)

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self._log(metrics, step)

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self._log({**metrics, "epoch": epoch}, step)

    def on_checkpoint(self, epoch: int, step: int, state: dict[str, Any]) -> None:
        from pipeline.checkpoint import save_training_state

        with tempfile.TemporaryDirectory() as tmp:
            path = save_training_state(state, Path(tmp) / posixpath.basename(TRAINING_STATE_ARTIFACT))
            mlflow.log_artifact(str(path), posixpath.dirname(TRAINING_STATE_ARTIFACT))
        mlflow.set_tags({CHECKPOINT_STEP_TAG: str(step), CHECKPOINT_EPOCH_TAG: str(epoch)})

    def on_train_end(self, result: TrainResult) -> None:
        self._log(
            # Evaluation metrics were logged at their epoch's step already.
            {k: v for k, v in result.metrics.items() if not k.startswith(("test_", "val_"))},
            result.metrics["steps"],
        )
        mlflow.log_dict(result.params["class_names"], "class_names.json")
        mlflow.log_dict(result.history, "history.json")


# ----------------------------------------------------------------- hyperparameter search (pipeline tune)

# How a trial's state ends its run: a pruned trial ran as asked until the pruner stopped it.
TRIAL_RUN_STATUS = {
    "complete": RunStatus.FINISHED,
    "pruned": RunStatus.FINISHED,
    "failed": RunStatus.FAILED,
    "killed": RunStatus.KILLED,
}


def default_optuna_storage() -> str:
    """Optuna's sqlite database for the tracking store in use: beside a sqlite store's database, named
    after it; for any other store, one per store URI under the project's mlruns/. A study's parent run
    lives in one tracking store, so its Optuna storage belongs to that store, not to the folder."""
    path = sqlite_path(tracking_uri())
    if path is not None:
        database = path.parent / f"{path.stem}-optuna.db"
    else:
        digest = hashlib.sha256(tracking_uri().encode()).hexdigest()[:12]
        database = artifact_root(project_store()) / f"optuna-{digest}.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{database}"


class MlflowTrialObserver(TrialObserver):
    """One run per trial, nested in the active (study) run: its params, per-epoch metrics and state."""

    def trial_started(self, number: int, params: dict[str, Any]) -> list[TrainCallback]:
        # Liveness as every run has it (child_run's, which a pair of hooks can't hold open), so a
        # worker killed mid-trial leaves a run `pipeline runs --stale` finds.
        tags = {STAGE_TAG: TRIAL_STAGE, "trial": str(number), **liveness_tags()}
        active = mlflow.start_run(run_name=f"trial-{number}", nested=True, tags=tags)
        self.run_id, self.heartbeat = active.info.run_id, Heartbeat(active.info.run_id)
        return [MlflowTrainCallback()]

    def trial_finished(self, number: int, state: str, value: float | None, metrics: dict[str, float]) -> None:
        mlflow.set_tag("trial_state", state)
        if (untold := end_active_run(self.heartbeat, TRIAL_RUN_STATUS[state])) is not None:
            raise server_lost(self.run_id, untold, marked=False) from None


def log_study(settings: dict[str, Any], result: StudyResult) -> None:
    """A study into the active (parent) run: its settings, the best trial, the trials table and Optuna's plots.

    A resumed study logs again: the best values are metrics at step = trials so far, so their
    history shows the search improving; the best params are tags and best_params.json, replaced.
    """
    import matplotlib.pyplot as plt

    log_params({k: v for k, v in settings.items() if k != "search_space"})
    mlflow.log_dict(settings.get("search_space", {}), "optuna/search_space.json")
    step = sum(result.counts.values())
    log_metrics(
        {
            "best_val_accuracy": result.best_value,
            "best_trial": result.best_number,
            **{f"trials_{state}": count for state, count in result.counts.items()},
        },
        step=step,
    )
    # Workers of one study may log their summaries into the shared parent run at the same moment.
    set_tags_shared(active_run_id(), {f"best.{name}": str(value) for name, value in result.best_params.items()})
    mlflow.log_dict(
        {"trial": result.best_number, "val_accuracy": result.best_value, "params": result.best_params},
        "optuna/best_params.json",
    )
    for name, figure in result.figures.items():
        mlflow.log_figure(figure, f"optuna/{name}.png")
        plt.close(figure)
    log_table(result.trials, "optuna/trials.json")
