"""The MLflow Model Registry: register a run's models, move aliases.

A run's ONNX model is registered under a name (fashion-cnn by default for a CNN run), its
PyTorch model under the same name plus "-pytorch". Each new version gets the alias
`candidate`; `promote` moves `champion`, which `pipeline predict --model
models:/fashion-cnn@champion` and `mlflow models serve` follow. Whether a candidate deserves
it is decided by pipeline.promotion, from the accuracies recorded here as version tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from pipeline.errors import PipelineError
from pipeline.promotion import Decision, Score, decide
from pipeline.tracking.names import IMAGE_URI_TAG, ONNX_URI_TAGS, REGISTERED_TAG, TORCH_URI_TAG, model_id_of
from pipeline.tracking.runs import finish_stage, get_run
from pipeline.tracking.store import connect, tracking_uri

CANDIDATE = "candidate"
CHAMPION = "champion"
PYTORCH_SUFFIX = "-pytorch"  # the PyTorch twin of registered model NAME is NAME-pytorch
IMAGES_SUFFIX = "-images"  # the model that serves photos (pyfunc over the same ONNX file) is NAME-images
TWIN_SUFFIXES = (PYTORCH_SUFFIX, IMAGES_SUFFIX)  # registered with NAME, and moved with it by promote
# Model version tags: what promote compares, and where the version came from.
ACCURACY_TAG = "test_accuracy"
IMAGES_TAG = "test_images"
PARITY_TAG = "parity"
RUN_TAG = "source_run"
MODEL_TAG = "model"
FORMAT_TAG = "format"


def default_name(model: str) -> str:
    return f"fashion-{model}"


@dataclass
class Registered:
    name: str
    version: str
    created: bool  # False: the run's model was registered before, and that version is reused


@dataclass
class Registration:
    run_id: str
    onnx: Registered
    pytorch: Registered | None  # None: the run has no logged PyTorch model
    image_model: Registered | None  # None: the run was exported before the image model existed
    test_accuracy: float
    test_images: int


@dataclass
class Promotion:
    name: str
    decision: Decision
    champion: str | None  # the champion version after the command
    previous: str | None  # before it
    twins: list[str] = field(default_factory=list)  # "NAME-images v2", ...: the twins' champions this command moved


def _client() -> mlflow.MlflowClient:
    connect()
    return mlflow.MlflowClient()


def _missing(exc: MlflowException) -> bool:
    # A missing alias is INVALID_PARAMETER_VALUE in mlflow 3.17, a missing name or version RESOURCE_DOES_NOT_EXIST.
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _registered_model(client: mlflow.MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _missing(exc):
            raise
    known = sorted(m.name for m in client.search_registered_models())
    raise PipelineError(
        f"no registered model {name!r} in the tracking store {tracking_uri()}"
        + (f" (registered: {', '.join(known)})" if known else "")
        + f"; register a run first: `pipeline register --run-id RUN_ID --name {name}`"
    )


def _version(client: mlflow.MlflowClient, name: str, version: str | None = None, alias: str | None = None):
    """A version of `name`, by number or alias, or a PipelineError that says how to make it exist."""
    _registered_model(client, name)
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if not _missing(exc):
            raise
    if alias == CHAMPION:
        hint = f"promote a version first: `pipeline promote --name {name}`"
    elif alias == CANDIDATE:
        hint = f"register a run first: `pipeline register --run-id RUN_ID --name {name}`"
    elif alias:
        hint = f"the pipeline sets {CANDIDATE} (`pipeline register`) and {CHAMPION} (`pipeline promote`)"
    else:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        hint = f"its versions: {', '.join(map(str, versions)) or 'none'}"
    what = f"alias {alias!r}" if alias else f"version {version}"
    raise PipelineError(f"registered model {name!r} has no {what}; {hint}")


def check_model_uri(model_uri: str) -> None:
    """Fail clearly on models:/NAME@ALIAS or models:/NAME/VERSION that the registry cannot resolve.

    models:/<model_id> (a LoggedModel, not a registered name) is left to the download.
    """
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or rest.startswith("m-"):
        return
    client = _client()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        _version(client, name, alias=alias)
    elif "/" in rest:
        name, version = rest.split("/", 1)
        if version.isdigit():
            _version(client, name, version=version)


# ----------------------------------------------------------------- register


def _register_model(
    client: mlflow.MlflowClient, name: str, model_uri: str, run_id: str, description: str, tags: dict[str, str]
) -> Registered:
    """A version of `name` for the LoggedModel `model_uri`: the existing one if there is one, else a new one."""
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        client.create_registered_model(
            name,
            description="Fashion-MNIST classifier registered by `pipeline register`. Aliases: "
            f"`{CANDIDATE}` is the latest registered version, `{CHAMPION}` the one in use "
            "(moved by `pipeline promote`).",
        )
    for existing in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
        if existing.source == model_uri:
            return Registered(name, str(existing.version), created=False)
    model_id = model_id_of(model_uri)
    version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=tags, description=description, model_id=model_id
    )
    # As mlflow.register_model does: the LoggedModel lists its registered versions (the UI shows them).
    logged = client.get_logged_model(model_id)
    linked = json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    linked.append({"name": name, "version": str(version.version)})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
    return Registered(name, str(version.version), created=True)


def register_run(run_id: str, name: str | None = None) -> Registration:
    """Register the run's ONNX model (and its PyTorch model as NAME-pytorch), aliased `candidate`.

    Refuses a run whose ONNX parity check did not pass: what would be served must compute what
    was evaluated. Registering a run again reuses its versions.
    """
    client = _client()
    run = get_run(run_id)
    run_id = run.run_id
    params, metrics, tags = run.params, run.metrics, run.tags
    onnx_uri = tags.get(ONNX_URI_TAGS["fp32"])
    if not onnx_uri:
        raise PipelineError(
            f"run {run_id} has no ONNX model to register; export it first: `pipeline export-onnx --run-id {run_id}`"
        )
    parity = tags.get(PARITY_TAG)
    if parity == "failed":
        detail = ", ".join(
            f"{label} {metrics[key]:{fmt}}"
            for key, label, fmt in (
                ("parity_max_abs_diff", "max |logit diff|", ".2g"),
                ("parity_argmax_agreement", "argmax agreement", ".2%"),
            )
            if key in metrics
        )
        raise PipelineError(
            f"run {run_id} is not registered: its ONNX parity check failed ({detail or 'see parity.json'}), so the "
            "ONNX model does not compute what the torch model computes; re-export it with "
            f"`pipeline export-onnx --run-id {run_id}`"
        )
    if parity != "passed":
        raise PipelineError(
            f"run {run_id} has no passed ONNX parity check; run `pipeline check-parity --run-id {run_id}` first"
        )
    if "test_accuracy" not in metrics:
        raise PipelineError(f"run {run_id} has no test accuracy; run `pipeline evaluate --run-id {run_id}` first")
    model = params.get("model", "model")
    name = name or default_name(model)
    accuracy = float(metrics["test_accuracy"])
    images = int(params.get("test_size", 0) or 0)
    version_tags = {
        ACCURACY_TAG: f"{accuracy:.6f}",
        IMAGES_TAG: str(images),
        PARITY_TAG: parity,
        RUN_TAG: run_id,
        MODEL_TAG: model,
    }
    description = (
        f"{model.upper()} from run {run_id} ({run.name}): test accuracy {accuracy:.2%} on {images:,} "
        f"test images; ONNX parity {parity}"
    )
    if "parity_max_abs_diff" in metrics:
        description += f" (max |logit diff| {metrics['parity_max_abs_diff']:.2g})"
    try:
        onnx = _register_model(
            client, name, onnx_uri, run_id, f"ONNX model. {description}.", {**version_tags, FORMAT_TAG: "onnx"}
        )
        # The run's other logged forms of the same model, registered beside it as its twins.
        twins = {
            "pytorch": (TORCH_URI_TAG, PYTORCH_SUFFIX, "PyTorch model (mlflow.pytorch)"),
            "images": (IMAGE_URI_TAG, IMAGES_SUFFIX, "Image model (photos in: PNG/JPEG bytes; classes out)"),
        }
        registered_twins = {
            form: _register_model(
                client,
                name + suffix,
                tags[uri_tag],
                run_id,
                f"{what} of {name} v{onnx.version}. {description}.",
                {**version_tags, FORMAT_TAG: form},
            )
            for form, (uri_tag, suffix, what) in twins.items()
            if tags.get(uri_tag)
        }
        pytorch, served = registered_twins.get("pytorch"), registered_twins.get("images")
        for registered in filter(None, (onnx, pytorch, served)):
            client.set_registered_model_alias(registered.name, CANDIDATE, registered.version)
    except MlflowException as exc:
        raise PipelineError(f"cannot register run {run_id} as {name!r}: {exc.message.splitlines()[0]}") from None
    finish_stage(run_id, "register", {REGISTERED_TAG: f"{name} v{onnx.version}"})
    return Registration(run_id, onnx, pytorch, served, accuracy, images)


# ----------------------------------------------------------------- promote


def _score(version) -> Score:
    try:
        accuracy = float(version.tags[ACCURACY_TAG])
    except (KeyError, ValueError):
        raise PipelineError(
            f"version {version.version} of {version.name!r} has no {ACCURACY_TAG} tag (was it registered by "
            "`pipeline register`?); promote it explicitly with --version"
        ) from None
    return Score(str(version.version), accuracy, int(version.tags.get(IMAGES_TAG, 0) or 0))


def _alias_version(client: mlflow.MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        return None


def promote(name: str, version: str | None = None, force: bool = False) -> Promotion:
    """Move `champion` to `version`, or to the candidate if it beats the champion by more than noise (or --force).

    The twins (NAME-pytorch, NAME-images), when they have a version from the same run, follow, so
    `@champion` means one model whichever name it is read from.
    """
    client = _client()
    _registered_model(client, name)
    current = _alias_version(client, name, CHAMPION)
    previous = str(current.version) if current else None
    if version is not None:
        chosen = _version(client, name, version=version)
        if previous == str(chosen.version):
            decision = Decision(False, f"Already the champion: v{previous}")
        else:
            was = f"; the champion was v{previous}" if previous else ""
            decision = Decision(True, f"Promoted v{chosen.version}, as asked by --version{was}")
    else:
        chosen = _version(client, name, alias=CANDIDATE)
        champion_score = _score(current) if current else None
        decision = decide(_score(chosen), champion_score, force=force)
    moved = []
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, chosen.version)
        run_id = chosen.tags.get(RUN_TAG) or chosen.run_id
        for twin in (name + suffix for suffix in TWIN_SUFFIXES):
            try:
                for twin_version in client.search_model_versions(f"name = '{twin}' AND run_id = '{run_id}'"):
                    client.set_registered_model_alias(twin, CHAMPION, twin_version.version)
                    moved.append(f"{twin} v{twin_version.version}")
                    break
            except MlflowException as exc:
                if not _missing(exc):
                    raise
    champion = str(chosen.version) if decision.promote else previous
    return Promotion(name, decision, champion, previous, moved)
