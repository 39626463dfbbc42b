"""Read and write IDX files (the format of MNIST and Fashion-MNIST), with numpy only.

Kept free of torch so the onnxruntime predictor can read the test set too.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from pipeline.errors import PipelineError

# IDX type codes -> numpy dtypes (big-endian on disk).
_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}


GZIP_MAGIC = b"\x1f\x8b"
# What a broken gzip stream raises: a bad header (OSError), a cut-off stream (EOFError), or
# damaged deflate data (zlib.error, which is neither).
GZIP_ERRORS = (OSError, EOFError, zlib.error)


def parse_header(head: bytes, name: str = "<bytes>") -> tuple[np.dtype, tuple[int, ...], int]:
    """dtype, shape and header length from the first bytes of an IDX payload (4 + 4 x rank)."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise PipelineError(f"{name}: not an IDX file (bad magic number)")
    code, ndim = head[2], head[3]
    if code not in _DTYPES or ndim == 0:
        raise PipelineError(f"{name}: not an IDX file (type code 0x{code:02x}, {ndim} dims)")
    header_end = 4 + 4 * ndim
    if len(head) < header_end:
        raise PipelineError(f"{name}: truncated IDX header")
    return _DTYPES[code], struct.unpack(f">{ndim}I", head[4:header_end]), header_end


def read_header(stream: IO[bytes], name: str = "<stream>") -> tuple[np.dtype, tuple[int, ...]]:
    """Read just the header from an open IDX stream, leaving it at the first data byte."""
    head = stream.read(4)
    if len(head) == 4:
        head += stream.read(4 * head[3])
    dtype, shape, _ = parse_header(head, name)
    return dtype, shape


def parse_idx(buffer: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode one IDX payload (already decompressed) into an array, checking its header."""
    dtype, shape, header_end = parse_header(buffer[:1024], name)
    expected = int(np.prod(shape)) * dtype.itemsize
    actual = len(buffer) - header_end
    if actual != expected:
        raise PipelineError(
            f"{name}: IDX header says shape {shape} ({expected} bytes of data) "
            f"but the file holds {actual}; it is truncated or corrupt"
        )
    array = np.frombuffer(buffer, dtype=dtype, offset=header_end).reshape(shape)
    # A native-order, writable copy: torch.from_numpy warns on read-only buffers.
    return array.astype(dtype.newbyteorder("="), copy=True)


def gunzip_if_gzipped(data: bytes, limit: int | None = None) -> bytes:
    """`data` decompressed when it is gzip (by magic, not by name); raises one of GZIP_ERRORS if broken.

    With `limit`, decompression stops after that many bytes, so a gzip bomb costs no more memory
    than the largest file we expect; a result of `limit` bytes means there was at least that much.
    """
    if data[:2] != GZIP_MAGIC:
        return data
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        return stream.read(-1 if limit is None else limit)


def open_maybe_gzip(path: Path) -> IO[bytes]:
    """A binary stream of a file's content, through gzip when the file is gzipped."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def read_bytes(path: Path) -> bytes:
    """A file's content, gunzipped when it is gzip."""
    try:
        return gunzip_if_gzipped(Path(path).read_bytes())
    except GZIP_ERRORS as exc:
        raise PipelineError(f"{path}: corrupt or truncated gzip file ({exc})") from None


def read_idx(path: Path) -> np.ndarray:
    return parse_idx(read_bytes(path), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    array = np.asarray(array)
    if array.dtype not in _CODES:
        raise ValueError(f"only uint8/int8 arrays can be written, got {array.dtype}")
    header = bytes([0, 0, _CODES[array.dtype], array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write `array` as IDX; gzip it when `compress` is set or the name ends in .gz."""
    path = Path(path)
    payload = encode_idx(array)
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
