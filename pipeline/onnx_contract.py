"""The ONNX contract between `export-onnx`, which writes it, and predict, parity and bench, which read it.

Held once, here: the input and output names, the metadata keys, the pixel scaling, the one
way to open an onnxruntime session, and the check that a file keeps the contract.
Torch-free on purpose (numpy, onnxruntime and the standard library only), so a machine
that only predicts needs none of the training stack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.config import CLASS_NAMES, INPUT_SHAPE
from pipeline.errors import PipelineError

ONNX_INPUT_NAME = "input"  # float32 (N, 1, 28, 28) in [0, 1], N dynamic
ONNX_OUTPUT_NAME = "logits"  # float32 (N, num_classes)
# Keys of the model's metadata_props. class_names is a JSON list in class-id order.
ONNX_METADATA_KEYS = (
    "class_names",
    "input_layout",
    "input_scaling",
    "model_name",
    "source_run_id",
    "exported_at",
    "torch_version",
    "onnx_version",
)
INPUT_SCALING = "[0, 1] (uint8 pixel / 255)"
# An extra key, written when `pipeline evaluate` fitted a temperature on the validation split: the
# graph still outputs the raw logits (so parity compares logits), and the predictor's probabilities
# are softmax(logits / temperature), calibrated. A model without it is read with temperature 1.
TEMPERATURE_KEY = "temperature"

# A division, as ToTensor() does it: multiplying by 1/255 rounds differently in the last bit.
_PIXEL_MAX = np.float32(255.0)


def to_unit_range(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Images as the model takes them: uint8 0-255 -> float32 / 255; float images are taken as already in [0, 1].

    Writes into `out` (float32, the same shape) when given, so a batch loop can reuse one buffer.
    """
    images = np.asarray(images)
    if out is None:
        out = np.empty(images.shape, dtype=np.float32)
    if images.dtype == np.uint8:
        np.divide(images, _PIXEL_MAX, out=out, dtype=np.float32)
    else:
        out[...] = images
    return out


