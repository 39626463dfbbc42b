"""ONNX export: one checked file, the I/O and metadata contract, dynamic batch, atomic writes, int8,
and folding (conv+BN, Linear chains) into an equivalent, smaller inference graph."""

from __future__ import annotations

import copy
import json
from collections import Counter
from datetime import UTC, datetime

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pipeline import export, tracking
from pipeline.config import CLASS_NAMES
from pipeline.data import load_split
from pipeline.errors import PipelineError
from pipeline.evaluate import compute_logits
from pipeline.models import build_model
from pipeline.onnx_contract import ONNX_INPUT_NAME, ONNX_METADATA_KEYS, ONNX_OUTPUT_NAME
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
    assert set(from_onnx) == {*ONNX_METADATA_KEYS, export.FOLDED_KEY, export.FOLDED_LAYERS_KEY}
    assert from_onnx[export.FOLDED_KEY] == "true"  # the default export is folded
    assert "fc1+fc2+fc3 (linear)" in from_onnx[export.FOLDED_LAYERS_KEY]
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


def test_torchlib_is_listed_once_and_the_graph_is_the_one_listed_afresh_gives(tmp_path, monkeypatch):
    import importlib

    from torch.onnx._internal._lazy_import import onnxscript_apis

    model = build_model("dnn").eval()
    assert export.list_torchlib_once()  # this torch's names: the memo is in place
    apis = importlib.import_module(onnxscript_apis._name)
    listed = apis.get_torchlib_ops
    remembered = export.export_onnx(model, tmp_path / "remembered.onnx", CLASS_NAMES, "dnn", "r")
    calls = listed.cache_info()
    assert calls.hits + calls.misses >= 1 and calls.currsize == 1  # the export went through the memo
    assert apis.get_torchlib_ops() is apis.get_torchlib_ops()
    monkeypatch.setattr(apis, "get_torchlib_ops", listed.__wrapped__)  # every export lists afresh, as before
    afresh = export.export_onnx(model, tmp_path / "afresh.onnx", CLASS_NAMES, "dnn", "r")
    assert onnx.load(afresh).graph.SerializeToString() == onnx.load(remembered).graph.SerializeToString()


def test_resolve_output_puts_a_model_file_in_a_directory(tmp_path):
    assert export.resolve_output(tmp_path, "dnn") == tmp_path / "dnn.onnx"
    assert export.resolve_output(tmp_path / "x.onnx", "dnn") == tmp_path / "x.onnx"
    # A trailing slash asks for a directory, created on the spot.
    assert export.resolve_output(f"{tmp_path}/new/", "cnn") == tmp_path / "new" / "cnn.onnx"
    assert (tmp_path / "new").is_dir()
    with pytest.raises(PipelineError, match="give a .onnx file name"):
        export.resolve_output(tmp_path / "exports", "cnn")  # neither a directory nor a .onnx name
    assert export.int8_path_for(tmp_path / "x.onnx") == tmp_path / "x.int8.onnx"


@pytest.mark.parametrize("quant_format", ["qdq", "qoperator"])
def test_int8_model_runs_keeps_metadata_and_its_accuracy_check_is_reported(exported, quant_format):
    path, model, class_names, run = exported
    train, test = load_split(run["data_dir"], "train"), load_split(run["data_dir"], "test")
    config = export.QuantizeConfig(calibration_images=200, format=quant_format)
    calibration = export.calibration_sample(train.images, config)
    assert calibration.shape == (200, 1, 28, 28) and calibration.dtype == np.float32 and calibration.max() <= 1
    np.testing.assert_array_equal(calibration, export.calibration_sample(train.images, config))  # seeded

    int8_path = export.quantize_int8(path, export.int8_path_for(path), calibration, config)
    assert int8_path.name == "cnn.int8.onnx" and int8_path.parent == path.parent
    proto = onnx.load_model(str(int8_path))
    ops = Counter(node.op_type for node in proto.graph.node)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops)
    # QOperator: the convolutions are int8 operators themselves; QDQ: float ones between Q/DQ pairs.
    assert ("QLinearConv" in ops) == (quant_format == "qoperator") and ("Conv" in ops) == (quant_format == "qdq")
    metadata = export.read_metadata(int8_path)
    assert {k: v for k, v in metadata.items() if k != export.QUANTIZATION_KEY} == export.read_metadata(path)
    assert f"int8 static {'QOperator' if quant_format == 'qoperator' else 'QDQ'}" in metadata[export.QUANTIZATION_KEY]
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


