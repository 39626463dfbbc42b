"""The MLflow boundary: the only package that imports mlflow.

Stages return values; jobs hand them to the functions here (or pass the training callback).
What comes back is the project's own small types (RunRecord, RunRow, DataSplit, ...), never an
MLflow object. Point MLFLOW_TRACKING_URI elsewhere, e.g. at a temporary sqlite file in tests or
at a remote server, and every stage follows.

One module per concern:
- store: which store and experiment, opened and checked before anything is logged
- runs: run lifetime (always ends FINISHED, FAILED or KILLED), finding runs, descriptions
- heartbeat, liveness: signs of life, stale runs, resumable runs
- log, datasets: logging into the active run
- artifacts, models: a run's files, its PyTorch and ONNX models
- reuse: stage reuse keys (`-P reuse=true`)
- training: the training callback, tuning trials and studies
- registry: the Model Registry (register, promote)
- names, records: the names the pipeline gives things, and the types it returns
"""

from pipeline.tracking.artifacts import download_artifact, load_run_model, load_training_state, read_csv_artifact
from pipeline.tracking.datasets import DataSplit, log_datasets
from pipeline.tracking.heartbeat import Heartbeat
from pipeline.tracking.liveness import RunRow, describe_liveness, list_runs, resumable_run, staleness
from pipeline.tracking.log import (
    log_check,
    log_comparison,
    log_evaluation,
    log_metrics,
    log_params,
    log_report,
    log_table,
)
from pipeline.tracking.models import (
    TEMPERATURE_PARAM,
    download_onnx_model,
    log_image_model,
    log_onnx_model,
    log_temperature,
    log_torch_model,
    run_id_for_model,
    run_model_uri,
    run_onnx_model_uri,
)
from pipeline.tracking.names import (
    CHECKPOINT_ARTIFACT,
    CHECKPOINT_EPOCH_TAG,
    CHECKPOINT_STEP_TAG,
    HEARTBEAT_TAG,
    HOSTNAME_TAG,
    IMAGE_URI_TAG,
    MODEL_URI_TAG,
    ONNX_MODEL_NAMES,
    ONNX_URI_TAGS,
    PID_TAG,
    REGISTERED_TAG,
    STAGE_TAG,
    STAGES_TAG,
    STUDY_STAGE,
    TORCH_MODEL_NAME,
    TORCH_URI_TAG,
    TRAINING_STATE_ARTIFACT,
    TRIAL_STAGE,
    model_id_of,
    stage_key_tag,
)
from pipeline.tracking.records import ActiveRun, RunRecord
from pipeline.tracking.reuse import finished_stage_run, mark_stage_done, model_run, reuse_stage, stage_key
from pipeline.tracking.runs import (
    SYSTEM_METRICS_INTERVAL_S,
    child_run,
    claim_study_run,
    finish_stage,
    fresh_step,
    get_run,
    last_logged_steps,
    latest_finished_run,
    mark_failed,
    metric_history,
    run,
    run_description,
    search_runs,
)
from pipeline.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HTTP_DEFAULTS,
    RUNS_VIEW_KEY,
    RUNS_VIEW_TAG,
    configure,
    connect,
    default_tracking_uri,
    experiment_name,
    tracking_uri,
    ui_links,
)
from pipeline.tracking.training import MlflowTrainCallback, MlflowTrialObserver, default_optuna_storage, log_study

__all__ = [
    "ActiveRun",
    "CHECKPOINT_ARTIFACT",
    "CHECKPOINT_EPOCH_TAG",
    "CHECKPOINT_STEP_TAG",
    "DataSplit",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "HEARTBEAT_TAG",
    "HOSTNAME_TAG",
    "HTTP_DEFAULTS",
    "Heartbeat",
    "MODEL_URI_TAG",
    "MlflowTrainCallback",
    "MlflowTrialObserver",
    "ONNX_MODEL_NAMES",
    "ONNX_URI_TAGS",
    "IMAGE_URI_TAG",
    "PID_TAG",
    "REGISTERED_TAG",
    "RUNS_VIEW_KEY",
    "RUNS_VIEW_TAG",
    "RunRecord",
    "RunRow",
    "STAGES_TAG",
    "STAGE_TAG",
    "STUDY_STAGE",
    "SYSTEM_METRICS_INTERVAL_S",
    "TORCH_MODEL_NAME",
    "TORCH_URI_TAG",
    "TRAINING_STATE_ARTIFACT",
    "TRIAL_STAGE",
    "child_run",
    "claim_study_run",
    "configure",
    "connect",
    "default_optuna_storage",
    "default_tracking_uri",
    "describe_liveness",
    "download_artifact",
    "download_onnx_model",
    "experiment_name",
    "finish_stage",
    "finished_stage_run",
    "fresh_step",
    "get_run",
    "last_logged_steps",
    "latest_finished_run",
    "list_runs",
    "load_run_model",
    "load_training_state",
    "log_check",
    "log_comparison",
    "log_datasets",
    "log_evaluation",
    "log_metrics",
    "log_onnx_model",
    "log_image_model",
    "log_params",
    "log_report",
    "log_study",
    "log_table",
    "log_temperature",
    "log_torch_model",
    "TEMPERATURE_PARAM",
    "mark_failed",
    "mark_stage_done",
    "metric_history",
    "model_id_of",
    "model_run",
    "read_csv_artifact",
    "resumable_run",
    "reuse_stage",
    "run",
    "run_description",
    "run_id_for_model",
    "run_model_uri",
    "run_onnx_model_uri",
    "search_runs",
    "stage_key",
    "stage_key_tag",
    "staleness",
    "tracking_uri",
    "ui_links",
]
