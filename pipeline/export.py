"""ONNX export: a trained model as one self-contained, checked .onnx file, plus an int8 variant.

The file follows the contract in pipeline/onnx_contract.py (input "input", float32 (N, 1, 28, 28)
in [0, 1] with a dynamic batch; output "logits"; metadata_props ONNX_METADATA_KEYS), which
the torch-free predictor reads. Files are written to a temporary name beside the target and
moved into place only once `onnx.checker` (full check) accepts them, so a failure never
leaves a half-written model behind.

By default the export is of a folded copy of the model (see `fold_for_inference`): layers
that are one affine map at inference time become one layer. Parity is always checked
against the original model, which is what proves the folding exact.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.fx
from torch import nn

from pipeline.config import ONNX_OPSETS
from pipeline.errors import PipelineError
from pipeline.files import temporary_folder, write_bytes
from pipeline.onnx_contract import (
    INPUT_SCALING,
    ONNX_INPUT_NAME,
    ONNX_METADATA_KEYS,
    ONNX_OUTPUT_NAME,
    TEMPERATURE_KEY,
    ContractSession,
    read_metadata,
    to_unit_range,
)

INT8_SUFFIX = ".int8.onnx"
# An extra metadata key on quantised files only; the contract keys are copied unchanged.
QUANTIZATION_KEY = "quantization"
# Extra metadata keys on every export: "true"/"false", and what was folded into what.
FOLDED_KEY = "folded"
FOLDED_LAYERS_KEY = "folded_layers"
# Measured on the real CNN, onnxruntime at batch 256 on the 2-core CPU: ~23k images/s folded vs
# ~17.5k plain (+30 %, all from merging fc1..fc3; torch's exporter already folds BN itself).
FOLD_BY_DEFAULT = True


QUANT_FORMATS = ("auto", "qoperator", "qdq")


@dataclass(frozen=True)
class QuantizeConfig:
    """Static int8 quantisation, calibrated on a seeded sample of training images."""

    calibration_images: int = 500
    calibration_batch: int = 100
    seed: int = 0
    # Per-channel weight scales keep the conv filters' very different ranges apart.
    per_channel: bool = True
    # auto: QOperator (QLinearConv, MatMulInteger: onnxruntime's fused int8 kernels) where the CPU
    # has VNNI or AMX to run them; else QDQ, the portable form, which any runtime can fuse or not.
    format: str = "auto"

    def resolved_format(self) -> str:
        if self.format not in QUANT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(QUANT_FORMATS)}, got {self.format!r}")
        if self.format != "auto":
            return self.format
        from pipeline import hardware

        return "qoperator" if hardware.cpu_features().vnni else "qdq"


def default_output_name(model_name: str) -> str:
    return f"{model_name}.onnx"


def int8_path_for(fp32_path: Path) -> Path:
    """model.onnx -> model.int8.onnx, beside it."""
    fp32_path = Path(fp32_path)
    return fp32_path.with_name(fp32_path.name.removesuffix(".onnx") + INT8_SUFFIX)


def resolve_output(output: Path | str, model_name: str) -> Path:
    """The file `--output` names, checked to be writable: a `.onnx` path, or a directory (an
    existing one, or any path ending in a slash, created) that gets `<model>.onnx`.

    Checked before the export starts, so a typo fails in a second rather than after it.
    """
    wants_directory = str(output).endswith(("/", os.sep))
    output = Path(output)
    if wants_directory and not output.exists():
        try:
            output.mkdir(parents=True)
        except OSError as exc:
            raise PipelineError(f"cannot create the directory {output}: {exc.strerror}") from None
    if output.is_dir():
        output = output / default_output_name(model_name)
    elif output.suffix != ".onnx":
        raise PipelineError(
            f"--output {output}: give a .onnx file name, or a directory (end it with / to have it created)"
        )
    parent = output.parent
    if not parent.is_dir():
        raise PipelineError(
            f"cannot write {output}: {parent} is not an existing directory; create it or choose another --output"
        )
    if not os.access(parent, os.W_OK):
        raise PipelineError(f"cannot write {output}: no write permission in {parent}; choose another --output")
    return output


def save_checked(model_proto: onnx.ModelProto, path: Path) -> Path:
    """Write one self-contained file atomically; onnx.checker (full check) must accept it first."""
    onnx.checker.check_model(model_proto, full_check=True)
    return write_bytes(path, model_proto.SerializeToString())


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


# ----------------------------------------------------------------- folding


@dataclass
class FoldReport:
    """What `fold_for_inference` merged, by qualified module name."""

    conv_bn: list[tuple[str, str]] = field(default_factory=list)  # (conv, batch norm folded into it)
    linear_chains: list[tuple[str, ...]] = field(default_factory=list)  # Linear layers now one Linear

    def describe(self) -> str:
        parts = [f"{conv}+{bn} (conv+bn)" for conv, bn in self.conv_bn]
        parts += ["+".join(chain) + " (linear)" for chain in self.linear_chains]
        return ", ".join(parts) or "nothing foldable"


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Identity at inference, so they may sit between two Linear layers that merge.
INFERENCE_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def fold_for_inference(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """An eval-mode copy of `model` with the layers that are one affine map at inference merged.

    (a) A conv whose only consumer is an eval-mode BatchNorm absorbs it: the BN becomes a
        per-channel scale and shift of the conv's weight and bias.
    (b) A chain of Linear layers with only dropout/identity between them (FashionCNN's
        fc1 -> drop -> fc2 -> fc3) is one Linear: W = W3 W2 W1, b = W3 (W2 b1 + b2) + b3.

    What feeds what is read from the model's traced forward (torch.fx), not from the order the
    modules were declared in: FashionDNN declares fc1, drop, fc2, fc3 too, but its forward puts
    ReLUs between them, so nothing merges there. The new weights are computed in float64 and
    then cast, so the folded model stays within float32 rounding of the original. The original
    model is never modified. A model torch.fx cannot trace is returned unfolded (a copy).
    """
    folded = copy.deepcopy(model).eval()
    report = FoldReport()
    try:
        graph = torch.fx.symbolic_trace(folded).graph
    except Exception:  # data-dependent control flow and the like: no dataflow to read, fold nothing
        return folded, report
    modules = dict(folded.named_modules())
    calls = [node.target for node in graph.nodes if node.op == "call_module"]

    def module_of(node: torch.fx.Node) -> nn.Module | None:
        # Only a module called exactly once can be rewritten without changing its other calls.
        if node.op == "call_module" and calls.count(node.target) == 1:
            return modules[node.target]
        return None

    def only_consumer(node: torch.fx.Node) -> torch.fx.Node | None:
        # A layer whose output is also used elsewhere must keep computing that output.
        return next(iter(node.users)) if len(node.users) == 1 else None

    for node in graph.nodes:
        consumer = only_consumer(node)
        conv, bn = module_of(node), consumer and module_of(consumer)
        if isinstance(conv, CONVS) and isinstance(bn, BATCH_NORMS) and bn.running_mean is not None:
            _fold_batch_norm(conv, bn)
            _replace(folded, consumer.target, nn.Identity())
            report.conv_bn.append((node.target, consumer.target))

    in_chain: set[str] = set()
    for node in graph.nodes:
        if not isinstance(module_of(node), nn.Linear) or node.target in in_chain:
            continue
        # Follow the data from this Linear through identities to the next Linear, and on.
        chain, between, pending, current = [node.target], [], [], node
        while (consumer := only_consumer(current)) is not None:
            layer = module_of(consumer)
            if isinstance(layer, INFERENCE_IDENTITIES):
                pending.append(consumer.target)
            elif isinstance(layer, nn.Linear):
                chain.append(consumer.target)
                between, pending = between + pending, []
            else:
                break
            current = consumer
        in_chain.update(chain)
        linears = [modules[name] for name in chain]
        if len(chain) < 2 or not _merge_is_smaller(linears):
            continue
        _replace(folded, chain[0], _merged_linear(linears))
        # The merged Linear now does the whole chain; what followed it passes its output on.
        for name in chain[1:] + between:
            _replace(folded, name, nn.Identity())
        report.linear_chains.append(tuple(chain))
    return folded, report


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)


@torch.no_grad()
def _fold_batch_norm(conv: nn.Module, bn: nn.Module) -> None:
    """conv <- bn(conv(.)) in eval mode: bn is y = (x - mean) / sqrt(var + eps) * gamma + beta."""
    weight = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(len(weight), dtype=torch.float64)
    gamma = bn.weight.double() if bn.weight is not None else 1.0  # affine=False: gamma 1, beta 0
    beta = bn.bias.double() if bn.bias is not None else 0.0
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    new_weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))  # one scale per output channel
    new_bias = (bias - bn.running_mean.double()) * scale + beta
    conv.weight = nn.Parameter(new_weight.to(conv.weight.dtype))
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))


def _merge_is_smaller(linears: list[nn.Linear]) -> bool:
    """Merging only pays when the merged matrix is no bigger than the chain's; a bottleneck
    chain (a low-rank factorisation such as 1000 -> 10 -> 1000) would get slower."""
    merged = linears[-1].out_features * linears[0].in_features
    return merged <= sum(linear.weight.numel() for linear in linears)


@torch.no_grad()
def _merged_linear(linears: list[nn.Linear]) -> nn.Linear:
    first, dtype = linears[0], linears[0].weight.dtype
    weight = first.weight.double()
    bias = first.bias.double() if first.bias is not None else torch.zeros(first.out_features, dtype=torch.float64)
    for linear in linears[1:]:
        # x -> W x + b, then W' (.) + b'  =  (W' W) x + (W' b + b')
        weight, bias = linear.weight.double() @ weight, linear.weight.double() @ bias
        if linear.bias is not None:
            bias = bias + linear.bias.double()
    merged = nn.Linear(first.in_features, linears[-1].out_features, device=first.weight.device, dtype=dtype)
    merged.weight.copy_(weight)
    merged.bias.copy_(bias)
    return merged


# ----------------------------------------------------------------- export


@functools.cache
def list_torchlib_once() -> bool:
    """Make torch.onnx list onnxscript's torchlib functions once per process, not at every export.

    Each export builds a registry of the ~500 torchlib functions, and listing them re-parses each
    function's source to read its domain: 0.4 s of every export, a third of one of our models'.
    The list is the same every time, so it is kept. The names are private ones of torch.onnx and
    onnxscript: where they change, this returns False and every export lists them as before.
    """
    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis

        apis = importlib.import_module(onnxscript_apis._name)
        listing = apis.get_torchlib_ops
    except (ImportError, AttributeError):
        return False
    if not hasattr(listing, "cache_info"):
        apis.get_torchlib_ops = functools.cache(listing)
    return True


def export_onnx(
    model: nn.Module,
    path: Path | str,
    class_names: list[str] | tuple[str, ...],
    model_name: str,
    source_run_id: str,
    opset: int | None = None,
    fold: bool = FOLD_BY_DEFAULT,
    temperature: float | None = None,
) -> Path:
    """Export `model` in eval mode to one checked .onnx file at `path`; returns the path.

    `temperature`: the calibration `pipeline evaluate` fitted, kept in the metadata (TEMPERATURE_KEY)
    for the predictor's softmax; the graph still outputs the raw logits.

    The batch dimension is dynamic; the other input dims come from `model.input_shape`.
    With `fold`, a folded copy (`fold_for_inference`) is exported and the metadata says what
    was folded. `model` itself is left as it was, train/eval mode included.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise PipelineError(f"cannot write {path}: {path.parent} is not an existing directory")
    low, high = ONNX_OPSETS
    if opset is not None and not low <= opset <= high:
        raise PipelineError(f"opset {opset}: torch's exporter builds opsets {low} to {high}")
    input_shape = tuple(model.input_shape)
    device = next(model.parameters()).device
    # Export from a batch of 2: from a batch of 1 torch.export would specialise N to 1.
    example = torch.zeros(2, *input_shape, device=device)
    folds = None
    if fold:
        model, folds = fold_for_inference(model)
    was_training = model.training
    model.eval()
    list_torchlib_once()
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
            f"could not export at opset {opset} (the exporter produced opset {produced}); "
            f"try another --opset from {low} to {high}, or leave it out"
        )
    metadata = contract_metadata(class_names, input_shape, model_name, source_run_id)
    metadata[FOLDED_KEY] = "true" if fold else "false"
    if folds is not None:
        metadata[FOLDED_LAYERS_KEY] = folds.describe()
    if temperature is not None:
        metadata[TEMPERATURE_KEY] = repr(float(temperature))
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = f"{model_name} Fashion-MNIST classifier exported from MLflow run {source_run_id}"
    return save_checked(proto, path)


