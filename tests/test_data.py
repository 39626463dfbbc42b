"""Download (folder, system copy, loopback HTTP), verification, atomicity and loading."""

from __future__ import annotations

import functools
import gzip
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import data
from pipeline.cli import cli
from pipeline.data import SHA256, FolderSource, UrlSource, download, load_split, raw_dir
from pipeline.errors import PipelineError
from pipeline.idx import encode_idx, parse_idx, read_idx, write_idx
from tests.helpers import write_synthetic_dataset


@pytest.fixture
def fake_release(tmp_path, monkeypatch) -> Path:
    """A folder of four .gz files laid out like the real release, with our digests pinned to them."""
    src = write_synthetic_dataset(tmp_path / "release", n_train=50, n_test=20, compress=True)
    folder = raw_dir(src)
    digests = {name: data.sha256(gzip.decompress((folder / f"{name}.gz").read_bytes())) for name in SHA256}
    monkeypatch.setattr(data, "SHA256", digests)
    return folder


@pytest.fixture
def loopback_server(fake_release):
    """Serve the fake release over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(fake_release))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_idx_round_trip(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    for name in ("x.idx", "x.idx.gz"):
        write_idx(tmp_path / name, array)
        assert np.array_equal(read_idx(tmp_path / name), array)
    assert (tmp_path / "x.idx.gz").read_bytes()[:2] == b"\x1f\x8b"


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_idx_rejects_bad_files(damage):
    payload = encode_idx(np.zeros((3, 4), dtype=np.uint8))
    payload = b"\x01" + payload[1:] if damage == "magic" else payload[:-1]
    with pytest.raises(PipelineError, match="not an IDX file|truncated"):
        parse_idx(payload, "bad")


def test_download_from_folder_then_rerun_is_noop(fake_release, tmp_path):
    target = tmp_path / "data"
    report = download(target, [FolderSource(fake_release)])
    assert set(report.sources.values()) == {str(fake_release)}
    assert files_in(raw_dir(target)) == set(SHA256)
    again = download(target, [FolderSource(fake_release)])
    assert again.already_present


def test_download_over_loopback_http(loopback_server, tmp_path):
    target = tmp_path / "data"
    result = CliRunner().invoke(cli, ["download", "--data-dir", str(target), "--source", loopback_server])
    assert result.exit_code == 0, result.output
    assert loopback_server in result.output
    assert files_in(raw_dir(target)) == set(SHA256)
    # The files are the decompressed IDX content, readable by our loader.
    split = load_split(target, "train")
    assert split.images.shape == (50, 28, 28) and split.labels.shape == (50,)
    rerun = CliRunner().invoke(cli, ["download", "--data-dir", str(target), "--source", loopback_server])
    assert rerun.exit_code == 0 and "present and verified" in rerun.output


def test_corrupt_file_fails_and_leaves_nothing(fake_release, tmp_path):
    name = "t10k-labels-idx1-ubyte"
    good = gzip.decompress((fake_release / f"{name}.gz").read_bytes())
    (fake_release / f"{name}.gz").write_bytes(gzip.compress(good[:-1] + b"\x07"))
    target = tmp_path / "data"
    result = CliRunner().invoke(cli, ["download", "--data-dir", str(target), "--source", str(fake_release)])
    assert result.exit_code != 0
    assert name in result.output and data.SHA256[name] in result.output
    assert data.sha256(gzip.decompress((fake_release / f"{name}.gz").read_bytes())) in result.output
    assert str(fake_release) in result.output and "Traceback" not in result.output
    assert name not in files_in(raw_dir(target))  # nothing unverified, no temp files either
    assert not any(n.endswith(".part") for n in files_in(raw_dir(target)))


def test_truncated_gzip_over_http_fails_clearly(fake_release, loopback_server, tmp_path):
    name = "train-images-idx3-ubyte"
    blob = (fake_release / f"{name}.gz").read_bytes()
    (fake_release / f"{name}.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PipelineError) as info:
        download(tmp_path / "data", [UrlSource(loopback_server)])
    message = str(info.value)
    assert name in message and "unreadable gzip" in message and data.SHA256[name] in message
    assert name not in files_in(raw_dir(tmp_path / "data"))


def test_missing_everywhere_lists_sources_and_hint(fake_release, tmp_path):
    (fake_release / "t10k-images-idx3-ubyte.gz").unlink()
    dead = UrlSource("http://127.0.0.1:9/", timeout=2)  # port 9 (discard): nothing listens
    with pytest.raises(PipelineError) as info:
        download(tmp_path / "data", [FolderSource(fake_release), dead])
    message = str(info.value)
    assert "t10k-images-idx3-ubyte" in message
    assert str(fake_release) in message and "127.0.0.1:9" in message and "unreachable" in message
    assert "dataset-fashion-mnist" in message and "--source" in message


def test_corrupt_existing_file_is_replaced(fake_release, tmp_path):
    target = tmp_path / "data"
    download(target, [FolderSource(fake_release)])
    victim = raw_dir(target) / "train-labels-idx1-ubyte"
    victim.write_bytes(b"garbage")
    report = download(target, [FolderSource(fake_release)])
    assert report.sources["train-labels-idx1-ubyte"] == str(fake_release)
    assert data.is_verified(victim, "train-labels-idx1-ubyte")


def test_bad_source_path_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["download", "--data-dir", str(tmp_path), "--source", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "no such folder" in result.output and "Traceback" not in result.output


def test_load_split_reads_synthetic_idx(synthetic_data_dir):
    split = load_split(synthetic_data_dir, "test")
    assert split.images.dtype == np.uint8 and split.images.shape == (200, 28, 28)
    assert split.labels.dtype == np.int64 and set(split.labels) == set(range(10))
    assert set(split.digests) == {"t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}


def test_load_split_missing_data_says_run_download(tmp_path):
    with pytest.raises(PipelineError, match="pipeline download"):
        load_split(tmp_path, "train")


@pytest.mark.real_data
def test_real_data_matches_published_digests_and_torchvision(real_data_dir):
    import torchvision

    for name, digest in SHA256.items():
        content = (raw_dir(real_data_dir) / name).read_bytes()
        assert data.sha256(content) == digest and len(content) == data.SIZES[name]
    ours = load_split(real_data_dir, "test")
    theirs = torchvision.datasets.FashionMNIST(str(real_data_dir), train=False, download=False)
    assert len(ours) == len(theirs) == 10_000
    assert np.array_equal(ours.images, theirs.data.numpy()) and np.array_equal(ours.labels, theirs.targets.numpy())


# --------------------------------------------------------------------------- bad input (issue 10)


def corrupt_deflate(path: Path) -> None:
    """XOR byte 20 (inside the deflate data): zlib itself fails, not the gzip header or CRC check."""
    blob = bytearray(path.read_bytes())
    blob[20] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("over", ["folder", "http"])
def test_corrupt_deflate_data_is_a_clear_error(fake_release, loopback_server, tmp_path, over):
    name = "train-images-idx3-ubyte"
    corrupt_deflate(fake_release / f"{name}.gz")
    source = loopback_server if over == "http" else str(fake_release)
    target = tmp_path / "data"
    result = CliRunner().invoke(cli, ["download", "--data-dir", str(target), "--source", source])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{name} from {source}" in result.output and "unreadable gzip" in result.output
    assert name not in files_in(raw_dir(target))


def test_gzip_bomb_stops_at_the_expected_size(fake_release, tmp_path, monkeypatch):
    import tracemalloc
    import zlib

    name = "train-images-idx3-ubyte"
    expected = len(gzip.decompress((fake_release / f"{name}.gz").read_bytes()))
    monkeypatch.setattr(data, "SIZES", {**data.SIZES, name: expected})
    bomb = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    chunk = bytes(1 << 20)
    blob = b"".join([*(bomb.compress(chunk) for _ in range(64)), bomb.flush()])  # 64 MB of zeros
    (fake_release / f"{name}.gz").write_bytes(blob)

    tracemalloc.start()
    try:
        with pytest.raises(PipelineError) as info:
            download(tmp_path / "data", [FolderSource(fake_release)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"more than {expected:,} bytes" in str(info.value) and name in str(info.value)
    assert peak < 8 << 20  # decompression stopped near the expected size, far below the bomb's 64 MB
    assert name not in files_in(raw_dir(tmp_path / "data"))


@pytest.mark.parametrize("case", ["raw is a file", "under /proc", "immutable raw"])
def test_unwritable_data_dir_is_one_clear_error(fake_release, tmp_path, make_unwritable, case):
    if case == "raw is a file":
        data_dir = tmp_path / "data"
        raw_dir(data_dir).parent.mkdir(parents=True)
        raw_dir(data_dir).write_text("a file where the folder should be")
    elif case == "under /proc":
        data_dir = Path("/proc/x")
    else:  # the raw/ folder itself can't be written
        data_dir = tmp_path / "data"
        raw_dir(data_dir).mkdir(parents=True)
        make_unwritable(raw_dir(data_dir))
    result = CliRunner().invoke(cli, ["download", "--data-dir", str(data_dir), "--source", str(fake_release)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "cannot write" in result.output
    assert str(raw_dir(data_dir)) in result.output and "--data-dir" in result.output


def test_negative_timeout_is_refused_by_click(tmp_path):
    for timeout in ("-1", "0", "nan", "inf"):
        result = CliRunner().invoke(cli, ["download", "--data-dir", str(tmp_path), "--timeout", timeout])
        assert result.exit_code == 2 and "--timeout" in result.output and "Traceback" not in result.output


def test_downloaded_files_are_readable_by_others(fake_release, tmp_path):
    import os
    import stat

    old = os.umask(0o077)  # the strictest usual umask: mkstemp's 0600 would stay 0600
    try:
        download(tmp_path / "data", [FolderSource(fake_release)])
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in raw_dir(tmp_path / "data").iterdir()}
    assert modes == dict.fromkeys(SHA256, 0o644)


def test_unreachable_url_source_says_it_fell_back(fake_release, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_COPY", fake_release)  # stands in for Debian's copy
    monkeypatch.setattr(data, "TORCHVISION_MIRRORS", ())
    dead = "http://127.0.0.1:9/"  # port 9 (discard): nothing listens
    target = tmp_path / "data"
    result = CliRunner().invoke(cli, ["download", "--data-dir", str(target), "--source", dead, "--timeout", "2"])
    assert result.exit_code == 0, result.output
    assert f"fell back from {dead}: unreachable" in result.output
    assert files_in(raw_dir(target)) == set(SHA256)