def open_session(
    path: str | os.PathLike,
    threads: int = 0,
    graph_optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """A CPU session for an .onnx file, or a PipelineError that names the file.

    `threads` 0 is one intra-op thread per physical core. The options are parameters so that the
    benchmark's variants measure this very factory, not a copy of it.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = graph_optimization
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # a chain of convolutions: nothing runs side by side
    options.log_severity_level = 3  # onnxruntime's own warnings would clutter the CLI's stderr
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise PipelineError(f"{path}: not a readable ONNX model ({str(exc).strip()[:300]})") from None


def session_metadata(session: ort.InferenceSession) -> dict[str, str]:
    """The model's metadata_props, in the order export writes them: contract keys, then the rest by name.

    onnxruntime hands the map back unordered; a file written from it (the int8 copy) keeps export's order.
    """
    found = dict(session.get_modelmeta().custom_metadata_map)
    order = [key for key in ONNX_METADATA_KEYS if key in found]
    order += sorted(key for key in found if key not in ONNX_METADATA_KEYS)
    return {key: found[key] for key in order}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an .onnx file; graph optimisation is skipped, nothing is run."""
    return session_metadata(open_session(path, graph_optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL))


class ContractSession:
    """One onnxruntime session over an exported classifier, checked against the contract.

    Everything that can be wrong with the model (unreadable, wrong input shape or type, a fixed
    batch size, class names that don't match the logits) fails here, before any input is read.
    A model exported elsewhere may name its input and output otherwise; `exact_names` insists on
    the contract's names, for checks of what `export-onnx` itself wrote.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int = 0,
        graph_optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        exact_names: bool = False,
    ):
        self.path = Path(path)
        self.session = open_session(self.path, threads, graph_optimization)
        self.metadata_warning: str | None = None  # for the CLI to show; the library doesn't print
        self._check_signature(exact_names)
        self.class_names = self._read_class_names()

    def _check_signature(self, exact_names: bool) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = [o.name for o in outputs]
        if exact_names and ([i.name for i in inputs] != [ONNX_INPUT_NAME] or ONNX_OUTPUT_NAME not in names):
            raise PipelineError(
                f"{self.path}: inputs {[i.name for i in inputs]} and outputs {names} don't follow the export contract "
                f"(input {ONNX_INPUT_NAME!r}, output {ONNX_OUTPUT_NAME!r}); export it with `pipeline export-onnx`"
            )
        if len(inputs) != 1:
            raise PipelineError(f"{self.path}: the model takes {len(inputs)} inputs; expected one image batch")
        spec = inputs[0]
        batch, *image_shape = spec.shape if spec.shape else [None]
        if spec.type != "tensor(float)" or tuple(image_shape) != INPUT_SHAPE:
            expected = "x".join(str(d) for d in INPUT_SHAPE)
            raise PipelineError(
                f"{self.path}: the model's input {spec.name!r} is {spec.type} {spec.shape}; expected float "
                f"N x {expected} images. Export a Fashion-MNIST classifier with `pipeline export-onnx`."
            )
        if isinstance(batch, int):
            raise PipelineError(
                f"{self.path}: the model's batch size is fixed at {batch}; re-export it with a dynamic "
                "batch dimension (`pipeline export-onnx` does)"
            )
        self.input_name = spec.name
        self.output_name = ONNX_OUTPUT_NAME if ONNX_OUTPUT_NAME in names else names[0]
        self.image_size: tuple[int, int] = (image_shape[1], image_shape[2])  # (height, width)

    def _read_class_names(self) -> list[str]:
        metadata = self.session.get_modelmeta().custom_metadata_map
        output = next(o for o in self.session.get_outputs() if o.name == self.output_name)
        num_classes = output.shape[-1] if output.shape and isinstance(output.shape[-1], int) else None
        if "class_names" in metadata:
            try:
                names = json.loads(metadata["class_names"])
            except ValueError:
                names = None
            if not isinstance(names, list) or not names:
                raise PipelineError(f"{self.path}: metadata class_names is not a JSON list of names")
            names = [str(n) for n in names]
        elif num_classes == len(CLASS_NAMES):
            self.metadata_warning = "the model has no class_names metadata; using Fashion-MNIST's"
            names = list(CLASS_NAMES)
        else:
            raise PipelineError(f"{self.path}: the model has no class_names metadata; export it with export-onnx")
        if num_classes is not None and num_classes != len(names):
            raise PipelineError(
                f"{self.path}: metadata names {len(names)} classes but the model outputs {num_classes} logits"
            )
        return names

    @property
    def metadata(self) -> dict[str, str]:
        return session_metadata(self.session)

    @property
    def temperature(self) -> float:
        """The logits' divisor before the softmax (TEMPERATURE_KEY), 1.0 when the model has none."""
        value = self.session.get_modelmeta().custom_metadata_map.get(TEMPERATURE_KEY)
        return 1.0 if value is None else parse_temperature(value, str(self.path))

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 1, H, W) in [0, 1] -> float32 logits (N, num_classes), one session run."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def logits_in_batches(self, inputs: np.ndarray, batch_size: int) -> np.ndarray:
        """Model inputs already scaled, float32 (N, 1, H, W), run `batch_size` at a time."""
        if not len(inputs):
            return np.empty((0, len(self.class_names)), dtype=np.float32)
        return np.concatenate(
            [self.predict_logits(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        )


def parse_temperature(value: object, where: str) -> float:
    """A temperature read from a file or a run: a positive finite number, or a one-line error naming `where`."""
    try:
        temperature = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: temperature {value!r} is not a number") from None
    if not (np.isfinite(temperature) and temperature > 0):
        raise PipelineError(f"{where}: temperature {value!r} must be a positive finite number")
    return temperature
