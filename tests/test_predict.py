"""`pipeline predict`: onnxruntime batch prediction over images, folders, arrays and IDX files.

The model is the session's tiny trained CNN exported by the real exporter (`trained_onnx`);
torch appears here only to make fixtures and to compute the reference answers.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.bench.photos import write_photos
from pipeline.cli import cli
from pipeline.data import SPLIT_FILES, load_split, raw_dir
from pipeline.errors import PipelineError
from pipeline.idx import write_idx
from pipeline.onnx_contract import to_unit_range
from pipeline.predict import PredictConfig, Predictor, predict
from pipeline.predict.convert import load, prepare
from pipeline.predict.inputs import Failure, Images
from pipeline.predict.run import iter_batches
from pipeline.predict.writers import result_columns, softmax

TEST_IMAGES = SPLIT_FILES["test"][0]


def run_predict(*args: str, stdin: str | None = None):
    return CliRunner().invoke(cli, ["predict", *map(str, args)], input=stdin)


def read_table(path: Path | io.StringIO, fmt: str | None = None) -> pd.DataFrame:
    """Any of the three formats, with nullable dtypes so empty cells read back as <NA>."""
    fmt = fmt or Path(path).suffix.lstrip(".")
    if fmt == "parquet":
        return pd.read_parquet(path, dtype_backend="numpy_nullable")
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype_backend="numpy_nullable")
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype_backend="numpy_nullable")


def row_key(source: str, index) -> str:
    return Path(source).name + ("" if pd.isna(index) else f"#{int(index)}")


@pytest.fixture(scope="module")
def predictor(trained_onnx) -> Predictor:
    return Predictor(trained_onnx)


@pytest.fixture(scope="module")
def test_split(trained_run):
    return load_split(trained_run["data_dir"], "test")


@pytest.fixture(scope="module")
def torch_logits(trained_run, test_split) -> np.ndarray:
    """The evaluate stage's answer: the torch model's logits through compute_logits."""
    from pipeline import tracking
    from pipeline.evaluate import compute_logits, images_to_tensor

    mlflow.set_tracking_uri(trained_run["store"])
    model, _ = tracking.load_run_model(trained_run["run_id"])
    return compute_logits(model, images_to_tensor(test_split.images), batch_size=64).numpy()


# --------------------------------------------------------------------------- torch-free, instant help


def test_predictor_never_imports_torch(trained_onnx, trained_run, tmp_path):
    png = tmp_path / "one.png"
    Image.fromarray(load_split(trained_run["data_dir"], "test").images[0]).save(png)
    idx = raw_dir(trained_run["data_dir"]) / TEST_IMAGES
    code = (
        "import io, sys\n"
        "from pipeline.predict import Predictor, predict\n"
        f"p = Predictor({str(trained_onnx)!r})\n"
        f"s = predict(p, [{str(idx)!r}, {str(png)!r}], stdout=io.StringIO())\n"
        "assert s.predicted == 201, s\n"
        "heavy = [m for m in ('torch', 'mlflow', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_contract_and_predict_package_import_without_torch():
    code = (
        "import sys\n"
        "import pipeline.onnx_contract, pipeline.predict\n"
        "import pipeline.predict.inputs, pipeline.predict.run, pipeline.predict.session, pipeline.predict.writers\n"
        "heavy = [m for m in ('torch', 'torchvision', 'mlflow', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_predict_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom pipeline.cli import cli\n"
        "try:\n    cli(['predict', '--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0\n"
        "heavy = [m for m in ('torch', 'mlflow', 'onnxruntime', 'pandas', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "--top-k" in out and "--invert" in out


# --------------------------------------------------------------------------- correctness


def test_idx_prediction_matches_the_evaluate_stage(trained_run, trained_onnx, torch_logits, test_split, tmp_path):
    out = tmp_path / "pred.parquet"
    idx = raw_dir(trained_run["data_dir"]) / TEST_IMAGES
    result = run_predict("--model", trained_onnx, "-o", out, "--batch-size", "64", idx)
    assert result.exit_code == 0, result.output
    table = read_table(out)
    labels = test_split.labels
    assert len(table) == len(labels) == 200
    assert table["index"].tolist() == list(range(200)) and table["error"].isna().all()

    torch_accuracy = (torch_logits.argmax(1) == labels).mean()
    onnx_accuracy = (table["predicted_id"].to_numpy() == labels).mean()
    assert torch_accuracy > 0.5  # a model that learned something, so agreement means something
    assert onnx_accuracy == torch_accuracy
    shifted = np.exp(torch_logits - torch_logits.max(1, keepdims=True))
    torch_confidence = (shifted / shifted.sum(1, keepdims=True)).max(1)
    np.testing.assert_allclose(table["confidence"], torch_confidence, atol=1e-4)
    # Top-1 repeats the prediction; top-k is sorted.
    assert (table["top1_class"] == table["predicted_class"]).all()
    assert (table["top1_prob"] >= table["top2_prob"]).all() and (table["top2_prob"] >= table["top3_prob"]).all()
    assert "Read 200 images: 200 predicted, 0 failed" in result.output and "images/s" in result.output


def test_gzipped_idx_and_array_path_agree(trained_onnx, predictor, torch_logits, test_split, tmp_path):
    write_idx(tmp_path / "images.idx.gz", test_split.images)
    stdout = io.StringIO()
    summary = predict(predictor, [str(tmp_path / "images.idx.gz")], None, PredictConfig(batch_size=7), stdout=stdout)
    table = read_table(io.StringIO(stdout.getvalue()), "csv")
    assert summary.predicted == 200 and summary.failed == 0
    # The benchmark's array path gives the same logits as torch, batch size regardless.
    logits = predictor.predict_arrays(test_split.images, batch_size=33)
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4)
    assert (table["predicted_id"].to_numpy() == logits.argmax(1)).all()


def test_pngs_give_the_same_labels_as_the_arrays(predictor, test_split, tmp_path):
    images = test_split.images[:40]
    folder = tmp_path / "pngs"
    for i, image in enumerate(images):
        sub = folder / ("a" if i < 20 else "b/c")  # nested: folders are searched recursively
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image; skipped, not an error")
    np.save(tmp_path / "images.npy", images)
    out_png, out_npy = tmp_path / "png.csv", tmp_path / "npy.csv"
    assert run_predict("--model", predictor.path, "-o", out_png, folder).exit_code == 0
    assert run_predict("--model", predictor.path, "-o", out_npy, tmp_path / "images.npy").exit_code == 0
    from_png, from_npy = read_table(out_png), read_table(out_npy)
    assert len(from_png) == 40 and from_png["error"].isna().all() and from_png["index"].isna().all()
    order = from_png["source"].map(lambda s: int(Path(s).stem))
    assert list(order) == list(range(40))  # sorted walk: a/000..019, then b/c/020..039
    assert from_png["predicted_id"].tolist() == from_npy["predicted_id"].tolist()
    np.testing.assert_allclose(from_png["confidence"], from_npy["confidence"], atol=1e-6)


def test_array_layouts_and_scalings_agree(predictor, test_split, tmp_path):
    images = test_split.images[:30]
    np.save(tmp_path / "u8.npy", images)
    np.save(tmp_path / "f32_nchw.npy", (images / 255.0).astype(np.float32)[:, None])
    np.savez(tmp_path / "two.npz", first=images[:10], rest=(images[10:] / 255.0))  # float64
    out = tmp_path / "out.jsonl"
    result = run_predict(
        "--model", predictor.path, "-o", out, *(tmp_path / n for n in ("u8.npy", "f32_nchw.npy", "two.npz"))
    )
    assert result.exit_code == 0, result.output
    table = read_table(out)
    expected = predictor.predict_arrays(images).argmax(1).tolist()
    for source in ("u8.npy", "f32_nchw.npy"):
        rows = table[table["source"].str.endswith(source)]
        assert rows["predicted_id"].tolist() == expected and rows["index"].tolist() == list(range(30))
    npz = table[table["source"].str.contains("two.npz")]
    assert npz["source"].iloc[0].endswith("two.npz[first]") and npz["source"].iloc[-1].endswith("two.npz[rest]")
    assert npz["predicted_id"].tolist() == expected


# --------------------------------------------------------------------------- image conversion


def test_images_are_converted_to_look_like_training_images():
    size = (28, 28)
    # A light, tall object on a transparent background: transparency becomes black (the object is
    # light), the margins are trimmed, and the width is extended so the 2:1 proportions survive.
    rgba = np.zeros((60, 60, 4), dtype=np.uint8)
    rgba[10:50, 20:40] = (200, 200, 200, 255)
    done = prepare(Image.fromarray(rgba, "RGBA"), size)
    out = done.pixels
    assert out.shape == size and out.dtype == np.uint8 and "trimmed" in done.steps and "inverted" not in done.steps
    assert out[14, 14] > 150 and out[0, 14] > 150 and out[27, 14] > 150  # fills the frame's height
    assert out[14, 0] == 0 and out[14, 27] == 0 and out[:, :5].max() == 0  # black at the sides
    bright = np.argwhere(out > 100)
    assert 13 <= np.ptp(bright[:, 1]) + 1 <= 15  # half as wide as tall

    # A product photo: a dark square on white with an off-centre margin and a transparent strip.
    # Transparency behind dark pixels is white, so the strip is background and is trimmed away.
    photo = np.full((100, 300, 4), 255, dtype=np.uint8)
    photo[10:60, 200:250, :3] = 20
    photo[:, :20, 3] = 0
    done = prepare(Image.fromarray(photo, "RGBA"), size)
    assert done.pixels.min() > 200 and done.steps == ["transparency on white", "trimmed", "inverted"]
    # --invert (the old flag) is the same conversion with the background taken as light.
    np.testing.assert_array_equal(prepare(Image.fromarray(photo, "RGBA"), size, invert=True).pixels, done.pixels)

    # Images already in the dataset's format are taken exactly as they are; 16-bit and palette modes.
    noisy = np.random.default_rng(0).integers(0, 100, size, dtype=np.uint8)
    as_is = prepare(Image.fromarray(noisy), size)
    np.testing.assert_array_equal(as_is.pixels, noisy)
    assert as_is.note == "as-is"
    deep = Image.fromarray(np.full((28, 28), 65535, dtype=np.uint16))
    assert prepare(deep, size, "none").pixels.min() == 255
    palette = Image.fromarray(np.full((28, 28), 128, dtype=np.uint8)).convert("P")
    assert prepare(palette, size, "none").pixels[5, 5] == 128


def test_photo_like_inputs_predict_like_the_originals(predictor, test_split, tmp_path):
    """Test images made into 'photos' (dark on light, colour, 3x bigger, an off-centre white
    margin, JPEG or RGBA PNG) keep their labels under --invert."""
    images = test_split.images[:20]
    for i, image in enumerate(images):
        garment = Image.fromarray(255 - image).resize((84, 84), Image.Resampling.NEAREST)
        photo = Image.new("L", (160, 110), 255)
        photo.paste(garment, (50, 6))
        if i % 2:
            photo.convert("RGB").save(tmp_path / f"{i:02d}.jpg", quality=95)
        else:
            photo.convert("RGBA").save(tmp_path / f"{i:02d}.png")
    out = tmp_path / "photos.csv"
    assert run_predict("--model", predictor.path, "--invert", "-o", out, tmp_path).exit_code == 0
    table = read_table(out)
    expected = predictor.predict_arrays(images).argmax(1)
    assert len(table) == 20 and (table["predicted_id"].to_numpy() == expected).mean() >= 0.9


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_get_error_rows_and_the_run_goes_on(predictor, test_split, tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, test_split.images[:5])
    (tmp_path / "text.png").write_text("not a png")
    np.save(tmp_path / "shape.npy", np.zeros((3, 32, 32), dtype=np.uint8))
    with_nan = (test_split.images[:4] / 255.0).astype(np.float32)
    with_nan[2, 5, 5] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    write_idx(tmp_path / "labels.idx", test_split.labels.astype(np.uint8))
    truncated = tmp_path / "truncated.idx"
    write_idx(truncated, test_split.images[:10])
    truncated.write_bytes(truncated.read_bytes()[: -784 * 3 - 100])
    inputs = ["text.png", "missing.png", "shape.npy", "nan.npy", "labels.idx", "truncated.idx", "good.npy"]
    out = tmp_path / "out.csv"

    result = run_predict("--model", predictor.path, "-o", out, *(tmp_path / n for n in inputs))
    assert result.exit_code == 0, result.output
    table = read_table(out)
    errors = {
        row_key(s, i): e for s, i, e in zip(table["source"], table["index"], table["error"], strict=True) if pd.notna(e)
    }
    assert len(errors) == 6
    assert "not a readable image" in errors["text.png"] and "no such file" in errors["missing.png"]
    assert "(3, 32, 32)" in errors["shape.npy"] and "expected uint8 images" in errors["labels.idx"]
    assert "NaN" in errors["nan.npy#2"] and "truncated" in errors["truncated.idx#6"]
    predicted = table[table["error"].isna()]
    assert predicted["predicted_class"].notna().all()
    assert sorted(set(predicted["source"].map(lambda s: Path(s).name))) == ["good.npy", "nan.npy", "truncated.idx"]
    assert len(predicted) == 5 + 3 + 6
    assert f"Read {len(table)} images: 14 predicted, 6 failed" in result.output

    # --strict: the same run fails, yet the complete table is still written.
    out.unlink()
    result = run_predict("--model", predictor.path, "--strict", "-o", out, *(tmp_path / n for n in inputs))
    assert result.exit_code == 1 and "--strict: 6 input(s) failed" in result.output
    assert len(read_table(out)) == 20 and "Traceback" not in result.output


def test_nothing_predicted_exits_non_zero(predictor, tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "empty").mkdir()
    result = run_predict("--model", predictor.path, tmp_path / "a.png", tmp_path / "b.png", tmp_path / "empty")
    assert result.exit_code == 1 and "nothing was predicted" in result.output
    assert "Read 3 images: 0 predicted, 3 failed" in result.output and "Traceback" not in result.output
    assert "no image files in this folder" in result.stdout


def junk_file(folder: Path) -> Path:
    (folder / "junk.onnx").write_bytes(b"\x00garbage" * 50)
    return folder / "junk.onnx"


def tiny_onnx(path: Path, input_shape: list, metadata: dict[str, str] | None = None) -> Path:
    """A one-node model (flatten) with the given input shape: valid ONNX, wrong contract."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("make_model", "message"),
    [
        (lambda d: d / "nope.onnx", "not found"),
        (junk_file, "not a readable ONNX model"),
        (lambda d: tiny_onnx(d / "rgb.onnx", ["N", 3, 32, 32]), "expected float N x 1x28x28"),
        (lambda d: tiny_onnx(d / "fixed.onnx", [1, 1, 28, 28]), "batch size is fixed at 1"),
        (lambda d: tiny_onnx(d / "names.onnx", ["N", 1, 28, 28], {"class_names": "[1, 2"}), "not a JSON list"),
    ],
)
def test_bad_models_fail_before_any_work(tmp_path, make_model, message):
    model = make_model(tmp_path)
    out = tmp_path / "out.csv"
    result = run_predict("--model", model, "-o", out, "-", stdin="should/never/be/read.png\n")
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists() and not list(tmp_path.glob(".out.csv*"))