def example_input(images: np.ndarray, count: int = 2) -> np.ndarray:
    """The first `count` uint8 (N, H, W) images as model input, for MLflow's signature and example."""
    return to_unit_range(images[:count, None])


def onnx_logits(path: Path | str, inputs: np.ndarray) -> np.ndarray:
    """The exported file's logits for model inputs, as the predictor computes them: MLflow's output example."""
    return ContractSession(path).predict_logits(inputs)


# ----------------------------------------------------------------- int8


def calibration_sample(images: np.ndarray, config: QuantizeConfig = QuantizeConfig()) -> np.ndarray:
    """A seeded random sample of uint8 (N, H, W) images, scaled as the model input: float32 (n, 1, H, W)."""
    rng = np.random.default_rng(config.seed)
    count = min(config.calibration_images, len(images))
    chosen = np.sort(rng.choice(len(images), size=count, replace=False))
    return to_unit_range(images[chosen, None])


def quantize_int8(
    fp32_path: Path | str,
    output_path: Path | str,
    calibration_inputs: np.ndarray,
    config: QuantizeConfig = QuantizeConfig(),
) -> Path:
    """Static int8 quantisation of an exported model (QOperator or QDQ: config.resolved_format());
    keeps its metadata. Returns output_path."""
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
    quant_format = config.resolved_format()
    metadata = read_metadata(fp32_path)
    with temporary_folder("quantize") as tmp:
        # Shape inference and graph optimisation first, as onnxruntime's quantisation guide asks.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantized = Path(tmp) / "quantized.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            Batches(),
            quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
            per_channel=config.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        proto = onnx.load_model(str(quantized))
    form = "QOperator" if quant_format == "qoperator" else "QDQ"
    weights = "per-channel" if config.per_channel else "per-tensor"
    metadata[QUANTIZATION_KEY] = (
        f"int8 static {form} (uint8 activations, int8 {weights} weights), "
        f"calibrated on {len(calibration_inputs)} training images, seed {config.seed}"
    )
    onnx.helper.set_model_props(proto, metadata)
    return save_checked(proto, output_path)
