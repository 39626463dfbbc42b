"""Prediction inputs: command-line arguments -> decoded images, lazily, one source at a time.

Images, folders (walked recursively), .npy/.npz arrays (memory-mapped, sliced), IDX files
(raw or gzipped, streamed) and `-` for paths on stdin. A source that cannot be read becomes a
Failure item (one error row) and the run goes on.
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.idx import GZIP_ERRORS, GZIP_MAGIC, open_maybe_gzip, read_header
from pipeline.predict import convert

ARRAY_CHUNK = 4096  # images sliced from an array or IDX file at a time: bounds memory, amortizes overhead
SHEET_THUMBNAIL = 160  # pixels: the longest edge of an original kept for --contact-sheet


@dataclass
class Images:
    """Decoded images from one source, uint8 (n, H, W) or float32 (n, H, W) in [0, 1]."""

    source: str
    images: np.ndarray
    first_index: int | None  # position in an array or IDX file; None for an image file
    note: str = convert.AS_IS  # what was done to the image(s): the table's preprocessing column
    original: Image.Image | None = None  # the decoded image file, kept only for a contact sheet


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


def read_inputs(
    inputs: Iterable[str],
    image_size: tuple[int, int],
    invert: bool = False,
    stdin=None,
    preprocess: str = "auto",
    keep_originals: int = 0,
):
    """Every input as Images or Failure items, in order; nothing is read before it is needed.

    keep_originals: the first that many image files keep their decoded picture (for a contact sheet).
    """
    kept = 0
    for path in expand_inputs(inputs, stdin):
        try:
            for item in read_source(Path(path), image_size, invert, preprocess, keep=kept < keep_originals):
                kept += isinstance(item, Images) and item.original is not None
                yield item
        except Exception as exc:  # a file that breaks mid-read: one error row, the run goes on
            yield Failure(path, None, describe(exc))


def describe(exc: BaseException) -> str:
    message = str(exc).strip() or type(exc).__name__
    return message if isinstance(exc, (PipelineError, OSError)) else f"{type(exc).__name__}: {message}"


def read_source(
    path: Path, image_size: tuple[int, int], invert: bool = False, preprocess: str = "auto", keep: bool = False
) -> Iterator[Images | Failure]:
    source = str(path)
    if not path.exists():
        yield Failure(source, None, "no such file or folder")
        return
    if path.is_dir():
        yield Failure(source, None, "no image files in this folder (nor in its subfolders)")
        return
    if not path.is_file():  # reading a FIFO, socket or device could block forever
        yield Failure(source, None, "not a regular file (a FIFO, socket or device); give image, array or IDX files")
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
            image, steps = convert.open_image(path)
        except Exception as exc:  # Pillow raises many types for broken or foreign files
            yield Failure(source, None, f"not a readable image, array or IDX file ({describe(exc)})")
            return
        prepared = convert.prepare(image, image_size, preprocess, invert)
        prepared.steps[:0] = steps
        original = None
        if keep:  # a thumbnail of what the user gave, for the contact sheet; the full image is not kept
            original = convert.decode(image)[0]
            original.thumbnail((SHEET_THUMBNAIL, SHEET_THUMBNAIL))
        yield Images(source, prepared.pixels[None], None, prepared.note, original)


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
    damage = gzip_damage(path)
    if damage:
        yield Failure(source, None, f"corrupt gzip file ({damage}); no image of it was predicted")
        return
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


def gzip_damage(path: Path) -> str | None:
    """What is wrong with a gzipped file's stream, or None (also for a file that isn't gzip).

    The streamed read below stops where the header says the images end, before gzip's CRC at the
    end of the stream is checked: a flipped byte would decode to a wrong image and no error. So the
    whole stream is read through first, in slices: a few tens of milliseconds for the test set.
    """
    with open(path, "rb") as probe:
        if probe.read(2) != GZIP_MAGIC:
            return None
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 20):
                pass
    except GZIP_ERRORS as exc:
        return str(exc) or type(exc).__name__
    return None
