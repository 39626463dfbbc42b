"""Training measured: the chapter's loop against our train stage, its levers, data feeding, MLflow's cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.config import CHAPTER_BATCH, CHAPTER_EVAL_EVERY, EPOCH_STEPS, TEST_IMAGES, BenchConfig
from pipeline.bench.flops import TRAINING_FLOPS_PER_FORWARD, forward_flops
from pipeline.bench.timing import medians
from pipeline.callbacks import TrainCallback, TrainResult
from pipeline.data import load_split
from pipeline.evaluate import compute_logits, images_to_tensor
from pipeline.models import build_model
from pipeline.train import INDUCTOR_CACHE_ENV, TrainConfig, native_bf16, resolve_precision, train


def chapter_loop(
    data_dir: Path, model_name: str, steps: int, seed: int = 0, eval_images: int = TEST_IMAGES
) -> dict[str, float]:
    """Listings 5-4 and 5-11 as written: torchvision dataset with per-sample ToTensor, an
    unshuffled DataLoader of 100, and every 50 iterations the whole test set evaluated in
    train mode with gradients on. Times training iterations and evaluations separately.

    `eval_images` below 10,000 (quick mode, as for our evaluation): each evaluation runs on the
    first `eval_images` test images, and its time is scaled to the whole test set."""
    import torchvision
    import torchvision.transforms as transforms
    from torch.utils.data import DataLoader, Subset

    to_tensor = transforms.Compose([transforms.ToTensor()])
    train_dataset = torchvision.datasets.FashionMNIST(str(data_dir), download=False, transform=to_tensor)
    test_dataset = torchvision.datasets.FashionMNIST(str(data_dir), download=False, train=False, transform=to_tensor)
    evaluated = Subset(test_dataset, range(min(eval_images, len(test_dataset))))
    train_loader = DataLoader(train_dataset, batch_size=CHAPTER_BATCH)
    test_loader = DataLoader(evaluated, batch_size=CHAPTER_BATCH)

    torch.manual_seed(seed)
    model = build_model(model_name)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)

    count, train_seconds, eval_seconds, evaluations, accuracy = 0, 0.0, 0.0, 0, float("nan")
    tick = time.perf_counter()
    while count < steps:
        for images, labels in train_loader:
            outputs = model(images.view(CHAPTER_BATCH, 1, 28, 28))
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            count += 1
            train_seconds += time.perf_counter() - tick
            if not count % CHAPTER_EVAL_EVERY:
                started = time.perf_counter()
                correct = total = 0
                for test_images, test_labels in test_loader:
                    predictions = torch.max(model(test_images.view(CHAPTER_BATCH, 1, 28, 28)), 1)[1]
                    correct += (predictions == test_labels).sum().item()
                    total += len(test_labels)
                accuracy = correct / total
                eval_seconds += time.perf_counter() - started
                evaluations += 1
            tick = time.perf_counter()
            if count >= steps:
                break
    return {
        "steps": count,
        "train_images_per_s": count * CHAPTER_BATCH / train_seconds,
        "loop_images_per_s": count * CHAPTER_BATCH / (train_seconds + eval_seconds),
        "seconds_per_step": train_seconds / count,
        "seconds_per_evaluation": (
            eval_seconds / evaluations * len(test_dataset) / len(evaluated) if evaluations else float("nan")
        ),
        "test_accuracy_at_end": accuracy,
    }


def our_training(data_dir: Path, model_name: str, steps: int, **levers: Any) -> TrainResult:
    """Our train stage for `steps` steps, tracking off and no test evaluation (timed apart)."""
    return train(TrainConfig(model=model_name, max_steps=steps, data_dir=data_dir, test_eval="never", **levers))


def training_figures(result: TrainResult, data_dir: Path, eval_images: int, eval_batch_size: int | None = None) -> dict:
    """A training's figures, then one timed evaluation of the first `eval_images` test images as the
    stage evaluates (its model, layout and eval batch unless one is given), scaled to the whole test
    set: evaluation time is linear in the images, and quick mode needs a fifth."""
    test = load_split(data_dir, "test")
    images = images_to_tensor(test.images[:eval_images])
    labels = torch.from_numpy(test.labels[:eval_images])
    started = time.perf_counter()
    logits = compute_logits(result.model, images, eval_batch_size or result.params["eval_batch_size"])
    eval_seconds = time.perf_counter() - started
    m = result.metrics
    return {
        "steps": m["steps"],
        "train_images_per_s": m["train_images_per_s"],
        "seconds_per_step": m["train_time_s"] / m["steps"],
        "seconds_per_evaluation": eval_seconds * len(test.labels) / len(labels),
        "test_accuracy_at_end": (logits.argmax(1) == labels).float().mean().item(),
    }


def five_epoch_seconds(step_s: float, eval_s: float, evaluations: int) -> float:
    return 5 * EPOCH_STEPS * step_s + evaluations * eval_s


def warm_up(data_dir: Path, eval_images: int) -> None:
    # The first steps in a process pay for allocator growth and oneDNN kernel selection;
    # without this the first measurement of a run looks slower than it is.
    training_figures(our_training(data_dir, "cnn", 5), data_dir, eval_images)


def bench_training(cfg: BenchConfig) -> tuple[dict[str, Any], torch.nn.Module]:
    """The chapter's loop against ours, per model; also hands back the CNN our last round trained
    (the model inference is measured on when no finished run is given: no training of its own)."""
    warm_up(cfg.data_dir, cfg.eval_images)
    out: dict[str, Any] = {}
    trained: dict[str, torch.nn.Module] = {}
    for name in ("cnn", "dnn"):
        pairs = []
        for _ in range(cfg.rounds):
            chapter = chapter_loop(cfg.data_dir, name, cfg.train_steps, eval_images=cfg.eval_images)
            ours = our_training(cfg.data_dir, name, cfg.train_steps)
            pairs.append((chapter, training_figures(ours, cfg.data_dir, cfg.eval_images)))
            trained[name] = ours.model
        chapter, ours = medians([c for c, _ in pairs]), medians([o for _, o in pairs])
        flops = TRAINING_FLOPS_PER_FORWARD * forward_flops(build_model(name))
        out[name] = {
            "rounds": cfg.rounds,
            "chapter": chapter,
            "ours": ours,
            "levers": default_levers(),
            "training_flops_per_image": flops,
            "ours_gflops": ours["train_images_per_s"] * flops / 1e9,
            "train_throughput_ratio": ours["train_images_per_s"] / chapter["train_images_per_s"],
            # Extrapolated from the measured parts: 3,000 steps, plus 60 chapter evaluations
            # (every 50 steps) against our 5 (one per epoch).
            "chapter_5_epochs_s_extrapolated": five_epoch_seconds(
                chapter["seconds_per_step"], chapter["seconds_per_evaluation"], 5 * EPOCH_STEPS // CHAPTER_EVAL_EVERY
            ),
            "ours_5_epochs_train_s_extrapolated": five_epoch_seconds(
                ours["seconds_per_step"], ours["seconds_per_evaluation"], 5
            ),
        }
    return out, trained["cnn"]


def describe_levers(precision: str, channels_last: bool) -> str:
    """What a variant really runs, e.g. 'bf16 (emulated) + channels_last' on a CPU without native bf16."""
    native = precision != "bf16" or native_bf16(torch.device("cpu"))
    return (
        f"{precision}{'' if native else ' (emulated)'}"
        f"{' autocast' if precision == 'bf16' else ''}{' + channels_last' if channels_last else ', NCHW'}"
    )


def default_levers() -> dict[str, Any]:
    """What `pipeline train` runs with its defaults on this CPU: `--precision auto` resolved here."""
    return {
        "precision": resolve_precision(TrainConfig.precision, torch.device("cpu")),
        "channels_last": TrainConfig.channels_last,
    }


def lever_variants() -> list[tuple[str, dict[str, Any], int | None]]:
    """(label, TrainConfig levers, intra-op threads) for every lever row, labelled with what it runs.

    The precision/layout grid first, the default marked; then one change at a time from the
    default as it resolves on this CPU, so no row claims a default it did not run."""
    default = default_levers()
    grid = [(p, cl) for p in ("fp32", "bf16") for cl in (False, True)]
    variants: list[tuple[str, dict[str, Any], int | None]] = []
    for precision, channels_last in grid:
        levers = {"precision": precision, "channels_last": channels_last}
        label = describe_levers(precision, channels_last)
        label += " (plain loop)" if levers == {"precision": "fp32", "channels_last": False} else ""
        label += " (default here)" if levers == default else ""
        variants.append((label, levers, None))
    named = f"default ({describe_levers(**default)})"
    variants += [
        (f"{named}, 1 intra-op thread", default, 1),
        (f"{named}, eval batch 100 (chapter's)", {**default, "eval_batch_size": 100}, None),
        (f"{named}, eval batch 1000", {**default, "eval_batch_size": 1000}, None),
    ]
    return variants


LEVER_MIN_STEPS = 20


def bench_levers(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Training speed levers on the CNN, each against our plain fp32 NCHW loop, same step count."""
    # Our loop alone (no chapter evaluation to reach), so half the training measurement's steps
    # suffice: 150 in full mode, 30 in quick mode.
    steps = max(cfg.train_steps // 2, LEVER_MIN_STEPS)
    variants = lever_variants()
    warm_up(cfg.data_dir, cfg.eval_images)
    threads = torch.get_num_threads()
    figures: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
    for _ in range(cfg.rounds):  # every variant once per round, so slow spells hit them all
        # A row whose training is one this round already ran (it changes only the evaluation batch,
        # or asks for the thread count in use, as 1 thread on a 1-thread process) times its own
        # evaluation of that training: training again would measure the same thing twice.
        trainings: dict[tuple[str, int], TrainResult] = {}
        for label, levers, num_threads in variants:
            training_levers = {k: v for k, v in levers.items() if k != "eval_batch_size"}
            key = (repr(sorted(training_levers.items())), num_threads or threads)
            torch.set_num_threads(num_threads or threads)
            try:
                if key not in trainings:
                    trainings[key] = our_training(cfg.data_dir, "cnn", steps, **training_levers)
                row = training_figures(trainings[key], cfg.data_dir, cfg.eval_images, levers.get("eval_batch_size"))
                figures[label].append(row)
            finally:
                torch.set_num_threads(threads)
    rows = [{"lever": label, **medians(runs)} for label, runs in figures.items()]
    base = rows[0]
    for row in rows:
        row["train_speedup"] = row["train_images_per_s"] / base["train_images_per_s"]
        row["eval_speedup"] = base["seconds_per_evaluation"] / row["seconds_per_evaluation"]
    return rows


class StepClock(TrainCallback):
    """When training started and when each step ended, to tell the first step (which compiles
    under torch.compile) from the steady ones."""

    def on_train_start(self, params: dict[str, Any]) -> None:
        self.times = [time.perf_counter()]

    def on_step(self, step: int, loss: float, images: int) -> None:
        self.times.append(time.perf_counter())


def step_times(data_dir: Path, steps: int, compile: bool) -> dict[str, float]:
    """Our CNN training with the default levers, eager or compiled: the first step and the mean of the rest."""
    clock = StepClock()
    train(TrainConfig(model="cnn", max_steps=steps, data_dir=data_dir, compile=compile, test_eval="never"), [clock])
    first, rest = clock.times[1] - clock.times[0], clock.times[-1] - clock.times[1]
    return {"first_step_s": first, "seconds_per_step": rest / (steps - 1)}


# One measurement per process: a compile's cost shows only in a process that has not compiled yet.
STEP_TIMES_PROBE = (
    "import json, sys; from pathlib import Path; from pipeline.bench.training import step_times;"
    "print(json.dumps(step_times(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == 'compile')))"
)


def bench_compile(cfg: BenchConfig) -> dict[str, Any]:
    """torch.compile (inductor) against eager on the default levers, compile time included: one
    compiling process with an empty on-disk cache, then eager and warm-cache processes in
    alternation. Adopted only if 5 epochs with the warm cache's compile beat 5 eager epochs."""
    steps = max(cfg.train_steps // 2, LEVER_MIN_STEPS)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, INDUCTOR_CACHE_ENV: cache}

        def measure(mode: str) -> dict[str, float]:
            done = subprocess.run(
                [sys.executable, "-c", STEP_TIMES_PROBE, str(cfg.data_dir), str(steps), mode],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"the {mode} training probe failed:\n{done.stderr[-2000:]}")
            return json.loads(done.stdout.strip().splitlines()[-1])

        cold = measure("compile")
        pairs = [(measure("eager"), measure("compile")) for _ in range(cfg.rounds)]
    eager, warm = medians([e for e, _ in pairs]), medians([w for _, w in pairs])
    epochs_steps = 5 * EPOCH_STEPS
    eager_5_epochs = epochs_steps * eager["seconds_per_step"]
    compiled_5_epochs = epochs_steps * warm["seconds_per_step"] + warm["first_step_s"]
    return {
        "levers": describe_levers(**default_levers()),
        "steps": steps,
        "eager_seconds_per_step": eager["seconds_per_step"],
        "compiled_seconds_per_step": warm["seconds_per_step"],
        "step_speedup": eager["seconds_per_step"] / warm["seconds_per_step"],
        # The first step's extra time over eager's first step: tracing, code generation, C++ builds.
        "compile_s_cold_cache": cold["first_step_s"] - eager["first_step_s"],
        "compile_s_warm_cache": warm["first_step_s"] - eager["first_step_s"],
        "eager_5_epochs_train_s": eager_5_epochs,
        "compiled_5_epochs_train_s": compiled_5_epochs,
        "adopted": compiled_5_epochs < eager_5_epochs,
    }


def bench_data_feeding(cfg: BenchConfig) -> dict[str, float]:
    """Only the cost of producing batches of 100: the chapter's DataLoader with per-sample
    PIL -> ToTensor(), against index slices of tensors decoded once (what `train` does)."""
    import torchvision
    import torchvision.transforms as transforms
    from torch.utils.data import DataLoader

    steps = cfg.train_steps
    dataset = torchvision.datasets.FashionMNIST(str(cfg.data_dir), download=False, transform=transforms.ToTensor())
    started = time.perf_counter()
    for count, _batch in enumerate(DataLoader(dataset, batch_size=CHAPTER_BATCH, shuffle=True), 1):
        if count == steps:
            break
    loader_s = (time.perf_counter() - started) / steps

    split = load_split(cfg.data_dir, "train")
    started = time.perf_counter()
    images, labels = images_to_tensor(split.images), torch.from_numpy(split.labels)
    decode_s = time.perf_counter() - started
    order = torch.randperm(len(labels))
    started = time.perf_counter()
    for step in range(steps):
        index = order[step * CHAPTER_BATCH : (step + 1) * CHAPTER_BATCH]
        images[index], labels[index]  # noqa: B018 - the gather is what is being timed
    slicing_s = (time.perf_counter() - started) / steps
    return {
        "dataloader_ms_per_batch": 1000 * loader_s,
        "tensor_slicing_ms_per_batch": 1000 * slicing_s,
        "one_time_decode_s": decode_s,
        "speedup": loader_s / slicing_s,
    }


def bench_tracking_overhead(cfg: BenchConfig) -> dict[str, float]:
    """The train stage with MLflow streaming on vs off, on the same steps, in a temp store."""
    from pipeline import tracking

    steps = cfg.train_steps
    # No test evaluation: it is the same work on and off, and only adds its noise to the difference.
    config = TrainConfig(model="cnn", max_steps=steps, data_dir=cfg.data_dir, log_every=50, test_eval="never")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ.pop("MLFLOW_RUN_ID", None)
        try:
            for _ in range(cfg.rounds):
                off = train(config)
                with tracking.run(experiment="bench-overhead"):
                    on = train(config, [tracking.MlflowTrainCallback()])
                    started = time.perf_counter()
                    tracking.log_torch_model(on.model, on.example_input, on.params["class_names"])
                    model_logging_s = time.perf_counter() - started
                rows.append(
                    {
                        "off": off.metrics["wall_time_s"] / steps,
                        "on": on.metrics["wall_time_s"] / steps,
                        "logging": model_logging_s,
                    }
                )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    median = medians(rows)
    per_step_off, per_step_on, model_logging_s = median["off"], median["on"], median["logging"]
    full_train_s = 5 * EPOCH_STEPS * per_step_off
    # Streaming cost scales with steps; model logging is paid once per run.
    overhead_s = max(per_step_on - per_step_off, 0.0) * 5 * EPOCH_STEPS + model_logging_s
    return {
        "steps": steps,
        "seconds_per_step_off": per_step_off,
        "seconds_per_step_on": per_step_on,
        "model_logging_s": model_logging_s,
        "overhead_fraction_of_5_epochs": overhead_s / full_train_s,
    }
