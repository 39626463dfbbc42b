"""The served image model's logic: encoded photos (PNG/JPEG bytes) -> class, probability, top-k, per row.

Torch-free and MLflow-free: pipeline.tracking.image_model wraps it in an MLflow pyfunc model, which
`mlflow models serve` loads. Each image goes through the same conversion as `pipeline predict`
(pipeline.predict.convert); a payload that is not an image gets an error in its row, and the
other rows are still answered.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd
from PIL import UnidentifiedImageError

from pipeline.onnx_contract import to_unit_range
from pipeline.predict import convert
from pipeline.predict.inputs import describe
from pipeline.predict.session import Predictor
from pipeline.predict.writers import softmax

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ["class", "class_id", "probability", "top_k", "preprocessing", "error"]
MAX_TOP_K = 10
BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/\s]+=*\s*")


def as_bytes(value) -> bytes:
    """A row's payload as the image file's bytes.

    MLflow's scoring server base64-decodes a binary column sent as `dataframe_split` or
    `dataframe_records`, but hands the `inputs` form's strings over as their UTF-8 bytes, still
    base64: text made only of base64's alphabet is decoded here (no image file format starts so).
    """
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"a {type(value).__name__}, not image bytes; send the image file's bytes base64-encoded")
    value = bytes(value)
    if BASE64_TEXT.fullmatch(value):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
    return value


def classify_images(predictor: Predictor, payloads: Iterable, top_k: int = 3, preprocess: str = "auto") -> pd.DataFrame:
    """One row per payload: class, class_id, probability, top_k [{class, probability}], preprocessing, error."""
    top_k = max(1, min(int(top_k), len(predictor.class_names), MAX_TOP_K))
    rows: list[dict] = []
    pixels, ok_rows = [], []
    for value in payloads:
        row = dict.fromkeys(OUTPUT_COLUMNS)
        try:
            prepared = convert.load(as_bytes(value), predictor.image_size, preprocess)
        except UnidentifiedImageError:
            row["error"] = "not an image: the bytes are no image format Pillow reads (PNG, JPEG, GIF, WebP, ...)"
        except Exception as exc:  # Pillow raises many types for broken or foreign files
            row["error"] = f"not a readable image ({describe(exc)})"
        else:
            row["preprocessing"] = prepared.note
            pixels.append(prepared.pixels)
            ok_rows.append(len(rows))
        rows.append(row)
    if pixels:
        batch = to_unit_range(np.stack(pixels)[:, None])
        # Calibrated as `pipeline predict`'s table: softmax(logits / the model's temperature).
        probs = softmax(predictor.predict_logits(batch).astype(np.float32) / predictor.temperature)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        for i, r in enumerate(ok_rows):
            best = int(order[i, 0])
            rows[r].update(
                {
                    "class": predictor.class_names[best],
                    "class_id": best,
                    "probability": float(probs[i, best]),
                    "top_k": [{"class": predictor.class_names[j], "probability": float(probs[i, j])} for j in order[i]],
                }
            )
    # Object columns: an error row's empty cells stay None (JSON null, not NaN) and class ids stay integers.
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)