def test_option_mistakes_are_clear_errors(predictor, tmp_path):
    result = run_predict("--model", predictor.path, "--top-k", "11", "x.png")
    assert result.exit_code == 1 and "--top-k 11: the model has 10 classes" in result.output
    result = run_predict("--model", predictor.path, "-o", tmp_path / "out.xlsx", "x.png")
    assert result.exit_code == 1 and "name it .csv, .parquet or .jsonl" in result.output
    result = run_predict("--model", predictor.path, "-o", tmp_path / "no/such/dir/out.csv", "x.png")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_a_crash_leaves_no_half_written_output(predictor, test_split, tmp_path, monkeypatch):
    np.save(tmp_path / "many.npy", test_split.images)
    out = tmp_path / "out.parquet"
    out.write_bytes(b"the previous, complete table")
    calls = []

    def failing_run(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(batch)

    original = predictor.predict_logits
    monkeypatch.setattr(predictor, "predict_logits", failing_run)
    with pytest.raises(KeyboardInterrupt):
        predict(predictor, [str(tmp_path / "many.npy")], out, PredictConfig(batch_size=50))
    assert out.read_bytes() == b"the previous, complete table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.npy", "out.parquet"]


# --------------------------------------------------------------------------- output


def test_formats_agree_and_stdout_is_csv(predictor, test_split, tmp_path):
    np.save(tmp_path / "x.npy", test_split.images[:12])
    (tmp_path / "bad.png").write_text("nope")
    inputs = [tmp_path / "bad.png", tmp_path / "x.npy"]  # an error row first: parquet's types must not depend on it
    tables = {}
    for ext in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"out.{ext}"
        result = run_predict("--model", predictor.path, "--top-k", "2", "--batch-size", "5", "-o", out, *inputs)
        assert result.exit_code == 0, result.output
        tables[ext] = read_table(out)
    tables["stdout"] = read_table(
        io.StringIO(run_predict("--model", predictor.path, "--top-k", "2", *inputs).stdout), "csv"
    )
    for name, table in tables.items():
        assert list(table.columns) == result_columns(2), name
        assert len(table) == 13 and table["error"].notna().sum() == 1, name
        assert table["predicted_id"].iloc[1:].tolist() == tables["csv"]["predicted_id"].iloc[1:].tolist(), name
        assert table["predicted_class"].iloc[1:].tolist() == tables["csv"]["predicted_class"].iloc[1:].tolist()
        np.testing.assert_allclose(table["top2_prob"].iloc[1:], tables["parquet"]["top2_prob"].iloc[1:], atol=1e-5)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    broken, first = json.loads(lines[0]), json.loads(lines[1])
    assert broken["predicted_id"] is None and broken["confidence"] is None and "not a readable image" in broken["error"]
    assert first["index"] == 0 and first["error"] is None and isinstance(first["predicted_id"], int)
    assert first["predicted_class"] in predictor.class_names
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "out.parquet")
    assert str(schema.field("index").type) == "int64" and str(schema.field("confidence").type) == "float"


