"""Batch prediction with onnxruntime: images, folders, arrays and IDX files -> a table.

Torch-free on purpose: this module imports onnxruntime, numpy, Pillow and pandas (pyarrow
for .parquet), so a machine that only predicts needs none of the training stack. Inputs
are decoded lazily and written batch by batch, so memory stays bounded however many
images go through: arrays are sliced (memory-mapped .npy, streamed IDX), images are
opened one at a time, and each batch's rows are written before the next is decoded.

The array path (`Predictor.predict_arrays`) does no per-image Python work; that is the
path a benchmark should time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import onnxruntime as ort
import pandas as pd
from PIL import Image, ImageOps

from pipeline.config import CLASS_NAMES, INPUT_SHAPE, ONNX_OUTPUT_NAME
from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.idx import open_maybe_gzip, read_header

OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}
ARRAY_CHUNK = 4096  # images sliced from an array or IDX file at a time: bounds memory, amortizes overhead
# Rows per Parquet row group: readers handle a few large groups far better than thousands
# of batch-sized ones, and 64k rows of results is still only a few MB of memory.
PARQUET_ROW_GROUP = 65_536
TRIM_LEVEL = 12  # pixels at most this bright (5% of 255, as Fashion-MNIST's trimming) count as background


@dataclass(frozen=True)
class PredictConfig:
    batch_size: int = 256
    top_k: int = 3
    # Source images show dark objects on a light background (product photos), the
    # opposite of Fashion-MNIST's light garments on black.
    invert: bool = False


def is_model_uri(model: str) -> bool:
    """runs:/..., models:/..., or any scheme://: something MLflow resolves, not a local path."""
    return model.startswith(("runs:/", "models:/")) or "://" in model


# --------------------------------------------------------------------------- the model


