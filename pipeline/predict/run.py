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
from pipeline.predict.convert import PREPROCESS_MODES
from pipeline.predict.inputs import Failure, Images, read_inputs
from pipeline.predict.session import Predictor
from pipeline.predict.writers import Batch, TableWriter, batch_table, output_format, softmax


@dataclass(frozen=True)
class PredictConfig:
    batch_size: int = 256
    top_k: int = 3
    # auto: dataset-like images as they are, the rest through Fashion-MNIST's conversion
    # (pipeline.predict.convert); fashion-mnist: always converted; none: only decoded and resized.
    preprocess: str = "auto"
    # The old flag, kept as an alias: the conversion, with the background taken as light.
    invert: bool = False
    contact_sheet: Path | None = None  # a PNG of the first contact_sheet_size images: original, converted, top-3
    contact_sheet_size: int = 24


@dataclass
class SheetEntry:
    source: str
    original: object  # a Pillow image (a thumbnail)
    converted: np.ndarray  # uint8 (H, W), what the model saw
    note: str
    top: list[tuple[str, float]]  # the top-3 classes with their probabilities


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
            batch.notes.append(None)
            batch.originals.append(None)
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
            batch.notes.extend([item.note] * n)
            batch.originals.extend([item.original] * n)
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
    contact_sheet: Path | None = None

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
    if config.preprocess not in PREPROCESS_MODES:
        raise PipelineError(f"--preprocess {config.preprocess}: expected one of {', '.join(PREPROCESS_MODES)}")
    sheet = config.contact_sheet
    if sheet is not None:
        if config.contact_sheet_size < 1:
            raise PipelineError(f"--contact-sheet-size {config.contact_sheet_size}: must be at least 1")
        if sheet.suffix.lower() != ".png":
            raise PipelineError(f"--contact-sheet {sheet}: name it .png")
        if not sheet.parent.is_dir():
            raise PipelineError(f"--contact-sheet {sheet}: folder {sheet.parent} does not exist")
    fmt = output_format(output)
    summary = PredictSummary(output=output)
    entries: list[SheetEntry] = []
    started = time.perf_counter()
    if output is None:
        writer = TableWriter(stdout or sys.stdout, fmt, config.top_k)
        run_batches(predictor, inputs, config, writer, summary, stdin, entries)
    else:
        text = ("wb", {}) if fmt == "parquet" else ("w", {"encoding": "utf-8", "newline": ""})
        with atomic_write(output, text[0], **text[1]) as stream:
            run_batches(predictor, inputs, config, TableWriter(stream, fmt, config.top_k), summary, stdin, entries)
    summary.seconds = time.perf_counter() - started
    if sheet is not None and entries:
        from pipeline.figures import contact_sheet_figure, save_figure

        summary.contact_sheet = save_figure(contact_sheet_figure(entries), sheet)
    return summary


def run_batches(
    predictor, inputs, config, writer: TableWriter, summary: PredictSummary, stdin, entries: list[SheetEntry]
) -> None:
    wanted = config.contact_sheet_size if config.contact_sheet is not None else 0
    items = read_inputs(inputs, predictor.image_size, config.invert, stdin, config.preprocess, wanted)
    temperature = predictor.temperature
    try:
        for batch in iter_batches(items, config.batch_size, predictor.image_size):
            if len(batch.images):
                logits = predictor.predict_logits(batch.images)
            else:
                logits = np.empty((0, len(predictor.class_names)), dtype=np.float32)
            if wanted:
                collect_sheet_entries(batch, logits, predictor.class_names, entries, temperature)
            writer.write(batch_table(batch, logits, predictor.class_names, config.top_k, temperature))
            summary.read += len(batch.sources)
            summary.predicted += len(batch.images)
            summary.failed = summary.read - summary.predicted
    except BaseException:
        writer.abort()
        raise
    writer.close()


def collect_sheet_entries(
    batch: Batch, logits: np.ndarray, class_names: list[str], entries: list[SheetEntry], temperature: float = 1.0
) -> None:
    """The contact sheet's rows of this batch: image files that kept their original, with their top 3
    (calibrated as the table's probabilities are: softmax(logits / temperature))."""
    image_index = -1
    for row, (error, original) in enumerate(zip(batch.errors, batch.originals, strict=True)):
        if error is not None:
            continue
        image_index += 1
        if original is None:
            continue
        pixels = np.rint(batch.images[image_index, 0] * 255).astype(np.uint8)  # copied: the buffer is reused
        probs = softmax(logits[image_index : image_index + 1].astype(np.float32) / temperature)[0]
        top = [(class_names[i], float(probs[i])) for i in np.argsort(-probs, kind="stable")[:3]]
        entries.append(SheetEntry(batch.sources[row], original, pixels, batch.notes[row], top))
