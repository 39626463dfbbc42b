"""Parity: a faithful export (folded or not) passes against the original model; an altered,
wrongly folded or train-mode export fails and names the inputs; the CLI logs everything to
the run and exits non-zero on a mismatch."""

from __future__ import annotations

import copy
import json

import mlflow
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from pipeline import export, tracking
from pipeline.cli import cli
from pipeline.data import load_split
from pipeline.errors import PipelineError
from pipeline.models import build_model
from pipeline.onnx_contract import ONNX_INPUT_NAME, ONNX_OUTPUT_NAME
from pipeline.parity import check_parity

EDGE_INPUTS = {"batch_of_1", "batch_of_1000", "all_zeros", "all_ones", "random_noise"}


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    mlflow.set_tracking_uri(trained_run["store"])
    model, class_names = tracking.load_run_model(trained_run["run_id"])
    path = export.export_onnx(
        model, tmp_path_factory.mktemp("parity") / "cnn.onnx", class_names, "cnn", trained_run["run_id"], fold=True
    )
    test = load_split(trained_run["data_dir"], "test")
    return {"path": path, "model": model, "class_names": class_names, "test": test, **trained_run}


def altered_copy(src, dst, change):
    """A copy of an .onnx file with `change(weights)` applied to the last Gemm's weight matrix."""
    proto = onnx.load_model(str(src))
    last_gemm = [node for node in proto.graph.node if node.op_type == "Gemm"][-1]
    tensor = next(t for t in proto.graph.initializer if t.name == last_gemm.input[1])
    weights = numpy_helper.to_array(tensor).copy()
    change(weights)
    tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
    onnx.save_model(proto, str(dst))
    return dst


def parity(exported, path):
    test = exported["test"]
    return check_parity(exported["model"], path, test.images, test.labels, exported["class_names"])


def test_faithful_export_passes_on_test_and_edge_inputs(exported):
    result = parity(exported, exported["path"])
    assert result.passed, result.failures
    assert result.max_abs_diff <= 1e-4 and result.mean_abs_diff <= result.max_abs_diff
    assert result.argmax_agreement == 1.0 and result.argmax_disagreements == 0
    assert result.torch_test_accuracy == result.onnx_test_accuracy > 0.5
    assert set(result.input_sets) == {"test"} | EDGE_INPUTS
    assert result.input_sets["test"].images == len(exported["test"].labels)
    assert result.input_sets["batch_of_1"].images == 1 and result.input_sets["batch_of_1000"].images == 1000
    assert result.compared_inputs == sum(s.images for s in result.input_sets.values())
    assert result.onnx_metadata["source_run_id"] == exported["run_id"]
    assert result.onnx_metadata[export.FOLDED_KEY] == "true"  # folded, and checked against the unfolded model
    assert set(result.metrics()) >= {"parity_max_abs_diff", "parity_argmax_agreement", "onnx_test_accuracy"}
    json.dumps(result.to_dict())  # parity.json must serialise


def test_one_slightly_altered_weight_fails_on_the_logit_tolerance(exported, tmp_path):
    def nudge(weights):
        weights[0, int(np.abs(weights[0]).argmax())] *= 1.01  # 1 % on one weight of one class

    path = altered_copy(exported["path"], tmp_path / "nudged.onnx", nudge)
    result = parity(exported, path)
    assert not result.passed
    assert result.max_abs_diff > 1e-4
    assert any("max abs logit diff" in failure for failure in result.failures)
    message = result.failure_message()
    assert "parity FAILED" in message and str(path) in message
    assert result.worst and all(o.input.split("[")[0] in {"test"} | EDGE_INPUTS for o in result.worst)
    assert result.worst[0].input in message
    assert result.worst[0].max_abs_diff == pytest.approx(result.max_abs_diff)


def test_swapped_class_weights_fail_and_name_the_disagreeing_inputs(exported, tmp_path):
    def swap(weights):
        weights[[0, 1]] = weights[[1, 0]]

    path = altered_copy(exported["path"], tmp_path / "swapped.onnx", swap)
    result = parity(exported, path)
    assert not result.passed
    assert result.argmax_disagreements > 0 and result.argmax_agreement < 1
    assert result.torch_test_accuracy != result.onnx_test_accuracy
    assert len(result.failures) == 3
    # Inputs whose predicted class changed come first, each with both predictions.
    names = exported["class_names"]
    for offender in result.worst:
        assert offender.torch_class != offender.onnx_class
        assert {offender.torch_class, offender.onnx_class} & {names[0], names[1]}
    assert f"onnx says {result.worst[0].onnx_class!r}" in result.failure_message()


