"""Photo-like images made from test images, and what converting them costs `pipeline predict`.

`photo_like` turns a 28x28 Fashion-MNIST image into what users feed the predictor: a dark garment
on a light, tinted background, enlarged 8-16x, off-centre on a non-square canvas. It is the
inverse of nothing in pipeline.predict.convert (it never calls it), so the tests, the docs'
example and this benchmark measure the conversion against independently made photos.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.bench.config import BenchConfig
from pipeline.data import load_split
from pipeline.predict import PredictConfig, Predictor, predict


def photo_like(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 28x28 light-on-black uint8 image -> an RGB photo: dark on a light tint, 8-16x, off-centre, not square."""
    scale = int(rng.integers(8, 17))
    garment = Image.fromarray(255 - image).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    side = 28 * scale
    width = side + int(rng.integers(side // 4, side))  # a wide or a tall canvas, never square
    height = side + int(rng.integers(side // 8, side // 2))
    if rng.random() < 0.5:
        width, height = height, width + side // 3
    canvas = Image.new("L", (width, height), 255)
    canvas.paste(garment, (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))))
    tint = np.array([1.0, rng.uniform(0.9, 0.98), rng.uniform(0.78, 0.92)], dtype=np.float32)  # warm light
    rgb = np.asarray(canvas, dtype=np.float32)[..., None] * tint[rng.permutation(3)]
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def write_photos(images: np.ndarray, folder: Path, seed: int = 0, formats: tuple[str, ...] = ("jpg", "png")) -> list:
    """One photo per image, the formats in turn (half JPEG, half PNG by default); the paths, in order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        ext = formats[i % len(formats)]
        path = folder / f"{i:05d}.{ext}"
        photo_like(image, rng).save(path, **({"quality": 90} if ext == "jpg" else {}))
        paths.append(path)
    return paths


# Quick mode is a smoke run: 100 photos tell the conversion's worth (accuracy about ten times
# higher with it) as plainly as 2,000 do.
PHOTO_COUNTS = {"quick": 100, "full": 2000}


def bench_photos(cfg: BenchConfig, onnx_path: Path, count: int | None = None) -> dict[str, Any]:
    """images/s of `pipeline predict` on N photo PNGs, --preprocess none against auto (the conversion).

    Both read and decode the same files and run the same model; auto also converts each photo
    (trim, resize, sharpen, centre, negate), so the ratio is what the conversion costs.
    """
    count = count or PHOTO_COUNTS["quick" if cfg.quick else "full"]
    test = load_split(cfg.data_dir, "test")
    predictor = Predictor(onnx_path)
    results: dict[str, Any] = {"images": count, "format": "png"}
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        paths = write_photos(test.images[:count], Path(tmp), formats=("png",))
        sizes = [Image.open(p).size for p in paths[:50]]
        results["mean_pixels"] = float(np.mean([w * h for w, h in sizes]))
        for mode in ("none", "auto"):
            runs = []
            for _ in range(cfg.rounds):
                out = Path(tmp) / f"{mode}.csv"
                started = time.perf_counter()
                summary = predict(predictor, [tmp], out, PredictConfig(preprocess=mode))
                runs.append(summary.predicted / (time.perf_counter() - started))
            results[mode] = {"images_per_s": float(np.median(runs))}
        labels = test.labels[:count]
        for mode in ("none", "auto"):
            predicted = pd.read_csv(Path(tmp) / f"{mode}.csv")["predicted_id"].to_numpy()
            results[mode]["accuracy"] = float((predicted == labels).mean())
    results["auto_vs_none"] = results["auto"]["images_per_s"] / results["none"]["images_per_s"]
    return results
