"""The Model Registry: register, promote (both ways), the refusals, and predict by alias.

Most runs here are small fakes of what `export-onnx` leaves behind (a real logged ONNX
model, its tag, a parity tag, a test accuracy), so promote's decisions can be steered
with exact accuracies in a second or two; the predict test uses the real trained run.
"""

from __future__ import annotations

import io
import math

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from pipeline import tracking
from pipeline.cli import cli
from pipeline.compare import binomial_margin
from pipeline.data import load_split
from pipeline.predict import Predictor
from pipeline.promotion import Score, decide
from pipeline.tracking import registry


def identity_onnx(path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 28, 28])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 1, 28, 28])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "identity", [x], [y])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def exported_run(tmp_path, accuracy: float, parity: str | None = "passed", model: str = "cnn") -> str:
    """A run as `export-onnx` leaves it (minus the training): an ONNX model, its tag, parity, test accuracy."""
    path = identity_onnx(tmp_path / f"m{accuracy}.onnx")
    example = np.zeros((1, 1, 28, 28), dtype=np.float32)
    with tracking.run(run_name=f"fake-{accuracy}") as active:
        tracking.log_params({"model": model, "test_size": 10_000})
        tracking.log_metrics({"test_accuracy": accuracy, "steps": 10}, step=10)
        tracking.log_onnx_model(path, "fp32", example, example, step=11)
        if parity:
            mlflow.set_tag("parity", parity)
        if parity == "failed":
            tracking.log_metrics({"parity_max_abs_diff": 0.5, "parity_argmax_agreement": 0.9}, step=11)
    return active.run_id


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def champion_version(name: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


# --------------------------------------------------------------------------- the decision, plain numbers


def test_promote_decision_needs_more_than_the_noise_margin():
    champion = Score("1", 0.900, 10_000)
    margin = binomial_margin(0.900, 10_000, 0.905, 10_000)
    within = decide(Score("2", 0.905, 10_000), champion)
    assert not within.promote and within.margin == pytest.approx(margin)
    assert within.message.startswith("Kept champion v1") and f"±{100 * margin:.2f} pp" in within.message
    assert "+0.50 pp" in within.message and "--force" in within.message

    clear = decide(Score("2", 0.930, 10_000), champion)
    assert clear.promote and clear.delta == pytest.approx(0.03) and clear.message.startswith("Promoted: ")

    worse = decide(Score("2", 0.850, 10_000), champion, force=True)
    assert worse.promote and "--force" in worse.message and "-5.00 pp" in worse.message

    assert decide(Score("1", 0.9, 10_000), None).promote  # no champion yet
    assert not decide(Score("1", 0.9, 10_000), champion).promote  # it already is the champion
    unknown = decide(Score("2", 0.99, 0), champion)  # no test-set size: no margin, no promotion
    assert not unknown.promote and math.isnan(unknown.margin) and "unknown" in unknown.message


# --------------------------------------------------------------------------- through MLflow


def test_register_and_promote_both_ways(tracking_store, tmp_path):
    client = mlflow.MlflowClient()
    first = exported_run(tmp_path, 0.900)
    result = invoke("register", "--run-id", first)
    assert result.exit_code == 0, result.output
    assert "Registered as fashion-cnn v1 (alias candidate)" in result.output  # fashion-<model> by default

    version = client.get_model_version("fashion-cnn", "1")
    assert version.run_id == first and version.source == tracking.run_model_uri(first, tracking.ONNX_URI_TAGS["fp32"])
    assert version.tags == {
        "test_accuracy": "0.900000",
        "test_images": "10000",
        "parity": "passed",
        "source_run": first,
        "model": "cnn",
        "format": "onnx",
    }
    assert (
        "test accuracy 90.00% on 10,000 test images" in version.description and "parity passed" in version.description
    )
    assert "champion" in client.get_registered_model("fashion-cnn").description
    assert str(client.get_model_version_by_alias("fashion-cnn", "candidate").version) == "1"
    run_tags = mlflow.get_run(first).data.tags
    assert run_tags[tracking.REGISTERED_TAG] == "fashion-cnn v1" and run_tags["stages"].endswith("register")

    again = invoke("register", "--run-id", first)
    assert again.exit_code == 0 and "Already registered as fashion-cnn v1" in again.output
    assert len(client.search_model_versions("name = 'fashion-cnn'")) == 1

    result = invoke("promote", "--name", "fashion-cnn")
    assert result.exit_code == 0 and "No champion yet: v1" in result.output
    assert champion_version("fashion-cnn") == "1"

    # Half a point better on 10,000 images is within the noise margin: the champion stays.
    assert invoke("register", "--run-id", exported_run(tmp_path, 0.905)).exit_code == 0
    result = invoke("promote", "--name", "fashion-cnn")
    assert result.exit_code == 0, result.output
    assert "Kept champion v1: candidate v2 90.50% vs champion v1 90.00%: +0.50 pp, noise margin ±0.82 pp" in (
        result.output
    )
    assert champion_version("fashion-cnn") == "1"
    forced = invoke("promote", "--name", "fashion-cnn", "--force")
    assert forced.exit_code == 0 and "Promoted by --force" in forced.output
    assert champion_version("fashion-cnn") == "2"

    # Four and a half points better is well beyond it: promoted.
    assert invoke("register", "--run-id", exported_run(tmp_path, 0.950)).exit_code == 0
    result = invoke("promote", "--name", "fashion-cnn")
    assert result.exit_code == 0 and "Promoted: candidate v3 95.00% vs champion v2 90.50%: +4.50 pp" in result.output
    assert "models:/fashion-cnn@champion = fashion-cnn v3" in result.output
    assert champion_version("fashion-cnn") == "3"

    # An explicit version is a rollback: no questions asked.
    result = invoke("promote", "--name", "fashion-cnn", "--version", "1")
    assert result.exit_code == 0 and "the champion was v3" in result.output
    assert champion_version("fashion-cnn") == "1"
    assert "Already the champion: v1" in invoke("promote", "--name", "fashion-cnn", "--version", "1").output


def test_register_refuses_a_run_whose_parity_failed(tracking_store, tmp_path):
    failed = exported_run(tmp_path, 0.9, parity="failed")
    result = invoke("register", "--run-id", failed)
    assert result.exit_code == 1
    assert "its ONNX parity check failed (max |logit diff| 0.5, argmax agreement 90.00%)" in result.output
    assert f"pipeline export-onnx --run-id {failed}" in result.output
    assert mlflow.MlflowClient().search_registered_models() == []  # nothing was registered

    unchecked = exported_run(tmp_path, 0.9, parity=None)
    result = invoke("register", "--run-id", unchecked)
    assert result.exit_code == 1 and f"pipeline check-parity --run-id {unchecked}" in result.output


def test_bad_input_is_one_line_naming_what_is_missing(tracking_store, tmp_path):
    tracking.configure()
    with tracking.run(run_name="trained, not exported") as bare:
        pass
    good = exported_run(tmp_path, 0.9, model="dnn")
    assert invoke("register", "--run-id", good).exit_code == 0  # fashion-dnn v1, a candidate, no champion

    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 28, 28), dtype=np.uint8))
    cases = [
        (("register", "--run-id", "deadbeef"), "no run 'deadbeef'"),
        (
            ("register", "--run-id", bare.run_id),
            f"export it first: `pipeline export-onnx --run-id {bare.run_id}`",
        ),
        (("promote", "--name", "nope"), "no registered model 'nope'"),
        (("promote", "--name", "fashion-dnn", "--version", "7"), "has no version 7; its versions: 1"),
        (
            ("predict", "--model", "models:/fashion-dnn@champion", str(x)),
            "has no alias 'champion'; promote a version first: `pipeline promote --name fashion-dnn`",
        ),
        (("predict", "--model", "models:/fashion-dnn/4", str(x)), "has no version 4"),
    ]
    for args, needle in cases:
        result = invoke(*args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], (args, result.output)
    assert "pipeline register --run-id RUN_ID --name nope" in invoke("promote", "--name", "nope").output