def test_int8_format_follows_the_cpu(monkeypatch):
    from pipeline import hardware

    monkeypatch.setattr(hardware, "cpu_features", lambda: hardware.CpuFeatures(avx2=True))
    assert export.QuantizeConfig().resolved_format() == "qdq"  # no VNNI: nothing for fused int8 kernels to win
    monkeypatch.setattr(hardware, "cpu_features", lambda: hardware.CpuFeatures(avx2=True, avx_vnni=True))
    assert export.QuantizeConfig().resolved_format() == "qoperator"
    monkeypatch.setattr(hardware, "cpu_features", lambda: hardware.CpuFeatures(amx_int8=True))
    assert export.QuantizeConfig().resolved_format() == "qoperator"
    assert export.QuantizeConfig(format="qdq").resolved_format() == "qdq"  # asked for: kept
    with pytest.raises(ValueError, match="format must be one of"):
        export.QuantizeConfig(format="int4").resolved_format()


# ----------------------------------------------------------------- folding


def op_counts(path) -> Counter:
    return Counter(node.op_type for node in onnx.load_model(str(path)).graph.node)


def test_fold_merges_the_cnn_and_leaves_the_original_untouched(trained_model):
    model, _, _ = trained_model
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.train()
    try:
        folded, report = export.fold_for_inference(model)
        assert model.training and isinstance(model.fc2, nn.Linear) and isinstance(model.layer1[1], nn.BatchNorm2d)
    finally:
        model.eval()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())

    assert report.conv_bn == [("layer1.0", "layer1.1"), ("layer2.0", "layer2.1")]
    assert report.linear_chains == [("fc1", "fc2", "fc3")]
    assert not folded.training
    assert (folded.fc1.in_features, folded.fc1.out_features) == (model.fc1.in_features, 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.Linear) for m in folded.modules()) == 1
    # BatchNorm with non-trivial statistics, so folding it is really exercised.
    assert not torch.allclose(model.layer1[1].running_mean, torch.zeros(32))

    inputs = torch.rand(64, *model.input_shape, generator=torch.Generator().manual_seed(0))
    expected, actual = compute_logits(model, inputs), compute_logits(folded, inputs)
    assert (expected - actual).abs().max() < 1e-4  # float64 folding: float32 rounding apart
    assert torch.equal(expected.argmax(1), actual.argmax(1))


@pytest.mark.slow
def test_folded_graph_has_one_gemm_where_the_plain_one_has_three(trained_model, tmp_path):
    model, class_names, run = trained_model
    plain = export.export_onnx(model, tmp_path / "plain.onnx", class_names, "cnn", run["run_id"], fold=False)
    folded = export.export_onnx(model, tmp_path / "folded.onnx", class_names, "cnn", run["run_id"], fold=True)
    plain_ops, folded_ops = op_counts(plain), op_counts(folded)
    assert plain_ops["Gemm"] + plain_ops["MatMul"] == 3
    assert folded_ops["Gemm"] + folded_ops["MatMul"] == 1
    # torch's exporter already folds eval-mode BN into the conv, so neither file has one.
    assert folded_ops["BatchNormalization"] == plain_ops["BatchNormalization"] == 0
    assert folded_ops["Conv"] == plain_ops["Conv"] == 2
    assert export.read_metadata(plain)[export.FOLDED_KEY] == "false"
    assert export.FOLDED_LAYERS_KEY not in export.read_metadata(plain)
    assert export.read_metadata(folded)[export.FOLDED_KEY] == "true"
    assert folded.stat().st_size < plain.stat().st_size / 10  # 2304x10 weights instead of 2304x600 + ...

    inputs = load_split(run["data_dir"], "test").images[:50, None].astype(np.float32) / 255
    np.testing.assert_allclose(
        export.onnx_logits(folded, inputs), compute_logits(model, torch.from_numpy(inputs)).numpy(), atol=1e-4, rtol=0
    )


