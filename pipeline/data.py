"""Fashion-MNIST on disk: obtain it (verified, atomically) and load it into arrays.

Layout is torchvision's, `DATA_DIR/FashionMNIST/raw/<name>` with the decompressed IDX
files, so `torchvision.datasets.FashionMNIST(DATA_DIR, download=False)` reads the same
data we train on. Files are verified by the SHA-256 of their *decompressed* content:
mirrors (Debian's package, for one) re-gzip the originals, so digests of the .gz files
differ from copy to copy while the content does not.
"""

from __future__ import annotations

import gzip
import hashlib
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from pipeline.config import CLASS_NAMES
from pipeline.errors import PipelineError
from pipeline.files import writable_folder, write_bytes
from pipeline.idx import GZIP_ERRORS, GZIP_MAGIC, parse_idx, read_header

SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# Their decompressed sizes, as their IDX headers give them: a 16-byte header and 28x28 bytes per
# image, an 8-byte header and one byte per label. Decompression stops one byte past these.
SIZES: dict[str, int] = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
# The most a source may hand us for one file, compressed or not: the largest real file is
# train-images at 26 MB gzipped, 47 MB raw (SIZES). A source that sends more is not Fashion-MNIST,
# and an endless answer stops here, on disk, never in memory.
MAX_SOURCE_BYTES = 64 << 20
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Debian's `dataset-fashion-mnist` package installs the four .gz files here.
SYSTEM_COPY = Path("/usr/share/datasets/fashion-mnist")
# The same mirror list as torchvision.datasets.FashionMNIST.mirrors (not imported, to keep
# `pipeline download` free of torch).
TORCHVISION_MIRRORS: tuple[str, ...] = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
GET_HINT = (
    "Get the data offline with Debian's package (`apt-get install dataset-fashion-mnist`, "
    f"which installs {SYSTEM_COPY}), or point `pipeline download --source` at a folder or "
    "base URL holding the four .gz files."
)


def raw_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "FashionMNIST" / "raw"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of_stream(stream: IO[bytes]) -> str:
    stream.seek(0)
    return hashlib.file_digest(stream, "sha256").hexdigest()


# --------------------------------------------------------------------------- sources


class Source:
    """Somewhere the files may be. `fetch` opens a file's raw bytes (at most MAX_SOURCE_BYTES), or
    returns None if the source has no such file."""

    label: str

    def fetch(self, name: str) -> IO[bytes] | None:
        raise NotImplementedError


def _too_large(name: str, label: str) -> PipelineError:
    return PipelineError(
        f"{name} from {label} is larger than {MAX_SOURCE_BYTES:,} bytes, more than any Fashion-MNIST file: "
        "it is not Fashion-MNIST; nothing was written. Fix or remove that copy, or use another --source."
    )


class FolderSource(Source):
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.label = str(self.folder)

    def fetch(self, name: str) -> IO[bytes] | None:
        for candidate in (self.folder / f"{name}.gz", self.folder / name):
            if candidate.is_file():
                if candidate.stat().st_size > MAX_SOURCE_BYTES:
                    raise _too_large(name, self.label)
                return open(candidate, "rb")
        return None


class DeadlinePassed(Exception):
    """A transfer that had not finished when its time was up."""


# Bytes per read of an HTTP answer: one recv at most (read1), so every read returns within the
# socket timeout and the transfer notices its deadline.
CHUNK_BYTES = 1 << 16


