"""cnn_plus and its recipe: defaults applied only where no option was given, augmentation on
tensors, the one-cycle schedule, the validation split, and the export of the new model."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import pairwise

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import hardware, jobs
from pipeline.augment import augment_batch
from pipeline.cli import cli
from pipeline.config import EPOCHS_WITHOUT_NATIVE_BF16, RECIPES, TrainConfig, train_config
from pipeline.data import load_split
from pipeline.errors import PipelineError
from pipeline.hardware import CpuFeatures
from pipeline.optim import END, START, one_cycle
from pipeline.train import setup, train

NATIVE_BF16 = CpuFeatures(model="AMD EPYC (AVX512-BF16)", avx2=True, avx512=True, avx512_bf16=True)
AVX2_ONLY = CpuFeatures(model="AMD EPYC (AVX2 only)", avx2=True)
CHAPTER = {"epochs": 5, "batch_size": 100, "lr": 0.001, "optimizer": "adam", "schedule": "constant"}


def test_chapter_models_keep_the_chapters_recipe():
    for model in ("dnn", "cnn"):
        config = train_config(model)
        assert {k: getattr(config, k) for k in CHAPTER} == CHAPTER
        assert (config.weight_decay, config.label_smoothing, config.crop_pad, config.hflip) == (0, 0, 0, False)
        assert config.val_size == 0 and config.test_eval == "epoch"
    assert "cnn" not in RECIPES and "dnn" not in RECIPES


def test_recipe_fills_only_what_was_not_given(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_features", lambda: NATIVE_BF16)  # the recipe as timed (see below)
    recipe = RECIPES["cnn_plus"]
    config = train_config("cnn_plus")
    assert all(getattr(config, k) == v for k, v in recipe.items())
    # An explicit value wins, even one equal to the chapter's default; None means "not given".
    given = train_config("cnn_plus", epochs=2, optimizer=TrainConfig.optimizer, hflip=False, lr=None)
    assert (given.epochs, given.optimizer, given.hflip, given.lr) == (2, "adam", False, recipe["lr"])
    with pytest.raises(TypeError, match="unknown TrainConfig fields: epoch"):
        train_config("cnn_plus", epoch=3)


def test_the_recipes_epochs_follow_the_cpu(monkeypatch):
    cpu = NATIVE_BF16
    monkeypatch.setattr(hardware, "cpu_features", lambda: cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_config("cnn_plus").epochs == RECIPES["cnn_plus"]["epochs"] == 7
    cpu = AVX2_ONLY  # --precision auto trains in fp32 there: one epoch fewer fits the chapter CNN's time
    fewer = train_config("cnn_plus")
    assert fewer.epochs == EPOCHS_WITHOUT_NATIVE_BF16["cnn_plus"] == 6
    assert fewer == replace(train_config("cnn_plus", epochs=7), epochs=6)  # nothing else of the recipe moves
    assert train_config("cnn_plus", epochs=7).epochs == 7  # what the user gives wins
    assert train_config("cnn_plus", device="cuda").epochs == 7  # a GPU trains the recipe in its own time
    assert train_config("cnn").epochs == 5  # the chapter's models keep the chapter's recipe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_config("cnn_plus").epochs == 7  # device auto picks that GPU
    assert train_config("cnn_plus", device="cpu").epochs == 6
    assert "cnn_plus 7 (6 on a CPU without native bf16)" in " ".join(
        CliRunner().invoke(cli, ["train", "--help"]).output.split()
    )


def _configs_from_cli(monkeypatch, *argument_lists):
    seen = []

    def fake_train_model(config, experiment, reuse):
        seen.append(config)
        return jobs.TrainJob(
            "r",
            "m",
            "models:/m-1",
            {"steps": 1, "wall_time_s": 1.0, "train_images_per_s": 1.0, "test_accuracy": 0.5, "test_loss": 1.0},
        )

    monkeypatch.setattr(jobs, "train_model", fake_train_model)
    for arguments in argument_lists:
        result = CliRunner().invoke(cli, ["train", *arguments])
        assert result.exit_code == 0, result.output
    return seen


def test_cli_applies_the_recipe_only_to_options_left_out(monkeypatch):
    plain, recipe, overridden, chapter_with_flip, test_curve, test_once = _configs_from_cli(
        monkeypatch,
        ["--model", "cnn"],
        ["--model", "cnn_plus"],
        ["--model", "cnn_plus", "--label-smoothing", "0", "--no-hflip", "--schedule", "constant"],
        ["--model", "cnn", "--hflip", "--crop-pad", "1"],
        ["--model", "cnn_plus", "--test-eval", "epoch"],
        ["--model", "cnn", "--test-eval", "end"],
    )
    assert plain == TrainConfig(model="cnn")
    assert recipe == train_config("cnn_plus")
    assert (overridden.label_smoothing, overridden.hflip, overridden.schedule) == (0.0, False, "constant")
    assert overridden.optimizer == RECIPES["cnn_plus"]["optimizer"]  # what was not given stays the recipe's
    assert (chapter_with_flip.hflip, chapter_with_flip.crop_pad, chapter_with_flip.lr) == (True, 1, 0.001)
    # The test set's evaluation: the recipe's once at the end, unless asked for after every epoch.
    assert (recipe.test_eval, test_curve.test_eval, plain.test_eval, test_once.test_eval) == (
        "end",
        "epoch",
        "epoch",
        "end",
    )
    assert test_curve == replace(recipe, test_eval="epoch")  # nothing else of the recipe moves
    refused = CliRunner().invoke(cli, ["train", "--model", "cnn_plus", "--test-eval", "never"])
    assert refused.exit_code == 2 and "'never' is not one of 'epoch', 'end'" in refused.output


@pytest.mark.parametrize(
    ("field", "value"),
    [("optimizer", "rmsprop"), ("schedule", "cosine"), ("label_smoothing", 1.0), ("crop_pad", -1), ("val_size", -5)],
)
def test_config_rejects_bad_recipe_values(field, value):
    with pytest.raises(PipelineError, match=field):
        TrainConfig(**{field: value})


def test_augmentation_crops_and_flips_whole_batches_reproducibly():
    images = torch.zeros(64, 1, 28, 28)
    images[:, 0, 10, 12] = 1.0  # one bright pixel per image
    first = augment_batch(images, 2, False, torch.Generator().manual_seed(0))
    again = augment_batch(images, 2, False, torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and images[:, 0, 10, 12].eq(1).all()  # seeded; the input is untouched
    rows, cols = (first[:, 0] == 1).nonzero(as_tuple=True)[1:]
    assert len(rows) == 64  # every image keeps its pixel: a shift, not a resize
    assert (rows - 10).abs().max() <= 2 and (cols - 12).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # shifts differ per image
    flipped = augment_batch(images, 0, True, torch.Generator().manual_seed(0))
    mirrored = flipped[:, 0, 10, 27 - 12] == 1
    assert torch.equal(flipped[mirrored], images.flip(-1)[mirrored]) and torch.equal(
        flipped[~mirrored], images[~mirrored]
    )
    assert 16 < int(mirrored.sum()) < 48
    assert torch.equal(augment_batch(images, 0, False, torch.Generator()), images)


def test_one_cycle_rises_then_anneals_even_on_tiny_schedules():
    total = 100
    values = [one_cycle(step, total, 0.25) for step in range(total + 1)]
    assert values[0] == pytest.approx(START) and max(values) == pytest.approx(1.0)
    assert values.index(max(values)) == 25 and values[-1] == pytest.approx(END)
    assert all(a <= b for a, b in pairwise(values[:26]))
    assert all(a >= b for a, b in pairwise(values[25:]))
    for tiny in (1, 2, 3, 4):  # torch's OneCycleLR divides by zero here
        assert all(math.isfinite(one_cycle(step, tiny, 0.25)) for step in range(tiny + 1))


def test_validation_split_is_the_last_n_training_images(synthetic_data_dir):
    labels = load_split(synthetic_data_dir, "train").labels
    trainer = setup(TrainConfig(model="dnn", val_size=150, data_dir=synthetic_data_dir, allow_other_data=True))
    assert torch.equal(trainer.val_y, torch.from_numpy(labels[-150:]))
    assert torch.equal(trainer.train_y, torch.from_numpy(labels[:-150]))
    assert trainer.params["train_size"] == len(labels) - 150 and trainer.params["val_size"] == 150
    with pytest.raises(PipelineError, match="leaves no training images"):
        setup(TrainConfig(model="dnn", val_size=len(labels), data_dir=synthetic_data_dir, allow_other_data=True))


def test_train_val_size_logs_validation_beside_test_every_epoch(synthetic_data_dir, tracking_store):
    arguments = ["train", "--model", "dnn", "--epochs", "2", "--batch-size", "50", "--val-size", "100"]
    result = CliRunner().invoke(cli, [*arguments, "--allow-other-data", "--data-dir", str(synthetic_data_dir)])
    assert result.exit_code == 0, result.output
    assert "validation accuracy" in result.output
    run_id = result.output.split("Run id:")[1].split()[0]
    client = mlflow.MlflowClient()
    steps = {key: [m.step for m in client.get_metric_history(run_id, key)] for key in ("val_accuracy", "test_accuracy")}
    assert steps["val_accuracy"] == steps["test_accuracy"] == [10, 20]  # 500 training images / 50, per epoch
    assert client.get_run(run_id).data.params["train_size"] == "500"


def test_trial_settings_never_load_the_test_set(synthetic_data_dir, monkeypatch):
    from pipeline import train as train_module

    loaded = []
    monkeypatch.setattr(train_module, "load_split", lambda d, split: loaded.append(split) or load_split(d, split))
    config = TrainConfig(
        model="dnn", max_steps=3, val_size=100, test_eval="never", data_dir=synthetic_data_dir, allow_other_data=True
    )
    result = train(config)
    assert loaded == ["train"]
    assert not any(key.startswith("test_") for key in result.metrics) and "val_accuracy" in result.metrics
    end = train(
        TrainConfig(
            model="dnn", epochs=2, batch_size=100, test_eval="end", data_dir=synthetic_data_dir, allow_other_data=True
        )
    )
    assert ["test_accuracy" in row for row in end.history] == [False, True]  # the test set once, at the end


@pytest.mark.slow
def test_cnn_plus_trains_exports_and_passes_parity(synthetic_data_dir, tmp_path):
    import onnx

    from pipeline.config import CLASS_NAMES
    from pipeline.export import export_onnx, fold_for_inference
    from pipeline.parity import check_parity

    result = train(
        train_config("cnn_plus", max_steps=6, batch_size=64, data_dir=synthetic_data_dir, allow_other_data=True)
    )
    model = result.model.eval()
    _, report = fold_for_inference(model)
    assert report.conv_bn == []  # each batch norm follows a max-pool, not its conv: nothing to absorb
    path = export_onnx(model, tmp_path / "cnn_plus.onnx", CLASS_NAMES, "cnn_plus", "run")
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("Conv") == 2 and ops.count("MaxPool") == 2  # the exporter drops nothing either
    test = load_split(synthetic_data_dir, "test")
    parity = check_parity(model, path, test.images, test.labels, CLASS_NAMES)
    assert parity.passed, parity.summary_lines()
    assert np.isfinite(parity.metrics()["parity_max_abs_diff"])
    # The flip averaging is in the graph: onnxruntime gives an image and its mirror the same logits,
    # and the mean of the model's two single views.
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = test.images[:16].astype(np.float32)[:, None] / 255
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    (mirrored,) = session.run(None, {session.get_inputs()[0].name: x[..., ::-1].copy()})
    np.testing.assert_allclose(logits, mirrored, atol=1e-4)
    with torch.no_grad():
        views = (model.logits(torch.from_numpy(x)) + model.logits(torch.from_numpy(x).flip(-1))) / 2
    np.testing.assert_allclose(logits, views.numpy(), atol=1e-4)
    # What looks inside one forward pass sees one view per image.
    from pipeline.explain import explain, feature_maps

    maps = feature_maps(model, torch.from_numpy(x[:4]))
    assert [fm.maps.shape[0] for fm in maps] == [4] * len(maps)
    assert explain(model, torch.from_numpy(x[:4]), np.arange(4)).shape == (4, 28, 28)
