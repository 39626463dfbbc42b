"""A run's models: the PyTorch model and its checkpoint, the ONNX models, and finding their files again."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from pipeline.errors import PipelineError
from pipeline.tracking.artifacts import quiet_downloads
from pipeline.tracking.names import (
    CHECKPOINT_ARTIFACT,
    IMAGE_MODEL_NAME,
    IMAGE_URI_TAG,
    MODEL_URI_TAG,
    ONNX_MODEL_NAMES,
    ONNX_URI_TAGS,
    TORCH_MODEL_NAME,
    TORCH_URI_TAG,
    model_id_of,
)
from pipeline.tracking.registry import check_model_uri
from pipeline.tracking.runs import get_run
from pipeline.tracking.store import connect, tracking_uri


@contextmanager
def requirements_as_given() -> Iterator[None]:
    """Log models whose pip requirements we give (pinned to the versions running now) without
    MLflow's scan of the whole environment.

    Before checking given requirements against the environment, MLflow maps every importable module
    to its package by reading every installed package's file list: about 2 s of the first model a
    process logs. Requirements that name packages need no such map (MLflow then reads each version by
    package name), so an empty one stands in while our models are logged, and the scan is left for
    any model whose requirements MLflow infers. The map is a private name of MLflow's: where it
    changes, this does nothing and the scan runs as before.
    """
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", False) is not None:
        yield  # already scanned in this process, or the name has changed
        return
    requirements_utils._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        requirements_utils._MODULES_TO_PACKAGES = None


def log_torch_model(model: Any, example: Any, class_names: list[str], step: int = 0) -> str:
    """Log the model with mlflow.pytorch (signature + example) and a plain checkpoint.

    step: training's last step. MLflow links the run's metrics at the model's step to the
    model, so these are the final training metrics (see runs.fresh_step for the ONNX models), and
    system metrics sampled at that step too, in a run that lasts more seconds than it has steps.

    The checkpoint (state_dict + registry name) is what later stages load (artifacts.load_run_model).
    """
    import torch
    from mlflow.models import infer_signature

    from pipeline.checkpoint import save_checkpoint

    # Standard layout for the saved program: channels_last is a training-speed choice, and
    # torch.export's archive warns about (and mis-groups) its strided weights.
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(example)).numpy()
    with requirements_as_given():
        info = mlflow.pytorch.log_model(
            model,
            name=TORCH_MODEL_NAME,
            step=step,
            signature=infer_signature(example, logits),
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    mlflow.set_tag(TORCH_URI_TAG, info.model_uri)  # later stages link their metrics to it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
        save_checkpoint(model, path, class_names)
        mlflow.log_artifact(str(path), str(Path(CHECKPOINT_ARTIFACT).parent))
    mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
    return info.model_uri


def log_onnx_model(path: Path, variant: str, input_example: Any, output_example: Any, step: int = 0) -> str:
    """Log an .onnx file with mlflow.onnx (CPU provider, signature, example) as one file; returns its URI.

    The run is tagged with the URI, so `check-parity` and the predictor find the model from the run id.
    """
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    with requirements_as_given():
        info = mlflow.onnx.log_model(
            onnx.load_model(str(path)),
            name=ONNX_MODEL_NAMES[variant],
            step=step,
            signature=infer_signature(input_example, output_example),
            input_example=input_example,
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,
            # Given, not inferred: inference would load the model in a subprocess for nothing.
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
        )
    mlflow.set_tag(ONNX_URI_TAGS[variant], info.model_uri)
    return info.model_uri


def log_image_model(onnx_path: Path, example_image: bytes, step: int = 0) -> str:
    """Log the model that serves photos: a torch-free pyfunc (the conversion + onnxruntime) over the .onnx file.

    Its signature takes one binary column, `image` (PNG/JPEG bytes; MLflow's scoring server decodes
    base64 in JSON), and returns class, class_id, probability, top_k, preprocessing and error.
    """
    import onnxruntime
    import pandas as pd
    import PIL
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    import pipeline

    top = Array(Object([Property("class", DataType.string), Property("probability", DataType.double)]))
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "class", required=False),
                ColSpec(DataType.long, "class_id", required=False),
                ColSpec(DataType.double, "probability", required=False),
                ColSpec(top, "top_k", required=False),
                ColSpec(DataType.string, "preprocessing", required=False),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", DataType.long, 3), ParamSpec("preprocess", DataType.string, "auto")]),
    )
    with requirements_as_given():
        info = mlflow.pyfunc.log_model(
            name=IMAGE_MODEL_NAME,
            python_model=str(Path(__file__).with_name("image_model.py")),  # a model from code: no pickle
            artifacts={"onnx_model": str(onnx_path)},  # image_model.ONNX_ARTIFACT, not imported: it sets the model
            signature=signature,
            input_example=pd.DataFrame({"image": [example_image]}),
            step=step,
            code_paths=[str(Path(pipeline.__file__).parent)],
            # Given, not inferred: no torch in a model that only converts images and runs onnxruntime.
            pip_requirements=[
                f"onnxruntime=={onnxruntime.__version__}",
                f"pillow=={PIL.__version__}",
                f"numpy=={np.__version__}",
                f"pandas=={pd.__version__}",
            ],
        )
    mlflow.set_tag(IMAGE_URI_TAG, info.model_uri)
    return info.model_uri


def run_model_uri(run_id: str, tag: str) -> str | None:
    """The models:/<model_id> URI a stage tagged the run with (TORCH_URI_TAG, ONNX_URI_TAGS[...]), if any."""
    return get_run(run_id).tag(tag)


def run_onnx_model_uri(run_id: str, variant: str = "fp32") -> str:
    """The URI of the ONNX model `export-onnx` logged to the run (see log_onnx_model)."""
    model_uri = run_model_uri(run_id, ONNX_URI_TAGS[variant])
    if not model_uri:
        raise PipelineError(
            f"run {run_id} has no logged {variant} ONNX model; run `pipeline export-onnx --run-id {run_id}` "
            "first, or pass --onnx PATH"
        )
    return model_uri


def download_onnx_model(model_uri: str, dst: Path) -> Path:
    """The .onnx file of a logged ONNX model (runs:/, models:/<name>@<alias>, models:/<id>), in dst.

    Downloads the files only, never loads the pyfunc: the predictor process stays free of torch.
    """
    connect(write=False)
    check_model_uri(model_uri)  # an unknown name, version or alias gets a hint, not MLflow's error
    try:
        with quiet_downloads():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except ImportError as exc:  # s3://, gs://, ...: MLflow needs that store's client library
        raise PipelineError(
            f"cannot fetch model {model_uri!r}: its store needs the {exc.name or 'client'} package, which is not "
            "installed; download the .onnx file and give its path, or use runs:/ or models:/ URIs of this store"
        ) from None
    except Exception as exc:  # MLflow raises MlflowException, OSError or ValueError (http:// URIs) here
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PipelineError(
            f"cannot fetch model {model_uri!r} from the tracking store {tracking_uri()}: {first_line}"
        ) from None
    if local.is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavors = mlflow.models.Model.load(str(mlmodel)).flavors
        if "onnx" not in flavors:
            raise PipelineError(
                f"model {model_uri!r} is not an ONNX model (flavors: {', '.join(flavors)}); "
                "export it with `pipeline export-onnx` and predict with the logged ONNX model"
            )
        return local / flavors["onnx"]["data"]
    found = sorted(local.rglob("*.onnx"))
    if len(found) != 1:
        raise PipelineError(f"model {model_uri!r}: expected one .onnx file, found {len(found)}")
    return found[0]


def run_id_for_model(model_uri: str) -> str:
    """The run that logged a model: runs:/<run_id>/..., models:/<model_id> or models:/<name>/<version>."""
    if model_uri.startswith("runs:/"):
        run_id = model_uri.removeprefix("runs:/").split("/")[0]
    else:
        try:
            run_id = mlflow.models.get_model_info(model_uri).run_id
        except (mlflow.exceptions.MlflowException, OSError) as exc:
            raise PipelineError(
                f"no model {model_uri!r} in the tracking store {tracking_uri()} ({exc}); "
                f"give runs:/<run_id>/{TORCH_MODEL_NAME}, models:/<model_id> or models:/<name>/<version>"
            ) from None
        if not run_id:
            raise PipelineError(f"model {model_uri!r} was not logged from a run; evaluate it with --run-id instead")
    get_run(run_id)
    return run_id


TEMPERATURE_PARAM = "temperature"


def log_temperature(model: Any, class_names: list[str], temperature: float, validation_images: int) -> None:
    """The calibration temperature into the active run, its torch LoggedModel and its checkpoint.

    A param of the run (export-onnx writes it into the ONNX metadata from there), a param of the
    PyTorch LoggedModel, and a key of checkpoint/model.pt, rewritten with the same weights.
    """
    from pipeline.checkpoint import save_checkpoint
    from pipeline.tracking.log import log_params
    from pipeline.tracking.runs import active_run_id

    value = f"{temperature:.6g}"
    log_params({TEMPERATURE_PARAM: value, "temperature_fit_images": validation_images})
    torch_uri = get_run(active_run_id()).tags.get(TORCH_URI_TAG)
    if torch_uri:
        mlflow.log_model_params({TEMPERATURE_PARAM: value}, model_id=model_id_of(torch_uri))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
        save_checkpoint(model.cpu(), path, class_names, float(value))
        mlflow.log_artifact(str(path), str(Path(CHECKPOINT_ARTIFACT).parent))
