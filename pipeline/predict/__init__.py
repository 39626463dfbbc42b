"""Batch prediction with onnxruntime: images, folders, arrays and IDX files -> a table.

Torch-free on purpose: this package imports onnxruntime, numpy, Pillow and pandas (pyarrow
for .parquet), so a machine that only predicts needs none of the training stack.

  session  the Predictor: a contract-checked onnxruntime session, and the array path bench times
  inputs   command-line inputs -> decoded images or failures, lazily
  writers  the result table and its CSV / JSON Lines / Parquet writer
  run      predict(): batching, the run, its summary
"""

from pipeline.predict.run import PredictConfig, PredictSummary, predict
from pipeline.predict.session import Predictor, is_model_uri

__all__ = ["PredictConfig", "PredictSummary", "Predictor", "is_model_uri", "predict"]
