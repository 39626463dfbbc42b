"""Training on synthetic IDX data: learning, reproducibility, the fixed evaluation, callbacks."""

from __future__ import annotations

import pytest
import torch

from pipeline.callbacks import TrainCallback
from pipeline.checkpoint import load_training_state, save_training_state
from pipeline.errors import PipelineError
from pipeline.evaluate import compute_logits
from pipeline.train import TrainConfig, fit, restore_state, setup, shuffled_batches, train


class Recorder(TrainCallback):
    def __init__(self):
        self.events = []

    def on_train_start(self, params):
        self.events.append(("start", params))

    def on_log(self, step, metrics):
        self.events.append(("log", step, metrics))

    def on_epoch_end(self, epoch, step, metrics):
        self.events.append(("epoch", epoch, step, metrics))

    def on_train_end(self, result):
        self.events.append(("end", result))


@pytest.mark.parametrize("model", ["dnn", "cnn"])
def test_train_learns_synthetic_data(synthetic_data_dir, model):
    result = train(
        TrainConfig(
            model=model, epochs=3, batch_size=50, data_dir=synthetic_data_dir, allow_other_data=True, device="cpu"
        )
    )
    assert result.metrics["test_accuracy"] >= 0.9  # chance is 0.1
    assert result.metrics["steps"] == 3 * 600 // 50
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.example_input.shape == (2, 1, 28, 28)


def test_same_seed_same_result_different_seed_differs(synthetic_data_dir):
    def run(seed):
        r = train(
            TrainConfig(
                model="cnn", max_steps=8, batch_size=32, seed=seed, data_dir=synthetic_data_dir, allow_other_data=True
            )
        )
        return r.metrics["test_loss"], r.model.fc3.weight.detach().clone()

    (loss_a, w_a), (loss_b, w_b), (_, w_c) = run(0), run(0), run(1)
    assert loss_a == loss_b and torch.equal(w_a, w_b)
    assert not torch.equal(w_a, w_c)


def test_max_steps_stops_and_evaluates_once(synthetic_data_dir):
    recorder = Recorder()
    result = train(
        TrainConfig(
            model="dnn", max_steps=5, batch_size=10, log_every=2, data_dir=synthetic_data_dir, allow_other_data=True
        ),
        [recorder],
    )
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["start", "log", "log", "epoch", "end"]
    assert result.metrics["steps"] == 5 and len(result.history) == 1
    params = recorder.events[0][1]
    assert params["model"] == "dnn" and params["seed"] == 0 and params["device"] == "cpu"
    assert params["torch_version"] == torch.__version__  # the build that ran, e.g. +cu130
    assert params["sha256_train-images-idx3-ubyte"] and len(params["class_names"]) == 10


def test_evaluation_is_in_eval_mode_and_deterministic(synthetic_data_dir):
    # Dropout on (the chapter's evaluation) would make two passes differ.
    result = train(TrainConfig(model="cnn", max_steps=3, data_dir=synthetic_data_dir, allow_other_data=True))
    model = result.model.train()
    x = torch.rand(16, 1, 28, 28)
    assert torch.equal(compute_logits(model, x, 16), compute_logits(model, x, 16))
    # Batch statistics (train-mode BatchNorm) would make the answer depend on the batch size.
    assert torch.allclose(compute_logits(model, x, 5), compute_logits(model, x, 16), atol=1e-5)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # the same model in train mode is not deterministic
    assert model.training  # the caller's mode is restored


def test_batches_are_shuffled_cover_everything_and_change_per_epoch():
    generator = torch.Generator().manual_seed(0)
    first = shuffled_batches(1000, 100, generator, steps=10)
    second = shuffled_batches(1000, 100, generator, steps=10)
    assert [len(b) for b in first] == [100] * 10
    assert torch.equal(torch.cat(first).sort().values, torch.arange(1000))
    assert not torch.equal(torch.cat(first), torch.arange(1000))  # not the file order
    assert not torch.equal(torch.cat(first), torch.cat(second))  # a new order each epoch
    assert len(shuffled_batches(1050, 100, generator, steps=99)) == 11  # the last, partial batch is kept


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("max_steps", 0),
        ("lr", -1.0),
        ("lr", float("nan")),  # `nan <= 0` is False, so a plain `lr <= 0` check let it through
        ("lr", float("inf")),
        ("seed", -1),
        ("seed", 2**64),
    ],
)
def test_config_rejects_nonsense(field, value):
    with pytest.raises(PipelineError, match=field):
        TrainConfig(**{field: value})


def test_unknown_model_fails_before_loading_data(tmp_path):
    with pytest.raises(PipelineError, match="known models"):
        train(TrainConfig(model="vgg", data_dir=tmp_path))


@pytest.mark.parametrize(("precision", "channels_last"), [("fp32", False), ("fp32", True), ("bf16", True)])
def test_every_speed_lever_still_learns(synthetic_data_dir, precision, channels_last):
    result = train(
        TrainConfig(
            model="cnn",
            epochs=2,
            batch_size=50,
            precision=precision,
            channels_last=channels_last,
            data_dir=synthetic_data_dir,
            allow_other_data=True,
        )
    )
    assert result.params["precision"] == precision
    assert result.metrics["test_accuracy"] >= 0.9


