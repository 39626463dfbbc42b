"""Parity: proof that an exported ONNX file computes what the torch model computes.

Both run on every test image and on edge inputs (a batch of 1, a batch of 1,000, all
zeros, all ones, random noise). The fp32 export passes only if the logits agree to
1e-4, every argmax agrees and the two test accuracies are equal. An int8 model cannot
match logits to 1e-4, so it is judged on accuracy instead: the overall drop against the
torch model must stay within 0.5 points; per-class drops are reported alongside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.evaluate import compute_logits, images_to_tensor
from pipeline.onnx_contract import ContractSession


@dataclass(frozen=True)
class ParityConfig:
    max_abs_diff: float = 1e-4
    batch_size: int = 500  # onnxruntime batches over the test set; torch uses its own
    large_batch: int = 1000
    constant_batch: int = 4  # images in the all-zeros and all-ones inputs
    noise_images: int = 100
    seed: int = 0
    worst_inputs: int = 5  # how many offending inputs a report names
    max_int8_accuracy_drop: float = 0.5  # percentage points


@dataclass
class Offender:
    """One input whose logits differ most, or whose predicted class differs."""

    input: str  # e.g. "test[1234]" or "random_noise[3]"
    max_abs_diff: float
    torch_class: str
    onnx_class: str
    label: str | None = None

    def describe(self) -> str:
        text = f"{self.input}: max |diff| {self.max_abs_diff:.3g}, torch says {self.torch_class!r}"
        text += " and so does onnx" if self.torch_class == self.onnx_class else f", onnx says {self.onnx_class!r}"
        return text + (f" (label {self.label!r})" if self.label is not None else "")


@dataclass
class InputSetStats:
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float


@dataclass
class ParityResult:
    passed: bool
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float  # fraction of all compared inputs, test and edge
    argmax_disagreements: int
    compared_inputs: int
    torch_test_accuracy: float
    onnx_test_accuracy: float
    test_images: int
    tolerance: float
    failures: list[str]
    worst: list[Offender]
    input_sets: dict[str, InputSetStats]
    onnx_path: str
    onnx_metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        return {
            "parity_max_abs_diff": self.max_abs_diff,
            "parity_mean_abs_diff": self.mean_abs_diff,
            "parity_argmax_agreement": self.argmax_agreement,
            "onnx_test_accuracy": self.onnx_test_accuracy,
        }

    def summary_lines(self) -> list[str]:
        edge = len(self.input_sets) - 1
        lines = [
            f"Parity, torch vs onnxruntime on {self.test_images:,} test images + {edge} edge inputs: "
            + ("PASSED" if self.passed else "FAILED"),
            f"  max |logit diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g} "
            f"(tolerance {self.tolerance:.0e})",
            f"  argmax agreement {self.argmax_agreement:.2%} "
            f"({self.compared_inputs - self.argmax_disagreements:,} of {self.compared_inputs:,} inputs)",
            f"  test accuracy: torch {self.torch_test_accuracy:.2%}, onnx {self.onnx_test_accuracy:.2%}",
        ]
        return lines

    def failure_message(self) -> str:
        worst = "; ".join(offender.describe() for offender in self.worst)
        return (
            f"parity FAILED for {self.onnx_path}: {'; '.join(self.failures)}. Worst-offending inputs: {worst}. "
            "The ONNX file does not compute what the torch model computes: re-export it with "
            "`pipeline export-onnx` and check that the model is in eval mode."
        )


@dataclass
class ClassAccuracy:
    class_name: str
    images: int
    torch_accuracy: float
    int8_accuracy: float
    drop_points: float


@dataclass
class QuantizedCheckResult:
    passed: bool
    torch_test_accuracy: float
    int8_test_accuracy: float
    accuracy_drop_points: float  # torch minus int8, in percentage points
    max_drop_points: float
    argmax_agreement: float  # with the torch model, over the test set
    per_class: list[ClassAccuracy]
    int8_path: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        return {
            "int8_test_accuracy": self.int8_test_accuracy,
            "int8_accuracy_drop_points": self.accuracy_drop_points,
            "int8_argmax_agreement": self.argmax_agreement,
        }

    def summary_lines(self) -> list[str]:
        lines = [
            "Int8 accuracy check on the test set: " + ("PASSED" if self.passed else "FAILED"),
            f"  accuracy: torch {self.torch_test_accuracy:.2%}, int8 {self.int8_test_accuracy:.2%}, "
            f"drop {self.accuracy_drop_points:+.2f} points (limit {self.max_drop_points:g}); "
            f"argmax agreement {self.argmax_agreement:.2%}",
            "  per-class drop (points): " + ", ".join(f"{c.class_name} {c.drop_points:+.1f}" for c in self.per_class),
        ]
        return lines

    def failure_message(self) -> str:
        worst = sorted(self.per_class, key=lambda c: -c.drop_points)[:3]
        return (
            f"int8 check FAILED for {self.int8_path}: accuracy dropped {self.accuracy_drop_points:.2f} points "
            f"({self.torch_test_accuracy:.2%} -> {self.int8_test_accuracy:.2%}), more than the "
            f"{self.max_drop_points:g} allowed; largest per-class drops: "
            + ", ".join(f"{c.class_name} {c.drop_points:+.1f}" for c in worst)
            + ". Use the fp32 model, or calibrate on more images."
        )


def run_torch(model: nn.Module, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    return compute_logits(model, torch.from_numpy(inputs), batch_size).cpu().numpy()


def edge_inputs(
    test_inputs: np.ndarray, input_shape: tuple[int, ...], config: ParityConfig
) -> dict[str, tuple[np.ndarray, int]]:
    """name -> (inputs, batch size each side runs them in)."""
    rng = np.random.default_rng(config.seed)
    # Test images, repeated when the test set is smaller than the batch (synthetic data).
    large = test_inputs[np.arange(config.large_batch) % len(test_inputs)]
    return {
        "batch_of_1": (test_inputs[:1], 1),
        f"batch_of_{config.large_batch}": (large, config.large_batch),
        "all_zeros": (np.zeros((config.constant_batch, *input_shape), np.float32), config.constant_batch),
        "all_ones": (np.ones((config.constant_batch, *input_shape), np.float32), config.constant_batch),
        "random_noise": (rng.random((config.noise_images, *input_shape), dtype=np.float32), config.noise_images),
    }


def check_parity(
    model: nn.Module,
    onnx_path: Path | str,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    config: ParityConfig | None = None,
    torch_test_logits: np.ndarray | None = None,
) -> ParityResult:
    """Compare `model` (run in eval mode) with the ONNX file under onnxruntime's CPU provider.

    `torch_test_logits`: the model's logits on `test_images`, if already computed in this process.
    """
    config = config or ParityConfig()
    # Opened as the predictor opens it, but held to the contract's exact names: parity judges what export wrote.
    session = ContractSession(onnx_path, exact_names=True)
    test_inputs = images_to_tensor(test_images).numpy()
    input_shape = tuple(model.input_shape)

    input_sets = {"test": (test_inputs, config.batch_size), **edge_inputs(test_inputs, input_shape, config)}
    stats: dict[str, InputSetStats] = {}
    candidates: list[tuple[bool, float, Offender]] = []
    diff_sum = diff_count = disagreements = compared = 0
    max_diff = 0.0
    test_argmax: tuple[np.ndarray, np.ndarray] | None = None
    for name, (inputs, batch_size) in input_sets.items():
        # The test set runs torch in batches of 1000 and onnxruntime in other sizes, so
        # agreement cannot hinge on both sides seeing identical batches.
        if name == "test" and torch_test_logits is not None:
            expected = np.asarray(torch_test_logits, dtype=np.float32)
            if expected.shape[0] != len(inputs):
                raise ValueError(f"{expected.shape[0]} precomputed torch logits for {len(inputs)} test images")
        else:
            expected = run_torch(model, inputs, 1000 if name == "test" else batch_size)
        actual = session.logits_in_batches(inputs, batch_size)
        diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
        per_input = diff.max(axis=1)
        torch_argmax, onnx_argmax = expected.argmax(1), actual.argmax(1)
        agree = torch_argmax == onnx_argmax
        stats[name] = InputSetStats(len(inputs), float(diff.max()), float(diff.mean()), float(agree.mean()))
        max_diff = max(max_diff, float(diff.max()))
        diff_sum += float(diff.sum())
        diff_count += diff.size
        disagreements += int((~agree).sum())
        compared += len(inputs)
        if name == "test":
            test_argmax = (torch_argmax, onnx_argmax)
        # Disagreeing argmaxes first, then the largest differences.
        for i in np.lexsort((-per_input, agree))[: config.worst_inputs]:
            label = class_names[test_labels[i]] if name == "test" else None
            offender = Offender(
                f"{name}[{i}]", float(per_input[i]), class_names[torch_argmax[i]], class_names[onnx_argmax[i]], label
            )
            candidates.append((bool(agree[i]), float(per_input[i]), offender))

    torch_argmax, onnx_argmax = test_argmax
    torch_correct = int((torch_argmax == test_labels).sum())
    onnx_correct = int((onnx_argmax == test_labels).sum())
    agreement = (compared - disagreements) / compared
    failures = []
    if max_diff > config.max_abs_diff:
        failures.append(f"max abs logit diff {max_diff:.3g} > {config.max_abs_diff:.0e}")
    if disagreements:
        failures.append(f"argmax agreement {agreement:.2%} < 100 % ({disagreements} of {compared} inputs disagree)")
    if torch_correct != onnx_correct:
        failures.append(
            f"test accuracies differ (torch {torch_correct / len(test_labels):.2%}, "
            f"onnx {onnx_correct / len(test_labels):.2%})"
        )
    candidates.sort(key=lambda c: (c[0], -c[1]))
    return ParityResult(
        passed=not failures,
        max_abs_diff=max_diff,
        mean_abs_diff=diff_sum / diff_count,
        argmax_agreement=agreement,
        argmax_disagreements=disagreements,
        compared_inputs=compared,
        torch_test_accuracy=torch_correct / len(test_labels),
        onnx_test_accuracy=onnx_correct / len(test_labels),
        test_images=len(test_labels),
        tolerance=config.max_abs_diff,
        failures=failures,
        worst=[offender for _, _, offender in candidates[: config.worst_inputs]],
        input_sets=stats,
        onnx_path=str(onnx_path),
        onnx_metadata=session.metadata,
    )


def check_quantized(
    model: nn.Module,
    int8_path: Path | str,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    config: ParityConfig | None = None,
    torch_test_logits: np.ndarray | None = None,
) -> QuantizedCheckResult:
    """Judge an int8 model by its test accuracy against the torch model's, overall and per class."""
    config = config or ParityConfig()
    inputs = images_to_tensor(test_images).numpy()
    torch_logits = run_torch(model, inputs, 1000) if torch_test_logits is None else np.asarray(torch_test_logits)
    torch_pred = torch_logits.argmax(1)
    int8_pred = ContractSession(int8_path, exact_names=True).logits_in_batches(inputs, config.batch_size).argmax(1)
    torch_ok, int8_ok = torch_pred == test_labels, int8_pred == test_labels
    per_class = []
    for class_id, name in enumerate(class_names):
        members = test_labels == class_id
        if not members.any():
            continue
        torch_acc, int8_acc = float(torch_ok[members].mean()), float(int8_ok[members].mean())
        per_class.append(ClassAccuracy(name, int(members.sum()), torch_acc, int8_acc, 100 * (torch_acc - int8_acc)))
    torch_acc, int8_acc = float(torch_ok.mean()), float(int8_ok.mean())
    drop = 100 * (int(torch_ok.sum()) - int(int8_ok.sum())) / len(test_labels)  # from counts: 0.5 stays 0.5
    return QuantizedCheckResult(
        passed=drop <= config.max_int8_accuracy_drop,
        torch_test_accuracy=torch_acc,
        int8_test_accuracy=int8_acc,
        accuracy_drop_points=drop,
        max_drop_points=config.max_int8_accuracy_drop,
        argmax_agreement=float((torch_pred == int8_pred).mean()),
        per_class=per_class,
        int8_path=str(int8_path),
    )