def test_jsonl_keeps_class_names_readable(tmp_path):
    from pipeline.predict.writers import TableWriter

    stream = io.StringIO()
    writer = TableWriter(stream, "jsonl", top_k=1)
    writer.write(pd.DataFrame({"source": ["a.png"], "predicted_class": ["T-shirt/top"], "confidence": [0.1234567]}))
    assert json.loads(stream.getvalue()) == {
        "source": "a.png",
        "predicted_class": "T-shirt/top",
        "confidence": 0.123457,
    }
    assert "\\/" not in stream.getvalue()


def test_paths_from_stdin(predictor, test_split, tmp_path):
    for i in range(3):
        Image.fromarray(test_split.images[i]).save(tmp_path / f"{i}.png")
    listing = "".join(f"{tmp_path / f'{i}.png'}\n" for i in range(3)) + "\n"
    result = run_predict("--model", predictor.path, "-", stdin=listing)
    assert result.exit_code == 0, result.output
    table = read_table(io.StringIO(result.stdout), "csv")
    assert [Path(s).name for s in table["source"]] == ["0.png", "1.png", "2.png"]


def test_scaling_is_bit_for_bit_what_the_torch_stages_feed_the_model(test_split):
    from pipeline.evaluate import images_to_tensor

    images = test_split.images[:50]
    np.testing.assert_array_equal(to_unit_range(images[:, None]), images_to_tensor(images).numpy())