class Predictor:
    """One onnxruntime session over an exported classifier, checked against the ONNX contract.

    Everything that can be wrong with the model (missing, unreadable, wrong input shape,
    class names that don't match the logits) fails here, before any input is read.
    """

    def __init__(self, model_path: str | os.PathLike, threads: int = 0):
        path = Path(model_path)
        if path.is_dir():  # an MLflow model folder (MLmodel + model.onnx)
            found = sorted(path.glob("*.onnx"))
            if len(found) != 1:
                raise PipelineError(f"{path}: expected one .onnx file in the folder, found {len(found)}")
            path = found[0]
        if not path.is_file():
            raise PipelineError(f"model {path} not found; give a .onnx file or an MLflow model URI (runs:/, models:/)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads  # 0: one per physical core
        options.inter_op_num_threads = 1  # a chain of convolutions: nothing runs side by side
        options.log_severity_level = 3  # onnxruntime's own warnings would clutter the CLI's stderr
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise PipelineError(f"{path}: not a readable ONNX model ({str(exc).strip()[:300]})") from None
        self.path = path
        self.metadata_warning: str | None = None  # for the CLI to show; the library doesn't print
        self._check_signature()
        self.class_names = self._read_class_names()

    def _check_signature(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
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
        names = [o.name for o in outputs]
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

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 1, H, W) in [0, 1] -> float32 logits (N, num_classes), one session run."""
        return self.session.run([self.output_name], {self.input_name: batch})[0]

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


def to_unit_range(images: np.ndarray, out: np.ndarray) -> None:
    """Scale images into `out` (float32, same shape) as ToTensor() does: uint8 / 255."""
    if images.dtype == np.uint8:
        np.divide(images, np.float32(255.0), out=out, dtype=np.float32)
    else:
        out[...] = images


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


# --------------------------------------------------------------------------- inputs


@dataclass
class Images:
    """Decoded images from one source, uint8 (n, H, W) or float32 (n, H, W) in [0, 1]."""

    source: str
    images: np.ndarray
    first_index: int | None  # position in an array or IDX file; None for an image file


@dataclass
class Failure:
    source: str
    index: int | None
    error: str


def image_extensions() -> set[str]:
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def expand_inputs(inputs: Iterable[str], stdin: IO[str] | None = None) -> Iterator[str]:
    """Command-line inputs -> file paths, lazily: `-` reads paths from stdin, folders are walked."""
    extensions = None
    for item in inputs:
        if item == "-":
            stream = stdin if stdin is not None else sys.stdin
            lines = (line.strip() for line in stream)
            yield from expand_inputs((line for line in lines if line and line != "-"), stdin)
            continue
        path = Path(item)
        if path.is_dir():
            extensions = extensions or image_extensions()
            empty = True
            for found in sorted(path.rglob("*")):
                if found.suffix.lower() in extensions and found.is_file():
                    empty = False
                    yield str(found)
            if empty:
                yield item  # read_source reports the empty folder as a failed input
        else:
            yield item


def read_inputs(inputs: Iterable[str], config: PredictConfig, image_size: tuple[int, int], stdin=None):
    """Every input as Images or Failure items, in order; nothing is read before it is needed."""
    for path in expand_inputs(inputs, stdin):
        try:
            yield from read_source(Path(path), config, image_size)
        except Exception as exc:  # a file that breaks mid-read: one error row, the run goes on
            yield Failure(path, None, describe(exc))


def describe(exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    return message if isinstance(exc, (PipelineError, OSError)) else f"{type(exc).__name__}: {message}"


def read_source(path: Path, config: PredictConfig, image_size: tuple[int, int]) -> Iterator[Images | Failure]:
    source = str(path)
    if not path.exists():
        yield Failure(source, None, "no such file or folder")
        return
    if path.is_dir():
        yield Failure(source, None, "no image files in this folder (nor in its subfolders)")
        return
    suffix = path.suffix.lower()
    if suffix == ".npy":
        yield from read_array(source, np.load(path, mmap_mode="r", allow_pickle=False), image_size)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if not archive.files:
                yield Failure(source, None, "empty .npz archive")
            for key in archive.files:
                name = source if len(archive.files) == 1 else f"{source}[{key}]"
                yield from read_array(name, archive[key], image_size)
    elif is_idx(path):
        yield from read_idx_images(path, image_size)
    else:
        try:
            image = load_image(path, image_size, config.invert)
        except Exception as exc:  # Pillow raises many types for broken or foreign files
            yield Failure(source, None, f"not a readable image, array or IDX file ({describe(exc)})")
        else:
            yield Images(source, image[None], None)


def read_array(source: str, array: np.ndarray, image_size: tuple[int, int]) -> Iterator[Images | Failure]:
    """Slices of an (N, H, W) or (N, 1, H, W) array; images with NaNs or out-of-range values fail alone."""
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 4 and array.shape[1] == 1:
        array = array.reshape(array.shape[0], *array.shape[2:])
    if array.ndim != 3 or array.shape[1:] != image_size:
        h, w = image_size
        yield Failure(source, None, f"array of shape {array.shape}; expected (N, {h}, {w}) or (N, 1, {h}, {w})")
        return
    kind = array.dtype.kind
    if kind not in "uif" or array.dtype == np.bool_:
        yield Failure(source, None, f"array of dtype {array.dtype}; expected uint8 0-255 or float 0-1")
        return
    for start in range(0, len(array), ARRAY_CHUNK):
        chunk = np.asarray(array[start : start + ARRAY_CHUNK])
        if chunk.dtype == np.uint8:
            yield Images(source, chunk, start)
            continue
        if kind == "f":
            # NaN fails both comparisons, so this also catches NaN and infinity.
            valid = ((chunk >= 0) & (chunk <= 1)).all(axis=(1, 2))
            problem = "NaN, infinite or outside [0, 1] (float images must be scaled to 0-1)"
            converted = chunk.astype(np.float32, copy=False)
        else:
            valid = ((chunk >= 0) & (chunk <= 255)).all(axis=(1, 2))
            problem = "integer values outside 0-255"
            converted = np.clip(chunk, 0, 255).astype(np.uint8)
        yield from split_valid(source, converted, start, valid, problem)


def split_valid(source: str, chunk: np.ndarray, start: int, valid: np.ndarray, problem: str):
    """Runs of valid images as Images, each invalid image as a Failure, in order."""
    if valid.all():
        yield Images(source, chunk, start)
        return
    bad = np.flatnonzero(~valid)
    begin = 0
    for i in bad:
        if i > begin:
            yield Images(source, chunk[begin:i], start + begin)
        yield Failure(source, start + int(i), f"image values are {problem}")
        begin = i + 1
    if begin < len(chunk):
        yield Images(source, chunk[begin:], start + begin)


def is_idx(path: Path) -> bool:
    """An IDX header (raw or gzipped), recognized by its magic: two zero bytes, type, rank."""
    try:
        with open_maybe_gzip(path) as stream:
            read_header(stream, str(path))
    except (OSError, EOFError, PipelineError):
        return False
    return True


def read_idx_images(path: Path, image_size: tuple[int, int]) -> Iterator[Images | Failure]:
    """Stream an IDX image file chunk by chunk, so even a huge gzipped one needs little memory.

    pipeline.idx.read_idx reads whole files; prediction must not, so only the header is read
    whole and the pixels are read in slices.
    """
    source = str(path)
    with open_maybe_gzip(path) as stream:
        dtype, shape = read_header(stream, source)
        h, w = image_size
        if dtype != np.uint8 or shape[1:] not in ((h, w), (1, h, w)):
            kind = dtype.name
            yield Failure(source, None, f"IDX file holds {kind} {shape}; expected uint8 images (N, {h}, {w})")
            return
        count, per_image = shape[0], h * w
        for start in range(0, count, ARRAY_CHUNK):
            wanted = min(ARRAY_CHUNK, count - start)
            data = stream.read(wanted * per_image)
            got = len(data) // per_image
            if got:
                images = np.frombuffer(data, dtype=np.uint8, count=got * per_image).reshape(got, h, w)
                yield Images(source, images, start)
            if got < wanted:
                yield Failure(source, start + got, f"truncated IDX file: header says {count} images, data ends here")
                return


def load_image(path: Path, size: tuple[int, int], invert: bool = False) -> np.ndarray:
    """Any image file -> uint8 (H, W) that looks like Fashion-MNIST: a light object on black.

    Transparent pixels become background (black, or white before --invert flips it). An
    image of another size is trimmed to its object, padded to the target's aspect ratio so
    the garment keeps its proportions, then resized with antialiasing.
    """
    h, w = size
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("L", (4 * w, 4 * h))  # decode big photos at a reduced scale: much faster
        image.load()
        image = ImageOps.exif_transpose(image)
    return image_to_array(image, size, invert)


def image_to_array(image: Image.Image, size: tuple[int, int], invert: bool = False) -> np.ndarray:
    h, w = size
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        wide = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or wide.max() > 255 else 1.0
        image = Image.fromarray(np.clip(wide / scale, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        background = 255 if invert else 0
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (background, background, background, 255)), rgba)
    gray = image.convert("L")
    if invert:
        gray = ImageOps.invert(gray)
    if gray.size == (w, h):
        return np.asarray(gray, dtype=np.uint8)  # already in the training format: taken as it is
    # Fashion-MNIST's own conversion trimmed the background margins before resizing, so the
    # garment fills the frame along its longer side; a photo with a wide margin needs the same.
    mask = gray.point([0] * (TRIM_LEVEL + 1) + [255] * (255 - TRIM_LEVEL))
    box = mask.getbbox()
    if box:
        gray = gray.crop(box)
    width, height = gray.size
    # The smallest canvas with the target's aspect ratio that holds the picture, centred on black.
    canvas_w, canvas_h = max(width, -(-height * w // h)), max(height, -(-width * h // w))
    if (canvas_w, canvas_h) != (width, height):
        canvas = Image.new("L", (canvas_w, canvas_h), 0)
        canvas.paste(gray, ((canvas_w - width) // 2, (canvas_h - height) // 2))
        gray = canvas
    return np.asarray(gray.resize((w, h), Image.Resampling.LANCZOS), dtype=np.uint8)


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Up to batch_size rows in input order; the rows without an error have an image in `images`."""

    images: np.ndarray  # float32 (n_ok, 1, H, W), a view of a buffer reused by the next batch
    sources: list[str] = field(default_factory=list)
    indices: list[int | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


def iter_batches(items: Iterable[Images | Failure], batch_size: int, image_size: tuple[int, int]) -> Iterator[Batch]:
    buffer = np.empty((batch_size, 1, *image_size), dtype=np.float32)
    batch, filled = Batch(buffer[:0]), 0

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


# --------------------------------------------------------------------------- output


def result_columns(top_k: int) -> list[str]:
    columns = ["source", "index", "predicted_id", "predicted_class", "confidence"]
    for k in range(1, top_k + 1):
        columns += [f"top{k}_class", f"top{k}_prob"]
    return columns + ["error"]


def batch_table(batch: Batch, logits: np.ndarray, class_names: list[str], top_k: int) -> pd.DataFrame:
    """One row per input of the batch; prediction columns are empty where the row has an error."""
    rows = len(batch.sources)
    ok = np.array([e is None for e in batch.errors], dtype=bool)
    probs = softmax(logits.astype(np.float32, copy=True))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    names = np.asarray(class_names, dtype=object)

    def spread(values: np.ndarray, fill) -> np.ndarray:
        out = np.full(rows, fill, dtype=object if fill is None else values.dtype)
        out[ok] = values
        return out

    missing = ~ok
    table = {
        "source": batch.sources,
        "index": pd.array(batch.indices, dtype="Int64"),
        "predicted_id": pd.arrays.IntegerArray(spread(order[:, 0].astype(np.int64), 0), missing),
        "predicted_class": spread(names[order[:, 0]], None),
        "confidence": spread(np.take_along_axis(probs, order[:, :1], 1)[:, 0], np.nan),
    }
    for k in range(top_k):
        table[f"top{k + 1}_class"] = spread(names[order[:, k]], None)
        table[f"top{k + 1}_prob"] = spread(np.take_along_axis(probs, order[:, k : k + 1], 1)[:, 0], np.nan)
    table["error"] = batch.errors
    return pd.DataFrame(table)


class TableWriter:
    """Appends batch tables to CSV, JSON Lines or Parquet."""

    def __init__(self, stream: IO, fmt: str, top_k: int):
        self.stream, self.fmt, self.first = stream, fmt, True
        self.columns = result_columns(top_k)
        self.parquet = None
        self.pending: list = []  # Parquet: batch tables gathered into one row group
        self.pending_rows = 0
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            fields = [("source", pa.string()), ("index", pa.int64()), ("predicted_id", pa.int64())]
            fields += [("predicted_class", pa.string()), ("confidence", pa.float32())]
            for k in range(1, top_k + 1):
                fields += [(f"top{k}_class", pa.string()), (f"top{k}_prob", pa.float32())]
            # A fixed schema: a first batch of only errors must not decide the column types.
            self.schema = pa.schema([*fields, ("error", pa.string())])
            self.parquet = pq.ParquetWriter(stream, self.schema)

    def write(self, table: pd.DataFrame) -> None:
        if self.fmt == "csv":
            table.to_csv(self.stream, header=self.first, index=False, float_format="%.6g", lineterminator="\n")
        elif self.fmt == "jsonl":
            # json.dumps, not DataFrame.to_json, which escapes the "/" in "T-shirt/top".
            lines = []
            for record in table.to_dict("records"):
                clean = {k: json_value(v) for k, v in record.items()}
                lines.append(json.dumps(clean, ensure_ascii=False))
            self.stream.write("\n".join(lines) + "\n")
        else:
            import pyarrow as pa

            self.pending.append(pa.Table.from_pandas(table, schema=self.schema, preserve_index=False))
            self.pending_rows += len(table)
            if self.pending_rows >= PARQUET_ROW_GROUP:
                self.flush_row_group()
        self.first = False

    def flush_row_group(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.parquet.write_table(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def abort(self) -> None:
        """After a failure: release the Parquet writer now, not in __del__ after its file is closed."""
        if self.parquet is not None:
            self.parquet.close()
            self.parquet = None

    def close(self) -> None:
        if self.parquet is not None:
            self.flush_row_group()
            self.parquet.close()
        elif self.first and self.fmt == "csv":  # no rows at all: still a valid CSV with its header
            self.stream.write(",".join(self.columns) + "\n")


def json_value(value):
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def output_format(output: Path | None) -> str:
    if output is None:
        return "csv"
    fmt = OUTPUT_FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise PipelineError(f"--output {output}: unknown format; name it .csv, .parquet or .jsonl")
    if not output.parent.is_dir():
        raise PipelineError(f"--output {output}: folder {output.parent} does not exist")
    return fmt


# --------------------------------------------------------------------------- the run


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
    items = read_inputs(inputs, config, predictor.image_size, stdin)
    try:
        for batch in iter_batches(items, config.batch_size, predictor.image_size):
            if len(batch.images):
                logits = predictor.predict_logits(batch.images)
            else:
                logits = np.empty((0, len(predictor.class_names)), dtype=np.float32)
            writer.write(batch_table(batch, logits, predictor.class_names, config.top_k))
            summary.read += len(batch.sources)
            summary.predicted += len(batch.images)
            summary.failed = summary.read - summary.predicted
    except BaseException:
        writer.abort()
        raise
    writer.close()
