"""ONNX export: a trained model as one self-contained, checked .onnx file, plus an int8 variant.

The file follows the contract in pipeline/config.py (input "input", float32 (N, 1, 28, 28)
in [0, 1] with a dynamic batch; output "logits"; metadata_props ONNX_METADATA_KEYS), which
the torch-free predictor reads. Files are written to a temporary name beside the target and
moved into place only once `onnx.checker` (full check) accepts them, so a failure never
leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pipeline.config import ONNX_INPUT_NAME, ONNX_METADATA_KEYS, ONNX_OUTPUT_NAME
from pipeline.errors import PipelineError

INPUT_SCALING = "[0, 1] (uint8 pixel / 255)"
INT8_SUFFIX = ".int8.onnx"
# An extra metadata key on quantised files only; the contract keys are copied unchanged.
QUANTIZATION_KEY = "quantization"


@dataclass(frozen=True)
class QuantizeConfig:
    """Static int8 quantisation: QDQ format, calibrated on a seeded sample of training images."""

    calibration_images: int = 500
    calibration_batch: int = 100
    seed: int = 0
    # Per-channel weight scales keep the conv filters' very different ranges apart.
    per_channel: bool = True


def default_output_name(model_name: str) -> str:
    return f"{model_name}.onnx"


def int8_path_for(fp32_path: Path) -> Path:
    """model.onnx -> model.int8.onnx, beside it."""
    fp32_path = Path(fp32_path)
    return fp32_path.with_name(fp32_path.name.removesuffix(".onnx") + INT8_SUFFIX)


def resolve_output(output: Path, model_name: str) -> Path:
    """The file `--output` names (a directory gets `<model>.onnx`), checked to be writable.

    Checked before the export starts, so a typo fails in a second rather than after it.
    """
    output = Path(output)
    if output.is_dir():
        output = output / default_output_name(model_name)
    parent = output.parent
    if not parent.is_dir():
        raise PipelineError(
            f"cannot write {output}: {parent} is not an existing directory; create it or choose another --output"
        )
    if not os.access(parent, os.W_OK):
        raise PipelineError(f"cannot write {output}: no write permission in {parent}; choose another --output")
    return output


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`; renamed onto it only if the block succeeds."""
    path = Path(path)
    try:
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}; choose another output path") from None
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}; choose another output path") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_checked(model_proto: onnx.ModelProto, path: Path) -> Path:
    """Write one self-contained file atomically; onnx.checker (full check) must accept it first."""
    with atomic_path(path) as tmp:
        onnx.save_model(model_proto, tmp, save_as_external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)
    return Path(path)


def contract_metadata(
    class_names: list[str] | tuple[str, ...],
    input_shape: tuple[int, ...],
    model_name: str,
    source_run_id: str,
) -> dict[str, str]:
    metadata = {
        "class_names": json.dumps(list(class_names)),
        "input_layout": "NCHW float32 N x " + " x ".join(str(d) for d in input_shape),
        "input_scaling": INPUT_SCALING,
        "model_name": model_name,
        "source_run_id": source_run_id,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }
    assert tuple(metadata) == ONNX_METADATA_KEYS  # the contract and this writer must not drift apart
    return metadata


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an .onnx file, without loading its weights."""
    model = onnx.load_model(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def export_onnx(
    model: nn.Module,
    path: Path | str,
    class_names: list[str] | tuple[str, ...],
    model_name: str,
    source_run_id: str,
    opset: int | None = None,
) -> Path:
    """Export `model` in eval mode to one checked .onnx file at `path`; returns the path.

    The batch dimension is dynamic; the other input dims come from `model.input_shape`.
    The model's train/eval mode is restored afterwards.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise PipelineError(f"cannot write {path}: {path.parent} is not an existing directory")
    input_shape = tuple(model.input_shape)
    device = next(model.parameters()).device
    # Export from a batch of 2: from a batch of 1 torch.export would specialise N to 1.
    example = torch.zeros(2, *input_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[ONNX_INPUT_NAME],
            output_names=[ONNX_OUTPUT_NAME],
            dynamic_shapes=({0: "batch"},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    finally:
        model.train(was_training)
    proto = program.model_proto
    produced = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    if opset is not None and produced != opset:
        raise PipelineError(
            f"could not export at opset {opset} (the exporter produced opset {produced}); try --opset 18 or newer"
        )
    onnx.helper.set_model_props(proto, contract_metadata(class_names, input_shape, model_name, source_run_id))
    proto.doc_string = f"{model_name} Fashion-MNIST classifier exported from MLflow run {source_run_id}"
    return save_checked(proto, path)


def example_input(images: np.ndarray, count: int = 2) -> np.ndarray:
    """The first `count` uint8 (N, H, W) images as model input, for MLflow's signature and example."""
    return images[:count, None].astype(np.float32) / np.float32(255.0)


def onnx_logits(path: Path | str, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: inputs})[0]


# ----------------------------------------------------------------- int8


def calibration_sample(images: np.ndarray, config: QuantizeConfig = QuantizeConfig()) -> np.ndarray:
    """A seeded random sample of uint8 (N, H, W) images, scaled as the model input: float32 (n, 1, H, W)."""
    rng = np.random.default_rng(config.seed)
    count = min(config.calibration_images, len(images))
    chosen = np.sort(rng.choice(len(images), size=count, replace=False))
    return images[chosen, None].astype(np.float32) / np.float32(255.0)


def quantize_int8(
    fp32_path: Path | str,
    output_path: Path | str,
    calibration_inputs: np.ndarray,
    config: QuantizeConfig = QuantizeConfig(),
) -> Path:
    """Static int8 QDQ quantisation of an exported model; keeps its metadata. Returns output_path."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [
                    {ONNX_INPUT_NAME: calibration_inputs[i : i + config.calibration_batch]}
                    for i in range(0, len(calibration_inputs), config.calibration_batch)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    fp32_path, output_path = Path(fp32_path), Path(output_path)
    metadata = read_metadata(fp32_path)
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        # Shape inference and graph optimisation first, as onnxruntime's quantisation guide asks.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantized = Path(tmp) / "quantized.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        proto = onnx.load_model(str(quantized))
    metadata[QUANTIZATION_KEY] = (
        f"int8 static QDQ (uint8 activations, int8 {'per-channel' if config.per_channel else 'per-tensor'} "
        f"weights), calibrated on {len(calibration_inputs)} training images, seed {config.seed}"
    )
    onnx.helper.set_model_props(proto, metadata)
    return save_checked(proto, output_path)
