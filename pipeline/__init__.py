"""fashion-pipeline: train, track, export and serve Fashion-MNIST classifiers.

Kept import-free on purpose: `pipeline --help` and the onnxruntime predictor must not
pay for torch or mlflow.
"""

__version__ = "0.1.0"