def test_batches_are_bounded_and_keep_input_order():
    rng = np.random.default_rng(0)
    items = [
        Images("a.npy", rng.integers(0, 256, (23, 28, 28), dtype=np.uint8), 0),
        Failure("b.png", None, "broken"),
        Images("c.png", rng.integers(0, 256, (1, 28, 28), dtype=np.uint8), None),
        Images("d.npy", rng.random((9, 28, 28), dtype=np.float32), 100),
    ]
    rows, images = [], []
    for batch in iter_batches(iter(items), batch_size=8, image_size=(28, 28)):
        assert len(batch.sources) <= 8 and len(batch.images) <= 8
        assert len(batch.images) == sum(e is None for e in batch.errors)
        rows += list(zip(batch.sources, batch.indices, batch.errors, strict=True))
        images.append(batch.images.copy())  # the buffer is reused by the next batch
    assert rows[:23] == [("a.npy", i, None) for i in range(23)]
    assert rows[23:25] == [("b.png", None, "broken"), ("c.png", None, None)]
    assert rows[25:] == [("d.npy", 100 + i, None) for i in range(9)]
    stacked = np.concatenate(images)[:, 0]
    np.testing.assert_array_equal(stacked[:23], items[0].images / np.float32(255))
    np.testing.assert_array_equal(stacked[24:], items[3].images)


