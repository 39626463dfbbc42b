"""The served image model: an MLflow pyfunc wrapper around pipeline.predict.served, torch-free.

`export-onnx` logs it beside the ONNX model (models.log_image_model); `register` registers it as
NAME-images; `mlflow models serve -m models:/NAME-images@champion` answers photos posted as
base64 in a binary `image` column. The logic lives in the predictor package; this class only
loads the .onnx artifact and hands the column over.

Logged as a model from code (this file, run again when the model is loaded), not a pickle.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc

ONNX_ARTIFACT = "onnx_model"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Photos (PNG/JPEG bytes) in, class, class id, probability and top-k out, one row each."""

    def load_context(self, context) -> None:
        from pipeline.predict.session import Predictor

        self.predictor = Predictor(context.artifacts[ONNX_ARTIFACT])

    def predict(self, context, model_input, params=None):
        from pipeline.predict.served import IMAGE_COLUMN, classify_images

        params = params or {}
        column = model_input[IMAGE_COLUMN] if IMAGE_COLUMN in model_input.columns else model_input.iloc[:, 0]
        return classify_images(
            self.predictor, column, top_k=params.get("top_k", 3), preprocess=params.get("preprocess", "auto")
        )


mlflow.models.set_model(ImageClassifier())