def test_predict_follows_the_champion_and_the_twins_follow_too(champion_uri, use_trained_run, trained_onnx, tmp_path):
    images = load_split(use_trained_run["data_dir"], "test").images[:16]
    np.save(tmp_path / "x.npy", images)
    result = CliRunner().invoke(cli, ["predict", "--model", champion_uri, str(tmp_path / "x.npy")])
    assert result.exit_code == 0, result.output
    expected = Predictor(trained_onnx).predict_arrays(images).argmax(1).tolist()
    assert pd.read_csv(io.StringIO(result.stdout))["predicted_id"].tolist() == expected

    client = mlflow.MlflowClient()
    run_id = use_trained_run["run_id"]
    twin = client.get_model_version_by_alias("tests-cnn" + registry.PYTORCH_SUFFIX, "champion")
    assert twin.run_id == run_id and twin.tags["format"] == "pytorch"
    assert twin.source == tracking.run_model_uri(run_id, tracking.TORCH_URI_TAG)
    # The registered PyTorch model serves too (mlflow.pytorch's torch.export program, in eval mode).
    logits = mlflow.pyfunc.load_model(f"models:/tests-cnn{registry.PYTORCH_SUFFIX}@champion").predict(
        (images[:, None] / np.float32(255)).astype(np.float32)
    )
    assert np.asarray(logits).argmax(1).tolist() == expected
    # The image model (photos in) is registered as NAME-images with the same tags, and follows too.
    onnx_version = client.get_model_version_by_alias("tests-cnn", "champion")
    images = client.get_model_version_by_alias("tests-cnn" + registry.IMAGES_SUFFIX, "champion")
    # The image model logged by the export that was registered: a later export of this session's run (another
    # test's) logs a new one and moves the run's tag, and the registered version rightly stays where it was.
    image_model = client.get_logged_model(images.source.removeprefix("models:/"))
    assert images.run_id == run_id and (image_model.source_run_id, image_model.name) == (run_id, "image_model")
    assert images.tags == {**onnx_version.tags, "format": "images"}
    assert images.description.endswith(onnx_version.description.removeprefix("ONNX model. "))