def fetch_url(url: str, timeout: float, limit: int) -> IO[bytes]:
    """The body at `url` in an anonymous temporary file (gone once closed, or if the process dies),
    within `timeout` seconds for the WHOLE transfer, connection and headers included.

    A socket timeout bounds each read only: a server that sends a byte a second never trips it.
    So the transfer runs in a daemon thread the caller waits for until the deadline, then gives
    up on; the thread stops at its next read and writes nothing after that. A body larger than
    `limit` bytes raises OverflowError as soon as it passes the limit.
    """
    outcome: dict[str, object] = {}
    lock, cancelled = threading.Lock(), threading.Event()

    def transfer() -> None:
        spool = tempfile.TemporaryFile()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                size = 0
                while not cancelled.is_set():
                    chunk = response.read1(CHUNK_BYTES)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > limit:
                        raise OverflowError(f"more than {limit:,} bytes")
                    spool.write(chunk)
        except BaseException as exc:  # handed to the caller, whatever it is
            spool.close()
            with lock:
                outcome["error"] = exc
            return
        with lock:
            if cancelled.is_set():
                spool.close()
            else:
                spool.seek(0)
                outcome["file"] = spool

    worker = threading.Thread(target=transfer, name=f"download {url}", daemon=True)
    worker.start()
    worker.join(timeout)
    with lock:
        if "error" in outcome:
            raise outcome["error"]  # type: ignore[misc]
        if "file" in outcome:
            return outcome["file"]  # type: ignore[return-value]
        cancelled.set()
    raise DeadlinePassed(f"no complete answer within --timeout {timeout:g} s")


class UrlSource(Source):
    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.label = self.base_url
        self.timeout = timeout
        self.failure: str | None = None

    def fetch(self, name: str) -> IO[bytes] | None:
        if self.failure:  # the host did not answer for an earlier file; don't wait again
            return None
        url = f"{self.base_url}{name}.gz"
        try:
            return fetch_url(url, self.timeout, MAX_SOURCE_BYTES)
        except OverflowError:
            raise _too_large(name, url) from None
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            self.failure = f"HTTP {exc.code} for {url}"
        except DeadlinePassed as exc:
            self.failure = str(exc)
        except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: a malformed URL
            reason = getattr(exc, "reason", exc)
            self.failure = f"unreachable ({reason})"
        except Exception as exc:  # http.client's protocol errors (a garbled answer), and the like
            self.failure = f"unusable answer ({type(exc).__name__}: {exc})"
        return None


def make_source(spec: str, timeout: float = 30.0) -> Source:
    if spec.startswith(("http://", "https://")):
        return UrlSource(spec, timeout)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"--source {spec}: no such folder (give a folder or an http(s) base URL)")
    return FolderSource(folder)


def default_sources(source: str | None, timeout: float = 30.0) -> list[Source]:
    sources: list[Source] = []
    if source:
        sources.append(make_source(source, timeout))
    if SYSTEM_COPY.is_dir():
        sources.append(FolderSource(SYSTEM_COPY))
    sources.extend(UrlSource(url, timeout) for url in TORCHVISION_MIRRORS)
    return sources


# --------------------------------------------------------------------------- download


@dataclass
class DownloadReport:
    data_dir: Path
    # file name -> where it came from ("already present" when nothing was fetched)
    sources: dict[str, str] = field(default_factory=dict)
    # source label -> why files were taken from a later source instead (unreachable, missing file)
    fell_back: dict[str, str] = field(default_factory=dict)

    @property
    def already_present(self) -> bool:
        return all(src == "already present" for src in self.sources.values())


def _read_limited(stream: IO[bytes], limit: int) -> bytes:
    """At most `limit` bytes of the stream's content, through gzip when it is gzip (by magic, not by name).

    Decompression stops after `limit` bytes, so a gzip bomb costs no more memory than the largest
    file we expect; a result of `limit` bytes means there was at least that much.
    """
    gzipped = stream.read(2) == GZIP_MAGIC
    stream.seek(0)
    if not gzipped:
        return stream.read(limit)
    with gzip.GzipFile(fileobj=stream) as unzipped:
        return unzipped.read(limit)


def _verified_content(name: str, stream: IO[bytes], source: Source) -> bytes:
    expected = SHA256[name]
    try:
        content = _read_limited(stream, SIZES[name] + 1)
    except GZIP_ERRORS as exc:
        compressed = sha256_of_stream(stream)
        content, actual = b"", f"unreadable gzip ({exc}); sha256 of the compressed bytes {compressed}"
    else:
        actual = sha256(content)
        if len(content) > SIZES[name]:
            actual = f"more than {SIZES[name]:,} bytes (decompression stopped there)"
    if actual != expected:
        raise PipelineError(
            f"{name} from {source.label} failed verification: expected sha256 {expected}, "
            f"got {actual}. The file is corrupt, truncated or not Fashion-MNIST; nothing was "
            "written. Fix or remove that copy, or use another --source."
        )
    return content