# --------------------------------------------------------------------------- MLflow model URIs


def test_model_uris_resolve_to_the_logged_onnx_model(
    exported_onnx_uri, use_trained_run, predictor, test_split, tmp_path
):
    """The model `pipeline export-onnx` logged, by its three kinds of URI."""
    version = mlflow.register_model(exported_onnx_uri, "predict-test-onnx").version
    mlflow.MlflowClient().set_registered_model_alias("predict-test-onnx", "champion", version)
    np.save(tmp_path / "x.npy", test_split.images[:16])
    expected = predictor.predict_arrays(test_split.images[:16]).argmax(1).tolist()
    run_uri = f"runs:/{use_trained_run['run_id']}/onnx_model"
    for uri in (exported_onnx_uri, run_uri, "models:/predict-test-onnx@champion"):
        result = run_predict("--model", uri, tmp_path / "x.npy")
        assert result.exit_code == 0, (uri, result.output)
        assert read_table(io.StringIO(result.stdout), "csv")["predicted_id"].tolist() == expected, uri

    result = run_predict("--model", "models:/no-such-model@champion", tmp_path / "x.npy")
    assert result.exit_code == 1 and "no registered model 'no-such-model'" in result.output
    assert "pipeline register" in result.output and "Traceback" not in result.output
    result = run_predict("--model", f"runs:/{use_trained_run['run_id']}/pytorch_model", tmp_path / "x.npy")
    assert result.exit_code == 1 and "not an ONNX model" in result.output  # the torch model of the run


