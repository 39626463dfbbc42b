"""The names the pipeline gives things in MLflow: run tags, artifacts and logged models.

Tags a user reads on a run's page keep plain names (stages, parity, registered_as, the model
URIs). The pipeline's own bookkeeping (liveness, checkpoints, stage-reuse keys) goes under one
prefix, so the page's tag list starts with what a user cares about. Runs logged before the prefix
existed are still read: `tag` falls back to their unprefixed names.
"""

from __future__ import annotations

from collections.abc import Mapping

BOOKKEEPING = "pipeline."  # the prefix of the pipeline's own tags

# Who works on a run, and when it last showed signs of life (unix seconds): see liveness.staleness.
HEARTBEAT_TAG = f"{BOOKKEEPING}heartbeat"
PID_TAG = f"{BOOKKEEPING}pid"
HOSTNAME_TAG = f"{BOOKKEEPING}hostname"
# The latest training state; the step tag is set only once the state artifact is complete.
CHECKPOINT_STEP_TAG = f"{BOOKKEEPING}checkpoint_step"
CHECKPOINT_EPOCH_TAG = f"{BOOKKEEPING}checkpoint_epoch"
MODEL_URI_TAG = f"{BOOKKEEPING}model_uri"  # where log_torch_model put the model, for a reused train stage


def stage_key_tag(stage: str) -> str:
    """The tag that says which settings a stage's outputs in this run were made with (see reuse)."""
    return f"{BOOKKEEPING}stage_key.{stage}"


# The same tags before they had the prefix (runs logged by older versions).
LEGACY_TAGS = {
    HEARTBEAT_TAG: "heartbeat",
    PID_TAG: "pid",
    HOSTNAME_TAG: "hostname",
    CHECKPOINT_STEP_TAG: "checkpoint_step",
    CHECKPOINT_EPOCH_TAG: "checkpoint_epoch",
    MODEL_URI_TAG: "model_uri",
}


def tag(tags: Mapping[str, str], name: str) -> str | None:
    """A run's tag by its current name, else by the name older versions gave it."""
    value = tags.get(name)
    if value is None and name in LEGACY_TAGS:
        value = tags.get(LEGACY_TAGS[name])
    return value


# Tags a user reads.
STAGES_TAG = "stages"  # the stages done on the run so far, in order ("train, evaluate, export-onnx")
REGISTERED_TAG = "registered_as"  # "fashion-cnn v3", set by `pipeline register`
TORCH_URI_TAG = "pytorch_model_uri"  # the torch LoggedModel's models:/<model_id>
ONNX_URI_TAGS = {"fp32": "onnx_model_uri", "int8": "onnx_int8_model_uri"}
IMAGE_URI_TAG = "image_model_uri"  # the served image model's (pyfunc: photos in, classes out) models:/<model_id>
STAGE_TAG = "stage"  # what kind of run it is, where it is not a training run
# Stage tags of `pipeline tune`'s runs: the study's parent run and each trial's. Both record a
# model name, but neither holds a trained model.
STUDY_STAGE, TRIAL_STAGE = "tune", "tune-trial"


def reused_tag(stage: str) -> str:
    """On a job's run: `stage` was not run again; its outputs are in the run this tag names."""
    return f"reused.{stage}"


# LoggedModels of a run: what each is called on its Models tab.
TORCH_MODEL_NAME = "pytorch_model"
LEGACY_TORCH_MODEL_NAME = "model"  # before it said what it is
ONNX_MODEL_NAMES = {"fp32": "onnx_model", "int8": "onnx_model_int8"}
IMAGE_MODEL_NAME = "image_model"

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
# The latest training state, replaced at every checkpoint (the artifact store publishes it atomically).
TRAINING_STATE_ARTIFACT = "checkpoint/training_state.pt"


def model_id_of(model_uri: str) -> str:
    """models:/<model_id> -> <model_id>, the form LoggedModels are logged and tagged in."""
    return model_uri.removeprefix("models:/")