def test_auto_precision_follows_the_hardware(monkeypatch):
    from pipeline import train as train_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    assert train_module.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    assert train_module.resolve_precision("auto", cpu) == "fp32"
    assert train_module.resolve_precision("bf16", cpu) == "bf16"  # an explicit choice is kept


def test_non_finite_loss_stops_training_naming_the_step(synthetic_data_dir):
    recorder = Recorder()
    config = TrainConfig(model="dnn", lr=1e30, max_steps=20, data_dir=synthetic_data_dir, allow_other_data=True)
    with pytest.raises(PipelineError, match=r"training diverged: the loss is (nan|inf) at step \d+") as info:
        train(config, [recorder])
    step = int(str(info.value).split("at step ")[1].split(";")[0])
    assert 1 <= step < 20 and "end" not in [e[0] for e in recorder.events]


def test_training_refuses_data_that_is_not_fashion_mnist(synthetic_data_dir):
    config = TrainConfig(model="dnn", max_steps=1, data_dir=synthetic_data_dir)
    with pytest.raises(PipelineError, match="train-images-idx3-ubyte differs from Fashion-MNIST's") as info:
        train(config)
    assert "--allow-other-data" in str(info.value)
    config.allow_other_data = True
    assert train(config).metrics["steps"] == 1


class StopAtCheckpoint(TrainCallback):
    """Saves every checkpoint to a file, as a callback without MLflow would, and stops at `stop_step`."""

    def __init__(self, folder, stop_step):
        self.folder, self.stop_step = folder, stop_step

    def on_checkpoint(self, epoch, step, state):
        save_training_state(state, self.folder / f"state-{step}.pt")
        if step >= self.stop_step:
            raise KeyboardInterrupt


def test_a_run_resumed_from_any_checkpoint_ends_exactly_as_the_uninterrupted_one(synthetic_data_dir, tmp_path):
    # The CNN: BatchNorm buffers, Dropout2d (the torch RNG), Adam state and the shuffle order all matter.
    config = TrainConfig(
        model="cnn",
        epochs=2,
        batch_size=50,
        checkpoint_every=5,
        data_dir=synthetic_data_dir,
        allow_other_data=True,
    )
    reference = train(config)
    with pytest.raises(KeyboardInterrupt):
        train(config, [StopAtCheckpoint(tmp_path, stop_step=15)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-10.pt", "state-12.pt", "state-15.pt", "state-5.pt"]
    for step in (12, 15):  # the end of epoch 1; 3 steps into epoch 2
        state = load_training_state(tmp_path / f"state-{step}.pt")
        assert (state["step"], state["epoch"], state["epoch_step"]) == (step, 1 if step == 12 else 2, step - 12)
        trainer = setup(config)
        restore_state(trainer, state)
        resumed = fit(trainer)
        assert resumed.metrics["test_loss"] == reference.metrics["test_loss"]  # to the last bit
        assert resumed.history == reference.history
        for name, tensor in resumed.model.state_dict().items():
            assert torch.equal(tensor, reference.model.state_dict()[name]), name


def test_a_training_checkpoint_is_loaded_without_running_pickles(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Recorder(), protocol=2))  # any object that isn't tensors and plain types
    with pytest.raises(PipelineError, match="not a usable training checkpoint"):
        load_training_state(path)
    torch.save({"model": {}}, path)
    with pytest.raises(PipelineError, match="not a training checkpoint"):
        load_training_state(path)


@pytest.mark.slow
def test_compile_trains_the_same_model_as_eager_and_caches_its_code_on_disk(synthetic_data_dir, tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    from pipeline.train import INDUCTOR_CACHE_ENV

    cache = tmp_path / "inductor"
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(cache))

    def run(compile):
        return train(
            TrainConfig(
                model="dnn",
                max_steps=3,
                batch_size=32,
                precision="fp32",
                compile=compile,
                data_dir=synthetic_data_dir,
                allow_other_data=True,
            )
        )

    eager = run(False)
    # Inductor draws dropout masks from its own generator; eager's makes the two runs comparable.
    with inductor_config.patch(fallback_random=True):
        compiled = run(True)
    assert compiled.params["compile"] is True and eager.params["compile"] is False
    # The result is the plain model (no torch.compile wrapper in its state dict or its export).
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())
    for name, weight in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], rel=1e-4)
    assert any((cache / "fxgraph").rglob("*")), "the compiled graph was not cached on disk"


def test_compile_cache_is_the_users_else_one_per_isa_cap_under_the_user_cache(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from pipeline.train import INDUCTOR_CACHE_ENV, compile_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"
    # torch writes its own default into the environment on import; that is not the user's choice.
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, default_cache_dir())
    assert compile_cache_dir() == tmp_path / "fashion-pipeline" / "torchinductor"
    monkeypatch.delenv(INDUCTOR_CACHE_ENV)
    assert compile_cache_dir() == tmp_path / "fashion-pipeline" / "torchinductor"
    # Kernels built for the full CPU must never be served to a process capped at AVX2.
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert compile_cache_dir() == tmp_path / "fashion-pipeline" / "torchinductor-avx2"