@pytest.mark.slow
def test_model_uri_prediction_stays_torch_free(exported_onnx_uri, use_trained_run, test_split, tmp_path):
    """The CLI may import mlflow to resolve a URI; fetching the file must not pull in torch."""
    np.save(tmp_path / "x.npy", test_split.images[:4])
    code = (
        "import sys\nfrom pipeline.cli import cli\n"
        f"cli(['predict', '--model', {exported_onnx_uri!r}, '-o', {str(tmp_path / 'o.csv')!r}, "
        f"{str(tmp_path / 'x.npy')!r}], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # MLFLOW_TRACKING_URI comes from use_trained_run
    assert len(read_table(tmp_path / "o.csv")) == 4


# --------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_real_test_set_matches_torch_evaluation(real_data_dir, real_dnn, tmp_path):
    """A briefly trained DNN (no MLflow, 60 steps) exported and run on the real t10k IDX file."""
    from pipeline.evaluate import compute_logits, images_to_tensor

    model, path = real_dnn["model"], real_dnn["onnx"]
    split = load_split(real_data_dir, "test")
    torch_accuracy = (compute_logits(model, images_to_tensor(split.images)).argmax(1).numpy() == split.labels).mean()

    out = tmp_path / "real.parquet"
    cli_result = run_predict("--model", path, "-o", out, raw_dir(real_data_dir) / TEST_IMAGES)
    assert cli_result.exit_code == 0, cli_result.output
    table = read_table(out)
    assert len(table) == 10_000 and table["error"].isna().all()
    onnx_accuracy = (table["predicted_id"].to_numpy() == split.labels).mean()
    assert torch_accuracy > 0.6
    # float32 kernels differ; at most a couple of near-ties may flip among 10,000 images.
    assert abs(onnx_accuracy - torch_accuracy) <= 2e-4
    assert set(table["predicted_class"]) <= set(real_dnn["class_names"])


def test_predictor_rejects_a_folder_without_one_onnx_file(tmp_path):
    with pytest.raises(PipelineError, match="expected one .onnx file"):
        Predictor(tmp_path)


# --------------------------------------------------------------------------- issue 10's predictor bugs


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_file_name_that_is_not_utf8_is_written_escaped_in_every_format(trained_onnx, test_split, tmp_path, fmt):
    import os

    folder = tmp_path / "w"
    folder.mkdir()
    Image.fromarray(test_split.images[0]).save(folder / "good.png")
    with open(os.path.join(os.fsencode(folder), b"bad\xffname.png"), "wb") as handle:
        Image.fromarray(test_split.images[1]).save(handle, format="PNG")
    out = tmp_path / f"out.{fmt}"
    result = run_predict("--model", str(trained_onnx), "--output", str(out), str(folder))
    assert result.exit_code == 0, result.output
    table = read_table(out, fmt)
    assert sorted(Path(s).name for s in table["source"]) == ["bad\\xffname.png", "good.png"]
    assert table["error"].isna().all()


def test_a_fifo_input_gets_an_error_row_instead_of_blocking(trained_onnx, test_split, tmp_path):
    import os

    Image.fromarray(test_split.images[0]).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "f.png")
    out = tmp_path / "out.csv"
    args = ["--model", str(trained_onnx), "--output", str(out), str(tmp_path / "f.png"), str(tmp_path / "good.png")]
    # A subprocess with a time limit: the bug is a read that never returns.
    code = f"from pipeline.cli import cli; cli({['predict', *args]!r})"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    table = read_table(out)
    fifo = table[table["source"].str.endswith("f.png")]
    assert fifo["error"].str.contains("not a regular file").all() and len(fifo) == 1
    assert table[table["source"].str.endswith("good.png")]["error"].isna().all()