@pytest.mark.slow
def test_unfolded_export_passes_too_and_agrees_with_the_folded_one(exported, tmp_path):
    model, run_id = exported["model"], exported["run_id"]
    plain = export.export_onnx(model, tmp_path / "plain.onnx", exported["class_names"], "cnn", run_id, fold=False)
    result = parity(exported, plain)
    assert result.passed, result.failures
    folded = parity(exported, exported["path"])
    assert folded.torch_test_accuracy == result.onnx_test_accuracy == folded.onnx_test_accuracy


@pytest.mark.slow
def test_a_wrong_fold_of_the_cnn_fails(exported, tmp_path):
    """A plausible folding bug: merging fc1..fc3 but forgetting fc1's bias as it passes through fc2, fc3."""
    model = exported["model"]
    wrong, _ = export.fold_for_inference(model)
    with torch.no_grad():
        wrong.fc1.bias -= model.fc3.weight @ model.fc2.weight @ model.fc1.bias
    path = export.export_onnx(wrong, tmp_path / "wrong.onnx", exported["class_names"], "cnn", "x", fold=False)
    result = parity(exported, path)
    assert not result.passed
    assert result.max_abs_diff > 1e-4


@pytest.mark.slow
def test_merging_linears_across_a_relu_is_caught(exported, tmp_path):
    """FashionDNN has ReLUs between its linears: merging them anyway changes what it computes."""
    torch.manual_seed(0)
    dnn = build_model("dnn").eval()
    wrong = copy.deepcopy(dnn)
    wrong.fc1 = export._merged_linear([dnn.fc1, dnn.fc2, dnn.fc3])  # the merge fold_for_inference refuses
    wrong.fc2 = wrong.fc3 = nn.Identity()
    path = export.export_onnx(wrong, tmp_path / "wrong.onnx", exported["class_names"], "dnn", "x", fold=False)
    test = exported["test"]
    result = check_parity(dnn, path, test.images, test.labels, exported["class_names"])
    assert not result.passed
    assert result.max_abs_diff > 1e-4 and result.argmax_disagreements > 0
    # The honest fold of the same model passes: it merged nothing.
    honest = export.export_onnx(dnn, tmp_path / "honest.onnx", exported["class_names"], "dnn", "x", fold=True)
    assert check_parity(dnn, honest, test.images, test.labels, exported["class_names"]).passed


@pytest.mark.slow
def test_a_model_exported_in_train_mode_fails(exported, tmp_path):
    model = exported["model"]
    model.train()  # dropout live in the graph: the export no longer computes the eval model
    try:
        with pytest.warns(UserWarning, match="training mode"):
            torch.onnx.export(
                model,
                (torch.zeros(2, *model.input_shape),),
                str(tmp_path / "train_mode.onnx"),
                input_names=[ONNX_INPUT_NAME],
                output_names=[ONNX_OUTPUT_NAME],
                dynamic_shapes=({0: "batch"},),
                external_data=False,
            )
    finally:
        model.eval()
    result = parity(exported, tmp_path / "train_mode.onnx")
    assert not result.passed
    assert result.max_abs_diff > 1e-4
    assert result.worst[0].input in result.failure_message()


def test_a_file_that_is_not_onnx_is_a_clear_error(exported, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(PipelineError, match="not a readable ONNX model"):
        parity(exported, junk)


def test_a_model_with_other_names_is_not_what_export_wrote(exported, tmp_path):
    """The predictor accepts any single image input; parity judges export's own files: the contract's names."""
    model = exported["model"]
    path = tmp_path / "renamed.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(2, *model.input_shape),),
        str(path),
        input_names=["pixels"],
        output_names=[ONNX_OUTPUT_NAME],
        dynamic_shapes=({0: "batch"},),
        external_data=False,
    )
    with pytest.raises(PipelineError, match="don't follow the export contract"):
        parity(exported, path)


