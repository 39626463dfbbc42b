"""Stage reuse (`mlflow run . -P reuse=true`): a stage whose settings, data digests and git commit
match a FINISHED run's is not run again; the job's run points to the run that holds its outputs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import mlflow

from pipeline.config import project_root
from pipeline.tracking.names import reused_tag, stage_key_tag
from pipeline.tracking.records import RunRecord, record_of
from pipeline.tracking.runs import get_run


def source_commit() -> str | None:
    """The git commit of the project's checkout, or None outside one."""
    from mlflow.utils.git_utils import get_git_commit

    return get_git_commit(str(project_root()))


def stage_key(stage: str, settings: dict[str, Any]) -> str | None:
    """A digest of what a stage's outputs depend on: its settings (data digests included) and the git
    commit. None outside a git checkout, where nothing is reused."""
    commit = source_commit()
    if commit is None:
        return None
    blob = json.dumps({"stage": stage, "git_commit": commit, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def mark_stage_done(stage: str, key: str | None) -> None:
    """Tag the active run: it holds `stage`'s outputs for `key`, for a later `reuse` to find."""
    if key:
        mlflow.set_tag(stage_key_tag(stage), key)


def finished_stage_run(stage: str, key: str | None, run_id: str | None = None) -> RunRecord | None:
    """A FINISHED run that already did `stage` for `key`: `run_id` itself, or the newest in the active
    experiment when `run_id` is None. None when there is none."""
    if not key:
        return None
    if run_id:
        found = get_run(run_id)
        return found if found.status == "FINISHED" and found.tags.get(stage_key_tag(stage)) == key else None
    hits = mlflow.MlflowClient().search_runs(
        [mlflow.active_run().info.experiment_id],
        filter_string=f"tags.`{stage_key_tag(stage)}` = '{key}' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return record_of(hits[0]) if hits else None


def reuse_stage(stage: str, key: str | None, job_run_id: str | None, run_id: str | None = None) -> RunRecord | None:
    """The run whose `stage` outputs for `key` stand in for running it again (see finished_stage_run),
    with the job's run pointing to it; None when the stage has to run."""
    earlier = finished_stage_run(stage, key, run_id)
    if earlier is not None and job_run_id is not None and job_run_id != earlier.run_id:
        mlflow.MlflowClient().set_tag(job_run_id, reused_tag(stage), earlier.run_id)
    return earlier


def model_run(run_id: str) -> str:
    """The run that holds `run_id`'s trained model: a job run whose train stage was reused points to it."""
    return get_run(run_id).tags.get(reused_tag("train"), run_id)