# http(s):// URLs are refused before any store is asked (tests/test_hostile.py).
@pytest.mark.parametrize("uri", ["s3://nobucket/x.onnx", "gs://nobucket/x.onnx"])
def test_model_uris_of_other_stores_are_a_clear_error(tracking_store, tmp_path, uri):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    result = run_predict("--model", uri, str(tmp_path / "x.npy"))
    assert result.exit_code == 1
    assert f"cannot fetch model '{uri}'" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- issue 22: photos in, right answers out


@pytest.mark.slow
@pytest.mark.real_data
def test_photos_need_no_flag_to_be_predicted_as_well_as_the_dataset(real_data_dir, real_dnn, tmp_path):
    """Real test images made into photos (dark on a tinted light background, 8-16x, off-centre on a
    non-square canvas, half JPEG half PNG): with no flag, predict reaches at least 95 % of the model's
    own accuracy on the same images; taken as they are (--preprocess none) it does not come close."""
    split = load_split(real_data_dir, "test")
    images, labels = split.images[:120], split.labels[:120]
    paths = write_photos(images, tmp_path / "photos", seed=1)
    assert {p.suffix for p in paths} == {".jpg", ".png"}
    predictor = Predictor(real_dnn["onnx"])
    own = (predictor.predict_arrays(images).argmax(1) == labels).mean()
    assert own > 0.6  # a model that learned something, so the comparison means something
    accuracy = {}
    for mode in ("auto", "none"):
        out = tmp_path / f"{mode}.csv"
        args = ["-o", out, tmp_path / "photos"] if mode == "auto" else ["--preprocess", mode, "-o", out, tmp_path]
        result = run_predict("--model", real_dnn["onnx"], *args)
        assert result.exit_code == 0, result.output
        table = read_table(out)
        assert len(table) == 120 and table["error"].isna().all()
        accuracy[mode] = (table["predicted_id"].to_numpy() == labels).mean()
        if mode == "auto":
            assert (table["preprocessing"] == "whitened,trimmed,inverted").all(), table["preprocessing"].unique()
    assert accuracy["auto"] >= 0.95 * own, (accuracy, own)
    assert accuracy["none"] < 0.5 * own, (accuracy, own)


def test_dataset_like_inputs_give_exactly_the_logits_they_gave_before(predictor, test_split, tmp_path):
    """28x28 grey images on black (grey or RGB PNGs, GIFs), arrays and IDX files are taken as they are:
    the very same float32 probabilities as the raw arrays through the Predictor, not merely the same classes."""
    images = test_split.images[:30]
    for i, image in enumerate(images):  # grey PNGs, and the same pixels as RGB PNGs and palette GIFs
        grey = Image.fromarray(image)
        (grey if i % 3 == 0 else grey.convert("RGB")).save(tmp_path / f"{i:02d}.{'gif' if i % 3 == 2 else 'png'}")
    np.save(tmp_path / "x.npy", images)
    write_idx(tmp_path / "x.idx", images)
    expected = softmax(predictor.predict_arrays(images))
    for source in (tmp_path, tmp_path / "x.npy", tmp_path / "x.idx"):
        out = tmp_path / "out.parquet"
        for mode in ("auto", "none"):
            assert run_predict("--model", predictor.path, "--preprocess", mode, "-o", out, source).exit_code == 0
            table = read_table(out)
            assert (table["preprocessing"] == "as-is").all(), (source, mode)
            np.testing.assert_array_equal(table["top1_prob"].to_numpy(np.float32), expected.max(1))
            assert table["predicted_id"].tolist() == expected.argmax(1).tolist()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format=fmt, **options)
    return stream.getvalue()


