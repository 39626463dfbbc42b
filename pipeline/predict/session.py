"""The model side of prediction: a Predictor is a contract-checked onnxruntime session plus the array path.

The array path (`Predictor.predict_arrays`) does no per-image Python work; it is the path
`pipeline bench` times.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pipeline.errors import PipelineError
from pipeline.onnx_contract import ContractSession, to_unit_range


def is_model_uri(model: str) -> bool:
    """runs:/..., models:/..., or any scheme://: something MLflow resolves, not a local path."""
    return model.startswith(("runs:/", "models:/")) or "://" in model


class Predictor(ContractSession):
    """An exported classifier, ready to predict: a .onnx file, or an MLflow model folder holding one.

    Everything that can be wrong with the model fails here, before any input is read (see ContractSession).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        threads: int = 0,
        graph_optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        path = Path(model_path)
        if path.is_dir():  # an MLflow model folder (MLmodel + model.onnx)
            found = sorted(path.glob("*.onnx"))
            if len(found) != 1:
                raise PipelineError(f"{path}: expected one .onnx file in the folder, found {len(found)}")
            path = found[0]
        if not path.is_file():
            raise PipelineError(f"model {path} not found; give a .onnx file or an MLflow model URI (runs:/, models:/)")
        super().__init__(path, threads, graph_optimization)

    def predict_arrays(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits for decoded images, uint8 (N, H, W) 0-255 or float (N, H, W) in [0, 1].

        The lean path: one scaling into a reused float32 buffer and one session run per
        batch, no per-image Python work.
        """
        images = np.asarray(images)
        if images.ndim == 4:
            images = images.reshape(len(images), *images.shape[2:])
        buffer = np.empty((min(batch_size, len(images)), 1, *self.image_size), dtype=np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = buffer[: len(chunk)]
            to_unit_range(chunk, batch[:, 0])
            out.append(self.predict_logits(batch))
        if not out:
            return np.empty((0, len(self.class_names)), dtype=np.float32)
        return np.concatenate(out)