# ----------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_export_logs_models_parity_and_int8_to_the_run(use_trained_run, tmp_path):
    run_id, data_dir = use_trained_run["run_id"], str(use_trained_run["data_dir"])
    args = ["export-onnx", "--run-id", run_id, "--output", str(tmp_path), "--quantize", "int8", "--data-dir", data_dir]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.int8.onnx", "cnn.onnx"]
    assert f"Written to: {tmp_path / 'cnn.onnx'}" in result.output
    assert "models:/" in result.output and "PASSED" in result.output and "per-class drop" in result.output
    assert (
        "Folded for inference: layer1.0+layer1.1 (conv+bn), layer2.0+layer2.1 (conv+bn), fc1+fc2+fc3" in result.output
    )
    assert export.read_metadata(tmp_path / "cnn.onnx")[export.FOLDED_KEY] == "true"  # folding is the default

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["parity"] == "passed" and run.data.tags["int8_check"] == "passed"
    assert run.data.metrics["parity_max_abs_diff"] <= 1e-4
    assert run.data.metrics["parity_argmax_agreement"] == 1.0
    assert run.data.metrics["onnx_test_accuracy"] > 0.5
    assert run.data.metrics["int8_accuracy_drop_points"] <= 0.5
    report = json.loads((tracking.download_artifact(run_id, "parity.json", tmp_path / "dl")).read_text())
    assert report["passed"] and set(report["input_sets"]) == {"test"} | EDGE_INPUTS

    for variant in ("fp32", "int8"):
        model_uri = run.data.tags[tracking.ONNX_URI_TAGS[variant]]
        assert model_uri in result.output
        info = mlflow.models.get_model_info(model_uri)
        assert info.run_id == run_id
        assert info.flavors["onnx"]["providers"] == ["CPUExecutionProvider"]
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 28, 28]
        assert info.saved_input_example_info is not None
        logged = tracking.download_onnx_model(model_uri, tmp_path / variant)
        assert not list(logged.parent.glob("*.data"))  # one self-contained file
        assert export.read_metadata(logged)["source_run_id"] == run_id

    # check-parity alone, on the model export-onnx logged, with the run id from MLFLOW_RUN_ID.
    again = CliRunner().invoke(cli, ["check-parity", "--data-dir", data_dir], env={"MLFLOW_RUN_ID": run_id})
    assert again.exit_code == 0, again.output
    assert "PASSED" in again.output


@pytest.mark.slow
def test_cli_no_fold_exports_the_plain_graph(use_trained_run, tmp_path):
    args = ["export-onnx", "--run-id", use_trained_run["run_id"], "--output", str(tmp_path), "--no-fold"]
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(use_trained_run["data_dir"])])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "Folded" not in result.output
    assert export.read_metadata(tmp_path / "cnn.onnx")[export.FOLDED_KEY] == "false"
    gemms = [n for n in onnx.load_model(str(tmp_path / "cnn.onnx")).graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3


def test_cli_check_parity_fails_names_inputs_and_tags_the_run(use_trained_run, exported, tmp_path):
    run_id = use_trained_run["run_id"]
    path = altered_copy(exported["path"], tmp_path / "swapped.onnx", lambda w: w.__setitem__([0, 1], w[[1, 0]]))
    args = ["check-parity", "--run-id", run_id, "--onnx", str(path), "--data-dir", str(use_trained_run["data_dir"])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert "FAILED" in result.output and "Worst-offending inputs: test[" in result.output
    run = mlflow.get_run(run_id)
    assert run.data.tags["parity"] == "failed"
    assert run.data.metrics["parity_argmax_agreement"] < 1
    assert run.info.status == "FINISHED"  # a failed check is recorded, the training run stays intact


def test_cli_bad_run_ids_are_clear_errors(tracking_store, synthetic_data_dir, tmp_path):
    data_dir = str(synthetic_data_dir)
    unknown = CliRunner().invoke(cli, ["export-onnx", "--run-id", "0" * 32, "--data-dir", data_dir])
    assert unknown.exit_code == 1 and "no run '00000000000000000000000000000000'" in unknown.output
    assert "Traceback" not in unknown.output

    mlflow.set_experiment("tests")
    with mlflow.start_run() as empty:
        pass
    out = tmp_path / "out"
    out.mkdir()
    args = ["export-onnx", "--run-id", empty.info.run_id, "--output", str(out), "--data-dir", data_dir]
    no_model = CliRunner().invoke(cli, args)
    assert no_model.exit_code == 1 and "has no artifact" in no_model.output
    assert list(out.iterdir()) == []
    no_onnx = CliRunner().invoke(cli, ["check-parity", "--run-id", empty.info.run_id, "--data-dir", data_dir])
    assert no_onnx.exit_code == 1 and "Error:" in no_onnx.output


def test_cli_unwritable_output_is_a_clear_error_and_leaves_nothing(use_trained_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    args = ["export-onnx", "--run-id", use_trained_run["run_id"], "--output", str(blocker / "m.onnx")]
    result = CliRunner().invoke(cli, [*args, "--data-dir", str(use_trained_run["data_dir"])])
    assert result.exit_code == 1
    assert "cannot write" in result.output and "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
