"""ONNX export: one checked file, the I/O and metadata contract, dynamic batch, atomic writes, int8."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline import export, tracking
from pipeline.config import ONNX_INPUT_NAME, ONNX_METADATA_KEYS, ONNX_OUTPUT_NAME
from pipeline.data import load_split
from pipeline.errors import PipelineError
from pipeline.evaluate import compute_logits
from pipeline.parity import check_quantized


@pytest.fixture(scope="module")
def trained_model(trained_run):
    mlflow.set_tracking_uri(trained_run["store"])
    model, class_names = tracking.load_run_model(trained_run["run_id"])
    return model, class_names, trained_run


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    model, class_names, run = trained_model
    folder = tmp_path_factory.mktemp("export")
    path = export.export_onnx(model, folder / "cnn.onnx", class_names, "cnn", run["run_id"])
    return path, model, class_names, run


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_one_checked_self_contained_file(exported):
    path, model, _, _ = exported
    assert [p.name for p in path.parent.iterdir()] == ["cnn.onnx"]  # no temp file, no external data
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load_model(str(path)).graph
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert [i.name for i in graph.input] == [ONNX_INPUT_NAME]
    assert [o.name for o in graph.output] == [ONNX_OUTPUT_NAME]
    tensor = graph.input[0].type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.FLOAT
    batch, *rest = tensor.shape.dim
    assert batch.dim_param and not batch.dim_value  # symbolic: the batch is dynamic
    assert [d.dim_value for d in rest] == list(model.input_shape)


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_dynamic_batch_sizes_match_torch(exported, batch):
    path, model, _, run = exported
    images = load_split(run["data_dir"], "test").images
    inputs = images[np.arange(batch) % len(images), None].astype(np.float32) / 255  # 256 > the 200 test images
    logits = session(path).run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: inputs})[0]
    expected = compute_logits(model, torch.from_numpy(inputs)).numpy()
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_metadata_round_trip_through_onnx_and_onnxruntime(exported):
    path, _, class_names, run = exported
    from_onnx = {p.key: p.value for p in onnx.load_model(str(path)).metadata_props}
    from_ort = session(path).get_modelmeta().custom_metadata_map
    assert from_onnx == from_ort
    assert set(from_onnx) == set(ONNX_METADATA_KEYS)
    assert json.loads(from_onnx["class_names"]) == list(class_names)
    assert from_onnx["input_layout"] == "NCHW float32 N x 1 x 28 x 28"
    assert from_onnx["input_scaling"] == "[0, 1] (uint8 pixel / 255)"
    assert from_onnx["model_name"] == "cnn"
    assert from_onnx["source_run_id"] == run["run_id"]
    exported_at = datetime.fromisoformat(from_onnx["exported_at"])
    assert exported_at.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - exported_at).total_seconds()) < 3600
    assert from_onnx["torch_version"] == torch.__version__
    assert from_onnx["onnx_version"] == onnx.__version__
    assert export.read_metadata(path) == from_onnx


def test_export_is_in_eval_mode_and_restores_the_mode(trained_model, tmp_path):
    model, class_names, run = trained_model
    model.train()
    try:
        path = export.export_onnx(model, tmp_path / "m.onnx", class_names, "cnn", run["run_id"])
        assert model.training
    finally:
        model.eval()
    ops = {node.op_type for node in onnx.load_model(str(path)).graph.node}
    assert not ops & {"Dropout", "RandomUniformLike", "RandomUniform"}, ops  # train-mode dropout would be there


def test_unwritable_output_is_a_clear_error_and_leaves_nothing(trained_model, tmp_path):
    model, class_names, run = trained_model
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(PipelineError, match="not an existing directory"):
        export.export_onnx(model, blocker / "m.onnx", class_names, "cnn", run["run_id"])
    with pytest.raises(PipelineError, match="not an existing directory"):
        export.resolve_output(tmp_path / "missing" / "m.onnx", "cnn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


def test_failed_check_leaves_no_half_written_file(trained_model, tmp_path, monkeypatch):
    model, class_names, run = trained_model

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("rejected by the test")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(onnx.checker.ValidationError):
        export.export_onnx(model, tmp_path / "m.onnx", class_names, "cnn", run["run_id"])
    assert list(tmp_path.iterdir()) == []


def test_resolve_output_puts_a_model_file_in_a_directory(tmp_path):
    assert export.resolve_output(tmp_path, "dnn") == tmp_path / "dnn.onnx"
    assert export.resolve_output(tmp_path / "x.onnx", "dnn") == tmp_path / "x.onnx"
    assert export.int8_path_for(tmp_path / "x.onnx") == tmp_path / "x.int8.onnx"


def test_int8_model_runs_keeps_metadata_and_its_accuracy_check_is_reported(exported):
    path, model, class_names, run = exported
    train, test = load_split(run["data_dir"], "train"), load_split(run["data_dir"], "test")
    config = export.QuantizeConfig(calibration_images=200)
    calibration = export.calibration_sample(train.images, config)
    assert calibration.shape == (200, 1, 28, 28) and calibration.dtype == np.float32 and calibration.max() <= 1
    np.testing.assert_array_equal(calibration, export.calibration_sample(train.images, config))  # seeded

    int8_path = export.quantize_int8(path, export.int8_path_for(path), calibration, config)
    assert int8_path.name == "cnn.int8.onnx" and int8_path.parent == path.parent
    proto = onnx.load_model(str(int8_path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in proto.graph.node}
    metadata = export.read_metadata(int8_path)
    assert {k: metadata[k] for k in ONNX_METADATA_KEYS} == export.read_metadata(path)
    assert "int8" in metadata[export.QUANTIZATION_KEY]
    assert int8_path.stat().st_size < path.stat().st_size / 2
    logits = session(int8_path).run(None, {ONNX_INPUT_NAME: calibration[:3]})[0]
    assert logits.shape == (3, 10)

    check = check_quantized(model, int8_path, test.images, test.labels, class_names)
    assert [c.class_name for c in check.per_class] == list(class_names)
    assert sum(c.images for c in check.per_class) == len(test.labels)
    assert check.accuracy_drop_points == pytest.approx(100 * (check.torch_test_accuracy - check.int8_test_accuracy))
    assert check.passed == (check.accuracy_drop_points <= 0.5)
    assert check.passed, check.summary_lines()  # the synthetic classes are easy: int8 must keep them
    assert "per-class drop" in "\n".join(check.summary_lines())
    assert set(check.metrics()) == {"int8_test_accuracy", "int8_accuracy_drop_points", "int8_argmax_agreement"}
