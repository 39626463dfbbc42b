"""The prediction run: inputs -> batches -> one session run each -> the table, written as it goes.

Memory stays bounded however many images go through: inputs are decoded lazily, batches
reuse one buffer, and each batch's rows are written before the next is decoded.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.onnx_contract import to_unit_range
from pipeline.predict.inputs import Failure, Images, read_inputs
from pipeline.predict.session import Predictor
from pipeline.predict.writers import Batch, TableWriter, batch_table, output_format


@dataclass(frozen=True)
class PredictConfig:
    batch_size: int = 256
    top_k: int = 3
    # Source images show dark objects on a light background (product photos), the
    # opposite of Fashion-MNIST's light garments on black.
    invert: bool = False


# Images the batch buffer holds at first; it grows (doubling, up to --batch-size) only while a batch
# has more images, so memory follows the inputs there are, not a --batch-size of 1e9.
FIRST_BUFFER_IMAGES = 1024


def iter_batches(items: Iterable[Images | Failure], batch_size: int, image_size: tuple[int, int]) -> Iterator[Batch]:
    buffer = np.empty((min(batch_size, FIRST_BUFFER_IMAGES), 1, *image_size), dtype=np.float32)
    batch, filled = Batch(buffer[:0]), 0

    def make_room(n: int) -> None:
        nonlocal buffer
        if filled + n <= len(buffer):
            return
        grown = np.empty((min(batch_size, max(filled + n, 2 * len(buffer))), 1, *image_size), dtype=np.float32)
        grown[:filled] = buffer[:filled]
        buffer = grown

    def flush() -> Batch:
        nonlocal batch, filled
        done = batch
        done.images = buffer[:filled]
        batch, filled = Batch(buffer[:0]), 0
        return done

    for item in items:
        if isinstance(item, Failure):
            batch.sources.append(item.source)
            batch.indices.append(item.index)
            batch.errors.append(item.error)
            if len(batch.sources) >= batch_size:
                yield flush()
            continue
        taken = 0
        while taken < len(item.images):
            part = item.images[taken : taken + batch_size - len(batch.sources)]
            n = len(part)
            make_room(n)
            to_unit_range(part, buffer[filled : filled + n, 0])
            batch.sources.extend([item.source] * n)
            if item.first_index is None:
                batch.indices.extend([None] * n)
            else:
                begin = item.first_index + taken
                batch.indices.extend(range(begin, begin + n))
            batch.errors.extend([None] * n)
            filled += n
            taken += n
            if len(batch.sources) >= batch_size:
                yield flush()
    if batch.sources:
        yield flush()


@dataclass
class PredictSummary:
    read: int = 0
    predicted: int = 0
    failed: int = 0
    seconds: float = 0.0
    output: Path | None = None

    @property
    def images_per_s(self) -> float:
        return self.predicted / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"Read {self.read:,} images: {self.predicted:,} predicted, {self.failed:,} failed, "
            f"in {self.seconds:.2f} s ({self.images_per_s:,.0f} images/s)"
        )


def predict(
    predictor: Predictor,
    inputs: Iterable[str],
    output: Path | None = None,
    config: PredictConfig | None = None,
    stdout: IO[str] | None = None,
    stdin: IO[str] | None = None,
) -> PredictSummary:
    """Predict every input and write the table to `output` (by extension) or CSV to `stdout`.

    The file appears only when the run completes: rows go to a temporary file beside it,
    renamed at the end, so a crash or Ctrl-C leaves no half-written table.
    """
    config = config or PredictConfig()
    if not 1 <= config.top_k <= len(predictor.class_names):
        raise PipelineError(f"--top-k {config.top_k}: the model has {len(predictor.class_names)} classes")
    if config.batch_size < 1:
        raise PipelineError(f"--batch-size {config.batch_size}: must be at least 1")
    fmt = output_format(output)
    summary = PredictSummary(output=output)
    started = time.perf_counter()
    if output is None:
        run_batches(predictor, inputs, config, TableWriter(stdout or sys.stdout, fmt, config.top_k), summary, stdin)
    else:
        text = ("wb", {}) if fmt == "parquet" else ("w", {"encoding": "utf-8", "newline": ""})
        with atomic_write(output, text[0], **text[1]) as stream:
            run_batches(predictor, inputs, config, TableWriter(stream, fmt, config.top_k), summary, stdin)
    summary.seconds = time.perf_counter() - started
    return summary


def run_batches(predictor, inputs, config, writer: TableWriter, summary: PredictSummary, stdin) -> None:
    items = read_inputs(inputs, predictor.image_size, config.invert, stdin)
    temperature = predictor.temperature
    try:
        for batch in iter_batches(items, config.batch_size, predictor.image_size):
            if len(batch.images):
                logits = predictor.predict_logits(batch.images)
            else:
                logits = np.empty((0, len(predictor.class_names)), dtype=np.float32)
            writer.write(batch_table(batch, logits, predictor.class_names, config.top_k, temperature))
            summary.read += len(batch.sources)
            summary.predicted += len(batch.images)
            summary.failed = summary.read - summary.predicted
    except BaseException:
        writer.abort()
        raise
    writer.close()
