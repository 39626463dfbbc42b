"""The CUDA path's choices, run on CPU: fp16 autocast with a gradient scaler, and what auto picks."""

from __future__ import annotations

import torch

from pipeline import train as train_module
from pipeline.train import TrainConfig, resolve_precision, setup, train


def test_auto_precision_on_a_gpu_is_bf16_where_native_else_fp16(monkeypatch):
    gpu = torch.device("cuda")  # only a name here: nothing runs on it
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    assert resolve_precision("auto", gpu) == "bf16"
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    assert resolve_precision("auto", gpu) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"  # a CPU without bf16 stays fp32


def test_fp16_trains_through_the_gradient_scaler(synthetic_data_dir):
    data = {"data_dir": synthetic_data_dir, "allow_other_data": True}
    config = TrainConfig(model="dnn", epochs=3, batch_size=50, precision="fp16", device="cpu", **data)
    assert isinstance(setup(config).scaler, torch.amp.GradScaler)
    assert setup(TrainConfig(model="dnn", precision="fp32", **data)).scaler is None
    result = train(config)
    assert result.params["precision"] == "fp16"
    assert result.metrics["test_accuracy"] >= 0.9
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # weights stay fp32 under autocast
