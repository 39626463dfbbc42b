"""`pipeline bench`: our stages against the chapter's own loop, side by side, in one run.

Every figure is a ratio of two measurements taken in the same process, minutes apart,
because absolute times on a shared 2-core machine mean little. Returns plain dicts;
the CLI writes JSON + Markdown and logs them to MLflow.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import default_data_dir
from pipeline.data import load_split
from pipeline.evaluate import compute_logits, images_to_tensor
from pipeline.files import write_text
from pipeline.models import build_model
from pipeline.train import TrainConfig, train

CHAPTER_BATCH = 100
CHAPTER_EVAL_EVERY = 50  # listing 5-11 evaluates the whole test set every 50 iterations
EPOCH_STEPS = 600  # 60,000 images / batch 100


@dataclass
class BenchConfig:
    quick: bool = False
    data_dir: Path = field(default_factory=default_data_dir)
    train_steps: int = 0  # steps per training measurement; 0 = by mode
    inference_batches: tuple[int, ...] = (1, 64, 256, 1024)
    full_job: bool = False  # also time a real 5-epoch `mlflow run` (full mode)
    # Baseline and ours are measured in alternation this many times and the medians compared:
    # on a shared 2-core VM a single pair can be 20 % off either way.
    rounds: int = 0  # 0 = by mode

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.train_steps:
            self.train_steps = 60 if self.quick else 300
        if self.train_steps < CHAPTER_EVAL_EVERY:
            # Fewer steps would never reach the chapter's first evaluation, whose cost is half the story.
            raise ValueError(f"train_steps must be at least {CHAPTER_EVAL_EVERY}")
        if self.quick:
            self.inference_batches = (1, 256)
        if not self.rounds:
            self.rounds = 1 if self.quick else 3


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------- training


def chapter_loop(data_dir: Path, model_name: str, steps: int, seed: int = 0) -> dict[str, float]:
    """Listings 5-4 and 5-11 as written: torchvision dataset with per-sample ToTensor, an
    unshuffled DataLoader of 100, and every 50 iterations the whole test set evaluated in
    train mode with gradients on. Times training iterations and evaluations separately."""
    import torchvision
    import torchvision.transforms as transforms
    from torch.utils.data import DataLoader

    to_tensor = transforms.Compose([transforms.ToTensor()])
    train_dataset = torchvision.datasets.FashionMNIST(str(data_dir), download=False, transform=to_tensor)
    test_dataset = torchvision.datasets.FashionMNIST(str(data_dir), download=False, train=False, transform=to_tensor)
    train_loader = DataLoader(train_dataset, batch_size=CHAPTER_BATCH)
    test_loader = DataLoader(test_dataset, batch_size=CHAPTER_BATCH)

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
        "seconds_per_evaluation": eval_seconds / evaluations if evaluations else float("nan"),
        "test_accuracy_at_end": accuracy,
    }


def our_training(data_dir: Path, model_name: str, steps: int, **levers: Any) -> dict[str, float]:
    """Our train stage for `steps` steps (tracking off), then one timed evaluation."""
    result = train(TrainConfig(model=model_name, max_steps=steps, data_dir=data_dir, **levers))
    m = result.metrics
    eval_seconds = m["wall_time_s"] - m["train_time_s"]
    return {
        "steps": m["steps"],
        "train_images_per_s": m["train_images_per_s"],
        "seconds_per_step": m["train_time_s"] / m["steps"],
        "seconds_per_evaluation": eval_seconds,
        "test_accuracy_at_end": m["test_accuracy"],
    }


def five_epoch_seconds(step_s: float, eval_s: float, evaluations: int) -> float:
    return 5 * EPOCH_STEPS * step_s + evaluations * eval_s


def warm_up(data_dir: Path) -> None:
    # The first steps in a process pay for allocator growth and oneDNN kernel selection;
    # without this the first measurement of a run looks slower than it is.
    our_training(data_dir, "cnn", 5)


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.median([row[key] for row in rows])) for key in rows[0]}


def bench_training(cfg: BenchConfig) -> dict[str, Any]:
    warm_up(cfg.data_dir)
    out: dict[str, Any] = {}
    for name in ("cnn", "dnn"):
        pairs = [
            (chapter_loop(cfg.data_dir, name, cfg.train_steps), our_training(cfg.data_dir, name, cfg.train_steps))
            for _ in range(cfg.rounds)
        ]
        chapter, ours = medians([c for c, _ in pairs]), medians([o for _, o in pairs])
        out[name] = {
            "rounds": cfg.rounds,
            "chapter": chapter,
            "ours": ours,
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
    return out


def bench_levers(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Training speed levers on the CNN, each against our plain fp32 NCHW loop, same step count.

    Every variant names its precision and layout, so the table means the same on machines where
    `precision=auto` resolves differently."""
    steps = max(cfg.train_steps // 2, CHAPTER_EVAL_EVERY)
    plain = {"precision": "fp32", "channels_last": False}
    fast = {"precision": "bf16", "channels_last": True}
    variants: list[tuple[str, dict[str, Any], int | None]] = [
        ("fp32, NCHW (plain loop)", plain, None),
        ("fp32 + channels_last", {**plain, "channels_last": True}, None),
        ("bf16 autocast, NCHW", {**plain, "precision": "bf16"}, None),
        ("bf16 + channels_last (default here)", fast, None),
        ("default, 1 intra-op thread", fast, 1),
        ("default, eval batch 100 (chapter's)", {**fast, "eval_batch_size": 100}, None),
        ("default, eval batch 1000", {**fast, "eval_batch_size": 1000}, None),
    ]
    warm_up(cfg.data_dir)
    threads = torch.get_num_threads()
    measured: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
    for _ in range(cfg.rounds):  # every variant once per round, so slow spells hit them all
        for label, levers, num_threads in variants:
            torch.set_num_threads(num_threads or threads)
            try:
                measured[label].append(our_training(cfg.data_dir, "cnn", steps, **levers))
            finally:
                torch.set_num_threads(threads)
    rows = [{"lever": label, **medians(runs)} for label, runs in measured.items()]
    base = rows[0]
    for row in rows:
        row["train_speedup"] = row["train_images_per_s"] / base["train_images_per_s"]
        row["eval_speedup"] = base["seconds_per_evaluation"] / row["seconds_per_evaluation"]
    return rows


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


# ---------------------------------------------------------------------- inference


def latency_stats(call, images: np.ndarray, batch: int, budget_s: float) -> dict[str, float]:
    """Time `call(batch_of_uint8)` repeatedly over the test images, end to end from arrays."""
    call(images[:batch])  # warm-up: first-call allocations and graph setup
    times, start, offset = [], time.perf_counter(), 0
    while time.perf_counter() - start < budget_s or len(times) < 5:
        chunk = images[offset : offset + batch]
        if len(chunk) < batch:
            offset, chunk = 0, images[:batch]
        tick = time.perf_counter()
        call(chunk)
        times.append(time.perf_counter() - tick)
        offset += batch
    times_ms = np.array(times) * 1000
    return {
        "images_per_s": batch * len(times) / (times_ms.sum() / 1000),
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        "calls": len(times),
    }


def bench_inference(cfg: BenchConfig, model: torch.nn.Module, onnx_paths: dict[str, Path]) -> dict[str, Any]:
    import onnxruntime as ort

    images = load_split(cfg.data_dir, "test").images
    model = model.eval()

    def torch_eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(images_to_tensor(batch)).numpy()

    runners = {"torch eager": torch_eager}
    for label, path in onnx_paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run_onnx(batch: np.ndarray, session=session, input_name=input_name) -> np.ndarray:
            x = (batch.astype(np.float32) * np.float32(1 / 255))[:, None]
            return session.run(None, {input_name: x})[0]

        runners[label] = run_onnx

    budget = 1.0 if cfg.quick else 3.0
    results: dict[str, Any] = {}
    for batch in cfg.inference_batches:
        row = {label: latency_stats(call, images, batch, budget) for label, call in runners.items()}
        eager = row["torch eager"]["images_per_s"]
        for label in runners:
            row[label]["vs_torch_eager"] = row[label]["images_per_s"] / eager
        if "onnxruntime fp32" in row and "onnxruntime int8" in row:
            row["onnxruntime int8"]["vs_fp32"] = (
                row["onnxruntime int8"]["images_per_s"] / row["onnxruntime fp32"]["images_per_s"]
            )
        results[str(batch)] = row
    return results


def bench_onnxruntime_levers(
    cfg: BenchConfig, model: torch.nn.Module, class_names: list[str], workdir: Path, batch: int = 256
) -> list[dict[str, Any]]:
    """Export-time folding and onnxruntime session options, at one batch size, from uint8 arrays."""
    import onnxruntime as ort

    from pipeline.export import export_onnx

    images = load_split(cfg.data_dir, "test").images
    plain = export_onnx(model, workdir / "plain.onnx", class_names, model.registry_name, "bench", fold=False)
    folded = export_onnx(model, workdir / "folded.onnx", class_names, model.registry_name, "bench", fold=True)
    level = ort.GraphOptimizationLevel
    variants = [
        ("not folded, all graph optimisations, 2 threads", plain, level.ORT_ENABLE_ALL, 0),
        ("folded (default), all graph optimisations, 2 threads", folded, level.ORT_ENABLE_ALL, 0),
        ("folded, basic graph optimisations only", folded, level.ORT_ENABLE_BASIC, 0),
        ("folded, graph optimisations off", folded, level.ORT_DISABLE_ALL, 0),
        ("folded, 1 intra-op thread", folded, level.ORT_ENABLE_ALL, 1),
    ]
    budget = 1.0 if cfg.quick else 2.0
    runners = {}
    for label, path, optimisation, threads in variants:
        options = ort.SessionOptions()
        options.graph_optimization_level = optimisation
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(chunk: np.ndarray, session=session, name=name) -> np.ndarray:
            return session.run(None, {name: (chunk.astype(np.float32) * np.float32(1 / 255))[:, None]})[0]

        runners[label] = run
    measured: dict[str, list[dict[str, float]]] = {label: [] for label in runners}
    for _ in range(cfg.rounds):
        for label, run in runners.items():
            measured[label].append(latency_stats(run, images, batch, budget))
    rows = [{"variant": label, **medians(runs)} for label, runs in measured.items()]
    for row in rows:
        row["vs_first"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


# ------------------------------------------------------------------ tracking cost


def bench_tracking_overhead(cfg: BenchConfig) -> dict[str, float]:
    """The train stage with MLflow streaming on vs off, on the same steps, in a temp store."""
    from pipeline import tracking

    steps = cfg.train_steps
    config = TrainConfig(model="cnn", max_steps=steps, data_dir=cfg.data_dir, log_every=50)
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


# ---------------------------------------------------------------------- memory


def peak_rss_mib(command: list[str], env: dict[str, str] | None = None) -> float:
    """Peak resident memory of a command, measured by a fresh wrapper process."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    if out[1] != "0":
        raise RuntimeError(f"{' '.join(command)} exited {out[1]} while measuring memory")
    return int(out[0]) / 1024  # ru_maxrss is in KiB on Linux


def bench_memory(cfg: BenchConfig, onnx_path: Path | None) -> dict[str, float]:
    pipeline_cmd = [sys.executable, "-m", "pipeline.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        out = {
            "train_stage_mib": peak_rss_mib(
                [
                    *pipeline_cmd,
                    "train",
                    "--model",
                    "cnn",
                    "--max-steps",
                    str(cfg.train_steps // 2),
                    "--data-dir",
                    str(cfg.data_dir),
                ],
                env,
            )
        }
        if onnx_path is not None:
            test_idx = cfg.data_dir / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
            out["predict_10k_mib"] = peak_rss_mib(
                [*pipeline_cmd, "predict", "--model", str(onnx_path), "--output", f"{tmp}/p.csv", str(test_idx)], env
            )
    return out


# ------------------------------------------------------------------------ report


TARGETS = (
    ("CNN training throughput >= 2.5x the chapter's loop", "cnn_train_ratio", 2.5),
    ("5-epoch CNN job <= 1/4 of the chapter's 5-epoch loop", "job_fraction", 0.25),
    ("onnxruntime fp32 >= 6x torch eager at batch 256", "ort_vs_eager_256", 6.0),
    ("int8 >= 1.3x fp32 at batch 256", "int8_vs_fp32_256", 1.3),
    ("int8 accuracy drop <= 0.5 points", "int8_drop_points", 0.5),
    ("MLflow overhead <= 3 % of training time", "tracking_overhead", 0.03),
)
LOWER_IS_BETTER = {"job_fraction", "int8_drop_points", "tracking_overhead"}


def verdicts(headline: dict[str, float | None]) -> list[dict[str, Any]]:
    rows = []
    for label, key, bound in TARGETS:
        value = headline.get(key)
        if value is None:
            status = "NOT MEASURED"
        elif key in LOWER_IS_BETTER:
            status = "PASS" if value <= bound else "MISS"
        else:
            status = "PASS" if value >= bound else "MISS"
        rows.append({"target": label, "value": value, "status": status})
    return rows


def save_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=2, default=str))


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


# ------------------------------------------------------------------ the whole job


def time_full_job(model_name: str = "cnn") -> dict[str, Any]:
    """The default 5-epoch `mlflow run` (train + evaluate + export + parity), timed end to end
    as a user runs it, in a temporary tracking store."""
    from pipeline.config import project_root

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": uri,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            env.pop(key, None)
        # Artifacts beside the temporary store, not in the project's mlruns/.
        subprocess.run(
            [sys.executable, "-c", "from pipeline import tracking; tracking.configure('bench-job')"],
            env=env,
            check=True,
        )
        started = time.perf_counter()
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlflow",
                "run",
                str(project_root()),
                "--env-manager",
                "local",
                "--experiment-name",
                "bench-job",
                "-P",
                f"model={model_name}",
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=project_root(),
        )
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            raise RuntimeError(f"mlflow run failed:\n{completed.stderr[-2000:]}")
        probe = (
            "import mlflow, json; r = mlflow.search_runs(experiment_names=['bench-job']).iloc[0];"
            "print(json.dumps({k: r.get(k) for k in ('metrics.test_accuracy', 'metrics.wall_time_s',"
            " 'metrics.onnx_test_accuracy', 'metrics.parity_max_abs_diff')}))"
        )
        found = json.loads(
            subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
    return {"seconds": seconds, **{k.split(".", 1)[1]: v for k, v in found.items()}}


def inference_models(
    model: torch.nn.Module, class_names: list[str], workdir: Path, data_dir: Path
) -> tuple[dict[str, Path], dict[str, float]]:
    """Export fp32 and int8 ONNX files of `model` and measure the test accuracy of all three."""
    from pipeline.export import calibration_sample, export_onnx, quantize_int8
    from pipeline.predict import Predictor

    fp32 = export_onnx(model, workdir / "bench.onnx", class_names, model.registry_name, "bench")
    train_images = load_split(data_dir, "train").images
    int8 = quantize_int8(fp32, workdir / "bench.int8.onnx", calibration_sample(train_images))
    test = load_split(data_dir, "test")
    accuracy = {
        "torch eager": float(
            (compute_logits(model, images_to_tensor(test.images)).argmax(1).numpy() == test.labels).mean()
        )
    }
    paths = {"onnxruntime fp32": fp32, "onnxruntime int8": int8}
    for label, path in paths.items():
        accuracy[label] = float((Predictor(path).predict_arrays(test.images).argmax(1) == test.labels).mean())
    return paths, accuracy


def run_benchmarks(
    cfg: BenchConfig, model: torch.nn.Module, class_names: list[str], workdir: Path, progress=lambda message: None
) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "config": config_dict(cfg)}
    progress("training: the chapter's loop vs ours")
    results["training"] = bench_training(cfg)
    progress("training levers")
    results["levers"] = bench_levers(cfg)
    progress("data feeding: DataLoader vs tensor slicing")
    results["data_feeding"] = bench_data_feeding(cfg)
    progress("MLflow overhead")
    results["tracking"] = bench_tracking_overhead(cfg)
    progress("inference: torch eager vs onnxruntime fp32 / int8")
    paths, accuracy = inference_models(model, class_names, workdir, cfg.data_dir)
    results["inference_accuracy"] = accuracy
    results["inference"] = bench_inference(cfg, model, paths)
    progress("onnxruntime levers: folding, session options")
    results["onnxruntime_levers"] = bench_onnxruntime_levers(cfg, model, class_names, workdir)
    progress("peak memory")
    results["memory"] = bench_memory(cfg, paths["onnxruntime fp32"])
    if cfg.full_job:
        progress("the default 5-epoch job, end to end (mlflow run)")
        results["full_job"] = time_full_job()
    results["headline"] = headline(results)
    results["verdicts"] = verdicts(results["headline"])
    return results


def headline(results: dict[str, Any]) -> dict[str, Any]:
    cnn = results["training"]["cnn"]
    chapter_5_epochs = cnn["chapter_5_epochs_s_extrapolated"]
    job = results.get("full_job")
    at_256 = results["inference"].get("256", {})
    accuracy = results["inference_accuracy"]
    return {
        "cnn_train_ratio": cnn["train_throughput_ratio"],
        "chapter_5_epochs_s": chapter_5_epochs,
        "job_s": job["seconds"] if job else cnn["ours_5_epochs_train_s_extrapolated"],
        "job_measured": bool(job),
        "job_fraction": (job["seconds"] if job else cnn["ours_5_epochs_train_s_extrapolated"]) / chapter_5_epochs,
        "job_test_accuracy": job["test_accuracy"] if job else None,
        "ort_vs_eager_256": at_256.get("onnxruntime fp32", {}).get("vs_torch_eager"),
        "int8_vs_fp32_256": at_256.get("onnxruntime int8", {}).get("vs_fp32"),
        "int8_drop_points": 100 * (accuracy["onnxruntime fp32"] - accuracy["onnxruntime int8"]),
        "tracking_overhead": results["tracking"]["overhead_fraction_of_5_epochs"],
    }


def render_markdown(results: dict[str, Any]) -> str:
    m, h = results["machine"], results["headline"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads). "
        f"Mode: {'quick' if results['config']['quick'] else 'full'}, "
        f"{results['config']['train_steps']} training steps per measurement; training, lever and MLflow figures "
        f"are medians of {results['config']['rounds']} alternating rounds.",
        "",
    ]
    lines += ["| target | measured | result |", "|---|---|---|"]
    for row in results["verdicts"]:
        value = row["value"]
        shown = "n/a" if value is None else f"{value:.3g}"
        lines.append(f"| {row['target']} | {shown} | {row['status']} |")
    lines += [
        "",
        "Training (images/s in training steps; evaluation timed apart):",
        "",
        "| model | chapter's loop | ours | ratio | chapter 5 epochs (extrapolated) | ours 5 epochs, train only "
        "(extrapolated) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["training"].items():
        lines.append(
            f"| {name} | {row['chapter']['train_images_per_s']:,.0f} | {row['ours']['train_images_per_s']:,.0f} | "
            f"{row['train_throughput_ratio']:.2f}x | {row['chapter_5_epochs_s_extrapolated']:,.0f} s | "
            f"{row['ours_5_epochs_train_s_extrapolated']:,.0f} s |"
        )
    if "full_job" in results:
        job = results["full_job"]
        lines += [
            "",
            f"Default 5-epoch CNN `mlflow run` end to end (measured): {job['seconds']:,.0f} s, test "
            f"accuracy {job['test_accuracy']:.2%}, ONNX accuracy {job.get('onnx_test_accuracy') or 0:.2%}; "
            f"{h['job_fraction']:.2f} of the chapter's 5-epoch loop ({h['chapter_5_epochs_s']:,.0f} s, "
            "extrapolated from its measured step and evaluation times).",
        ]
    lines += [
        "",
        "Levers (CNN, ours):",
        "",
        "| lever | train images/s | train speed-up | evaluation speed-up |",
        "|---|---|---|---|",
    ]
    for row in results["levers"]:
        lines.append(
            f"| {row['lever']} | {row['train_images_per_s']:,.0f} | {row['train_speedup']:.2f}x | "
            f"{row['eval_speedup']:.2f}x |"
        )
    lines += [
        "",
        "Inference, end to end from uint8 arrays (images/s, p50 / p99 batch latency in ms):",
        "",
        "| batch | runtime | images/s | p50 ms | p99 ms | vs torch eager |",
        "|---|---|---|---|---|---|",
    ]
    for batch, row in results["inference"].items():
        for runtime, stats in row.items():
            lines.append(
                f"| {batch} | {runtime} | {stats['images_per_s']:,.0f} | {stats['p50_ms']:.2f} | "
                f"{stats['p99_ms']:.2f} | {stats['vs_torch_eager']:.2f}x |"
            )
    lines += [
        "",
        "onnxruntime levers (batch 256, images/s):",
        "",
        "| variant | images/s | p50 ms | vs first |",
        "|---|---|---|---|",
    ]
    for row in results["onnxruntime_levers"]:
        lines.append(
            f"| {row['variant']} | {row['images_per_s']:,.0f} | {row['p50_ms']:.2f} | {row['vs_first']:.2f}x |"
        )
    feed = results["data_feeding"]
    lines += [
        "",
        f"Data feeding alone, per batch of 100: DataLoader + per-sample ToTensor "
        f"{feed['dataloader_ms_per_batch']:.2f} ms, tensor slicing {feed['tensor_slicing_ms_per_batch']:.3f} "
        f"ms ({feed['speedup']:,.0f}x), after a one-time decode of {feed['one_time_decode_s']:.2f} s.",
    ]
    acc = results["inference_accuracy"]
    lines += ["", "Test accuracy of the benchmarked model: " + ", ".join(f"{k} {v:.2%}" for k, v in acc.items()) + "."]
    t = results["tracking"]
    lines += [
        "",
        f"MLflow: {t['seconds_per_step_off'] * 1000:.1f} ms/step off vs {t['seconds_per_step_on'] * 1000:.1f} "
        f"ms/step on, plus {t['model_logging_s']:.1f} s to log the model once: "
        f"{t['overhead_fraction_of_5_epochs']:.1%} of a 5-epoch training (extrapolated).",
    ]
    mem = results["memory"]
    lines += [
        "",
        "Peak memory (RSS): " + ", ".join(f"{k.removesuffix('_mib')} {v:,.0f} MiB" for k, v in mem.items()) + ".",
    ]
    return "\n".join(lines) + "\n"