def test_dnn_keeps_its_three_linears_because_relus_sit_between_them(tmp_path):
    model = build_model("dnn").eval()
    folded, report = export.fold_for_inference(model)
    assert report.conv_bn == [] and report.linear_chains == []
    assert report.describe() == "nothing foldable"
    for name in ("fc1", "fc2", "fc3"):
        assert isinstance(getattr(folded, name), nn.Linear)
        assert torch.equal(getattr(folded, name).weight, getattr(model, name).weight)
    path = export.export_onnx(model, tmp_path / "dnn.onnx", CLASS_NAMES, "dnn", "test", fold=True)
    assert op_counts(path)["Gemm"] + op_counts(path)["MatMul"] == 3


class Bottleneck(nn.Module):
    """Linear -> Linear through a narrow middle: merging would make a bigger, slower matrix."""

    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Linear(64, 4), nn.Linear(4, 64)

    def forward(self, x):
        return self.up(self.down(x))


class SharedOutput(nn.Module):
    """fc1's output feeds fc2 and is also returned: fc1 must keep computing it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 3)

    def forward(self, x):
        hidden = self.fc1(x)
        return self.fc2(self.drop(hidden)), hidden


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc2(self.fc1(x))


@pytest.mark.parametrize("model_class", [Bottleneck, SharedOutput, Untraceable])
def test_chains_that_must_not_merge_are_left_alone(model_class):
    model = model_class().eval()
    folded, report = export.fold_for_inference(model)
    assert report.linear_chains == []
    assert [type(m) for m in folded.modules()] == [type(m) for m in model.modules()]
    inputs = torch.randn(5, 64 if model_class is Bottleneck else 8)
    with torch.no_grad():
        expected, actual = model(inputs), folded(inputs)
    if model_class is SharedOutput:
        assert all(torch.equal(e, a) for e, a in zip(expected, actual, strict=True))
    else:
        assert torch.equal(expected, actual)


def test_a_linear_chain_through_dropout_in_a_sequential_merges_exactly():
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.3), nn.Linear(32, 32), nn.Identity(), nn.Linear(32, 4))
    model.eval()
    folded, report = export.fold_for_inference(model)
    assert report.linear_chains == [("0", "2", "4")]
    assert [type(m).__name__ for m in folded] == ["Linear", "Identity", "Identity", "Identity", "Identity"]
    inputs = torch.randn(10, 16)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(inputs.double())  # the unfolded chain in float64
        assert (folded(inputs).double() - exact).abs().max() < 1e-5


@pytest.mark.parametrize("command", ["export-onnx", "evaluate", "check-parity"])
def test_other_test_data_is_refused_before_anything_is_logged(use_trained_run, tmp_path, command):
    """Figures of other data would be logged into the run as its own (an export once left 2 % there)."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from tests.helpers import write_synthetic_dataset

    other = write_synthetic_dataset(tmp_path / "other", seed=7)
    before = mlflow.get_run(use_trained_run["run_id"]).data
    result = CliRunner().invoke(cli, [command, "--run-id", use_trained_run["run_id"], "--data-dir", str(other)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "is not what run" in result.output and "t10k-" in result.output
    after = mlflow.get_run(use_trained_run["run_id"]).data
    assert after.metrics == before.metrics and after.tags == before.tags
