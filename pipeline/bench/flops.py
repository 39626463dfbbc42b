"""Work done, counted from the model's own layers, and the machine's own ceiling for it.

A speed-up over the chapter's loop says nothing about how much of the CPU a step uses; the
fraction of the machine's measured GEMM throughput does. FLOPs are counted by running one
image through the model with hooks on its convolutions and linear layers (2 FLOPs per
multiply-add), so a new model or input size needs no arithmetic by hand.
"""

from __future__ import annotations

import time

import torch
from torch import nn

# A backward pass costs about twice the forward one (gradients for inputs and for weights).
TRAINING_FLOPS_PER_FORWARD = 3


def forward_flops(model: nn.Module) -> int:
    """FLOPs of one forward pass of one image through `model`'s Conv2d and Linear layers."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * per_output * output[0].numel()
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *model.input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def best_gflops(call, flops: float, seconds: float) -> float:
    """GFLOP/s of `call`'s fastest run within `seconds`, after one warm-up call (kernel choice).

    Best, not median: a ceiling is what the cores can do when nothing else is running.
    """
    call()
    best, started = float("inf"), time.perf_counter()
    while time.perf_counter() - started < seconds:
        tick = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - tick)
    return flops / best / 1e9


def gemm_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 1.0) -> float:
    """The machine's matmul ceiling as torch reaches it: a large square torch.mm (MKL or oneDNN)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    return best_gflops(lambda: torch.mm(a, b), 2 * size**3, seconds)


def ort_gemm_gflops(size: int = 2048, seconds: float = 1.0) -> float:
    """The same fp32 matmul in onnxruntime (its own MLAS kernels), through the project's session factory.

    MKL, behind torch.mm, takes slower code paths on some CPUs (AMD's among them) than MLAS does,
    so torch's figure alone can sit below what onnxruntime's convolutions reach.
    """
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from pipeline.onnx_contract import open_session

    rng = np.random.default_rng(0)
    weight = helper.make_tensor("b", TensorProto.FLOAT, (size, size), rng.standard_normal((size, size), np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, (size, size))],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, (size, size))],
        [weight],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save_model(helper.make_model(graph), str(path))
        session = open_session(path)
    a = rng.standard_normal((size, size), np.float32)
    return best_gflops(lambda: session.run(None, {"a": a}), 2 * size**3, seconds)