def huge_png_header() -> bytes:
    """A PNG that says it is 20000 x 20000 (over Pillow's pixel limit), with almost no data."""
    import struct
    import zlib

    small = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    small[16:29] = ihdr
    small[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(small)


def test_awkward_images_are_converted_or_refused_in_their_row(predictor, test_split, tmp_path):
    garment = Image.new("L", (220, 180), 255)  # a photo: a dark garment off-centre on white
    garment.paste(Image.fromarray(255 - test_split.images[0]).resize((140, 140), Image.Resampling.BICUBIC), (60, 25))
    alpha_only = np.zeros((100, 80, 4), dtype=np.uint8)  # black everywhere: the garment is only in alpha
    alpha_only[..., 3] = np.asarray(Image.fromarray(test_split.images[0]).resize((80, 100)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    frames = [garment.convert("P"), Image.new("P", garment.size, 0)]
    files = {
        "flat.png": encoded(Image.new("RGB", (300, 200), (210, 190, 160)), "PNG"),
        "one.png": encoded(Image.new("L", (1, 1), 40), "PNG"),
        "thin.png": encoded(Image.new("L", (2, 50), 200), "PNG"),
        "alpha.png": encoded(Image.fromarray(alpha_only, "RGBA"), "PNG"),
        "deep.png": encoded(Image.fromarray(np.asarray(garment).astype(np.uint16) * 257), "PNG"),
        "cmyk.jpg": encoded(garment.convert("CMYK"), "JPEG"),
        "rotated.jpg": encoded(garment.rotate(90, expand=True).convert("RGB"), "JPEG", exif=exif),
        "upright.jpg": encoded(garment.convert("RGB"), "JPEG"),
        "animated.gif": encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "huge.png": huge_png_header(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out.csv"
    result = run_predict("--model", predictor.path, "--top-k", "1", "-o", out, *(tmp_path / n for n in files))
    assert result.exit_code == 0, result.output
    table = read_table(out)
    rows = {
        Path(s).name: (p, e) for s, p, e in zip(table["source"], table["preprocessing"], table["error"], strict=True)
    }
    assert rows["flat.png"][0] == "whitened,nothing to trim (one flat colour),inverted"
    assert "nothing to trim" in rows["one.png"][0] and "nothing to trim" in rows["thin.png"][0]
    assert rows["alpha.png"][0].startswith("transparency on white,") and rows["alpha.png"][0].endswith(",inverted")
    assert rows["deep.png"][0].startswith("16-bit,") and rows["cmyk.jpg"][0].startswith("CMYK,")
    assert rows["rotated.jpg"][0].startswith("rotated (EXIF),") and rows["animated.gif"][0].startswith(
        "first of 2 frames"
    )
    assert "exceeds limit" in rows["huge.png"][1] and pd.isna(rows["huge.png"][0])
    assert all(pd.isna(error) for name, (_, error) in rows.items() if name != "huge.png")
    # The rotation is honoured: the rotated photo converts to what the upright one does.
    upright, rotated = (load(tmp_path / n) for n in ("upright.jpg", "rotated.jpg"))
    assert np.abs(upright.pixels.astype(int) - rotated.pixels.astype(int)).mean() < 4
    sideways = np.rot90(upright.pixels).astype(int)  # what an ignored EXIF tag would have given
    assert np.abs(sideways - rotated.pixels.astype(int)).mean() > 15
    # The garment drawn only in the alpha channel comes out light on black, like a training image.
    alpha = load(tmp_path / "alpha.png").pixels
    edge = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
    assert alpha.max() > 200 and alpha.mean() > 20 and np.median(edge) < 30
    assert "Read 10 images: 9 predicted, 1 failed" in result.output


def test_contact_sheet_shows_the_first_images(predictor, test_split, tmp_path):
    paths = write_photos(test_split.images[:5], tmp_path / "photos")
    sheet = tmp_path / "sheet.png"
    args = ["--contact-sheet", sheet, "--contact-sheet-size", "3", "--top-k", "1", "-o", tmp_path / "o.csv"]
    result = run_predict("--model", predictor.path, *args, *paths)
    assert result.exit_code == 0, result.output
    assert f"Contact sheet in {sheet}" in result.output
    with Image.open(sheet) as drawn:
        assert drawn.format == "PNG" and drawn.width > 800 and drawn.height > 150
    # Only the first 3 were drawn: the same run with 5 gives a taller sheet (two rows of four).
    run_predict("--model", predictor.path, "--contact-sheet", tmp_path / "five.png", "-o", tmp_path / "o.csv", *paths)
    with Image.open(tmp_path / "five.png") as five, Image.open(sheet) as three:
        assert five.height > 1.5 * three.height
    result = run_predict("--model", predictor.path, "--contact-sheet", tmp_path / "sheet.jpg", *paths)
    assert result.exit_code == 1 and "name it .png" in result.output and "Traceback" not in result.output
    np.save(tmp_path / "x.npy", test_split.images[:3])
    result = run_predict("--model", predictor.path, "--contact-sheet", tmp_path / "none.png", tmp_path / "x.npy")
    assert result.exit_code == 0 and "No contact sheet: no image file" in result.output
    assert not (tmp_path / "none.png").exists()