def is_verified(path: Path, name: str) -> bool:
    return path.is_file() and sha256(path.read_bytes()) == SHA256[name]


def download(data_dir: Path, sources: list[Source]) -> DownloadReport:
    """Make sure all four files are in `data_dir`, verified; fetch the missing ones.

    Each missing file is taken from the first source that has it. A source that has a
    file but a wrong one is an error (not silently skipped): it points at a broken copy
    the user should know about.
    """
    target = raw_dir(data_dir)
    report = DownloadReport(Path(data_dir))
    for name in SHA256:
        if is_verified(target / name, name):
            report.sources[name] = "already present"
    if len(report.sources) < len(SHA256):
        writable_folder(target, "the data folder", "choose another --data-dir")
    for name in SHA256:
        if name in report.sources:
            continue
        passed_over = []
        for source in sources:
            stream = source.fetch(name)
            if stream is None:
                passed_over.append(source)
                continue
            with stream:
                content = _verified_content(name, stream, source)
            write_bytes(target / name, content)
            report.sources[name] = source.label
            for skipped in passed_over:
                report.fell_back.setdefault(skipped.label, _why_not(skipped, name))
            break
        else:
            tried = "\n".join(f"  - {s.label}: {_why_not(s, name)}" for s in sources)
            raise PipelineError(f"could not find {name} in any source. Tried:\n{tried}\n{GET_HINT}")
    return report


def _why_not(source: Source, name: str) -> str:
    return getattr(source, "failure", None) or f"no {name}(.gz) there"


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Split:
    """One split decoded into memory: images (N, 28, 28) uint8, labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    digests: dict[str, str]

    def __len__(self) -> int:
        return len(self.labels)


def _present(data_dir: Path, name: str) -> Path:
    path = raw_dir(data_dir) / name
    if not path.is_file():
        raise PipelineError(
            f"Fashion-MNIST not found: {path} is missing. Run `pipeline download "
            f"--data-dir {data_dir}` first (or set --data-dir to where the data is)."
        )
    return path


def split_size(data_dir: Path, split: str) -> int:
    """How many images a split has, from its labels file's header alone (load_split checks the rest)."""
    path = _present(data_dir, SPLIT_FILES[split][1])
    with open(path, "rb") as stream:
        _, shape = read_header(stream, str(path))
    return shape[0]


def images_to_fit(train_size: int, val_size: int) -> int:
    """The training images left once the last `val_size` are held out for validation."""
    if val_size >= train_size:
        raise PipelineError(f"val_size {val_size:,} leaves no training images (the training split has {train_size:,})")
    return train_size - val_size


def load_split(data_dir: Path, split: str) -> Split:
    """Decode a split from the raw IDX files once; callers slice batches from the arrays."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r}")
    digests, arrays = {}, []
    for name in SPLIT_FILES[split]:
        path = _present(data_dir, name)
        content = path.read_bytes()
        digests[name] = sha256(content)
        arrays.append(parse_idx(content, str(path)))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise PipelineError(f"{raw_dir(data_dir)}: {split} images {images.shape} and labels {labels.shape} don't match")
    outside = labels[(labels < 0) | (labels >= len(CLASS_NAMES))]
    if len(outside):
        raise PipelineError(
            f"{path}: label {outside[0]} is not a class id (0 to {len(CLASS_NAMES) - 1}); "
            "the file is corrupt or not Fashion-MNIST labels"
        )
    return Split(images, labels.astype(np.int64), digests)


def check_known(split: Split, data_dir: Path) -> None:
    """Refuse files that are not Fashion-MNIST's, naming the first that differs.

    Training on a corrupt copy (labels shifted by one, say) would otherwise run to the end and exit 0.
    """
    for name, digest in split.digests.items():
        if digest != SHA256[name]:
            raise PipelineError(
                f"{raw_dir(data_dir) / name} differs from Fashion-MNIST's {name} (sha256 {digest}, expected "
                f"{SHA256[name]}): the file is corrupt, or other data. Restore it with `pipeline download`, or "
                "pass --allow-other-data to train on other data on purpose."
            )
