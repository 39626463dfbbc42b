"""The benchmark's verdicts and its Markdown report.

The report is a list of sections, most of them table specs (title, columns, rows), rendered
by one function; the JSON holds the same figures under the same keys.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.bench.config import TEST_IMAGES
from pipeline.bench.flops import TRAINING_FLOPS_PER_FORWARD
from pipeline.files import write_text

TRAIN_RATIO_TARGET = 2.5
TARGETS = (
    ("CNN training throughput >= 2.5x the chapter's loop", "cnn_train_ratio", TRAIN_RATIO_TARGET),
    ("5-epoch CNN job <= 1/4 of the chapter's 5-epoch loop", "job_fraction", 0.25),
    ("onnxruntime fp32 >= 6x torch eager at batch 256", "ort_vs_eager_256", 6.0),
    ("int8 >= 1.3x fp32 at batch 256", "int8_vs_fp32_256", 1.3),
    ("int8 accuracy drop <= 0.5 points", "int8_drop_points", 0.5),
    ("MLflow overhead <= 3 % of training time", "tracking_overhead", 0.03),
    ("CNN training >= 40 % of the machine's GEMM limit", "train_fraction_of_limit", 0.40),
    ("onnxruntime fp32 at batch 256 >= 60 % of the fp32 GEMM limit", "ort_fraction_of_limit", 0.60),
    ("cnn_plus test accuracy >= 93.0 % (mean of seeds)", "recipe_accuracy_pct", 93.0),
    ("cnn_plus training time <= the chapter CNN's 5 epochs", "recipe_time_ratio", 1.0),
    ("predict on PNG photos with the conversion >= 2/3 of it without", "photo_throughput_ratio", 2 / 3),
)
LOWER_IS_BETTER = {"job_fraction", "int8_drop_points", "tracking_overhead", "recipe_time_ratio"}


# Targets that only make sense on some CPUs: key -> (headline flag that says it applies, why not).
APPLIES_WHEN = {
    "int8_vs_fp32_256": ("int8_applicable", "N/A: no VNNI or AMX, so int8 cannot beat fp32 here"),
    "recipe_accuracy_pct": ("recipe_measured", "N/A in --quick mode: accuracy needs the full trainings"),
}


def verdicts(headline: dict[str, float | None]) -> list[dict[str, Any]]:
    rows = []
    for label, key, bound in TARGETS:
        value = headline.get(key)
        flag, reason = APPLIES_WHEN.get(key, (None, ""))
        if flag is not None and headline.get(flag) is False:
            status = reason
        elif value is None:
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
        "int8_applicable": bool(results["machine"]["cpu_features"]["vnni"]),
        "photo_throughput_ratio": results["photos"]["auto_vs_none"] if "photos" in results else None,
        **recipe_headline(results["recipe"]),
        **limit_fractions(results),
    }


def recipe_headline(recipe: dict[str, Any]) -> dict[str, Any]:
    accuracy = recipe["cnn_plus"]["test_accuracy_mean"]
    return {
        "recipe_measured": recipe["measured"],
        "recipe_accuracy_pct": 100 * accuracy if accuracy is not None else None,
        "recipe_time_ratio": recipe["time_ratio"],
    }


def limit_fractions(results: dict[str, Any]) -> dict[str, float | None]:
    """Achieved GFLOP/s as a fraction of the GEMM ceiling of the precision that actually ran."""
    limits, cnn = results["limits"], results["training"]["cnn"]
    train_limit = limits[f"{cnn['levers']['precision']}_gemm_gflops"]
    at_256 = results["inference"].get("256", {}).get("onnxruntime fp32")
    forward_flops = cnn["training_flops_per_image"] / TRAINING_FLOPS_PER_FORWARD
    ort_gflops = at_256["images_per_s"] * forward_flops / 1e9 if at_256 else None
    # onnxruntime against the better fp32 ceiling (its own counts even when torch is capped at AVX2).
    ort_limit = max(limits["fp32_gemm_gflops"], limits.get("fp32_onnxruntime_matmul_gflops") or 0)
    # What the training target asks of the hardware: the chapter's loop at the target ratio, in
    # GFLOP/s, against the limit. Above 1, no implementation of the same model could reach it.
    needed_gflops = TRAIN_RATIO_TARGET * cnn["chapter"]["train_images_per_s"] * cnn["training_flops_per_image"] / 1e9
    return {
        "train_gflops": cnn["ours_gflops"],
        "train_fraction_of_limit": cnn["ours_gflops"] / train_limit if train_limit else None,
        "train_target_fraction_of_limit": needed_gflops / train_limit if train_limit else None,
        "train_ratio_at_limit": TRAIN_RATIO_TARGET * train_limit / needed_gflops if train_limit else None,
        "ort_gflops_256": ort_gflops,
        "ort_fraction_of_limit": ort_gflops / ort_limit if ort_gflops else None,
    }


# ------------------------------------------------------------------------ the Markdown report


@dataclass(frozen=True)
class Column:
    header: str
    # A str.format template over the row's keys ("{p50_ms:.2f}", "{chapter[steps]}"), or a function of the row.
    cell: str | Callable[[dict[str, Any]], str]

    def render(self, row: dict[str, Any]) -> str:
        return self.cell.format_map(row) if isinstance(self.cell, str) else self.cell(row)


@dataclass(frozen=True)
class Table:
    title: str | None
    columns: tuple[Column, ...]
    rows: Callable[[dict[str, Any]], Iterable[dict[str, Any]]]  # results -> one dict per table row


def measured(row: dict[str, Any]) -> str:
    return "n/a" if row["value"] is None else f"{row['value']:.3g}"


def machine_line(results: dict[str, Any]) -> str:
    m, config, limits = results["machine"], results["config"], results["limits"]
    bf16 = limits["bf16_gemm_gflops"]
    default = results["training"]["cnn"]["levers"]
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads"
        + ("; malloc keeps freed memory, for the chapter's loop as for ours" if m.get("freed_memory_kept") else "")
        + "). "
        f"CPU features: {m['cpu_features']['summary']}"
        + (
            " (capped at AVX2 for torch via oneDNN/ATen/MKL; onnxruntime still uses the full CPU)"
            if m.get("isa_limit")
            else ""
        )
        + ". Its limit: a 2048x2048 matmul runs at "
        f"{limits['fp32_gemm_gflops']:,.0f} GFLOP/s in fp32"
        + (
            f" (torch.mm {limits['fp32_torch_mm_gflops']:,.0f}, onnxruntime "
            f"{limits['fp32_onnxruntime_matmul_gflops']:,.0f})"
            if "fp32_onnxruntime_matmul_gflops" in limits
            else ""
        )
        + (f" and {bf16:,.0f} in bf16" if bf16 else " (bf16 not native here)")
        + f'. `--precision auto` resolves to {default["precision"]} here; "ours" and "default" rows ran that. '
        f"Mode: {'quick' if config['quick'] else 'full'}, "
        f"{config['train_steps']} training steps per measurement; training, lever and MLflow figures "
        f"are medians of {config['rounds']} alternating rounds"
        + (
            f"; each evaluation, the chapter's and ours, is timed on {config['eval_images']:,} test images "
            "and scaled to 10,000."
            if config.get("eval_images", TEST_IMAGES) < TEST_IMAGES
            else "."
        )
    )


def ceiling_line(results: dict[str, Any]) -> str:
    h, cnn = results["headline"], results["training"]["cnn"]
    return (
        f"What the training target asks of this machine: {TRAIN_RATIO_TARGET}x the chapter's loop is "
        f"{TRAIN_RATIO_TARGET * cnn['chapter']['train_images_per_s']:,.0f} images/s, "
        f"{h['train_target_fraction_of_limit']:.0%} of the {cnn['levers']['precision']} GEMM limit (ours "
        f"runs at {h['train_fraction_of_limit']:.0%}); at 100 % of the limit the ratio would be "
        f"{h['train_ratio_at_limit']:.1f}x."
    )


def compile_line(results: dict[str, Any]) -> str | None:
    if "compile" not in results:
        return None
    c = results["compile"]
    verdict = "adopted." if c["adopted"] else "not adopted (`--compile` stays off)."
    return (
        f"torch.compile (inductor, {c['levers']}, median of {results['config']['rounds']} processes each): "
        f"{c['compiled_seconds_per_step'] * 1000:.1f} ms/step against eager's "
        f"{c['eager_seconds_per_step'] * 1000:.1f} ({c['step_speedup']:.2f}x); compiling took "
        f"{c['compile_s_cold_cache']:.1f} s with an empty cache and {c['compile_s_warm_cache']:.1f} s with a "
        f"warm one, so 5 epochs would train in {c['compiled_5_epochs_train_s']:,.0f} s against "
        f"{c['eager_5_epochs_train_s']:,.0f} s: {verdict}"
    )


def full_job_line(results: dict[str, Any]) -> str | None:
    if "full_job" not in results:
        return None
    job, h = results["full_job"], results["headline"]
    return (
        f"Default 5-epoch CNN `mlflow run` end to end (measured): {job['seconds']:,.0f} s, test "
        f"accuracy {job['test_accuracy']:.2%}, ONNX accuracy {job.get('onnx_test_accuracy') or 0:.2%}; "
        f"{h['job_fraction']:.2f} of the chapter's 5-epoch loop ({h['chapter_5_epochs_s']:,.0f} s, "
        "extrapolated from its measured step and evaluation times)."
        + (
            f" Training with its per-epoch evaluations took {job['wall_time_s']:,.0f} s of it "
            f"({job['wall_time_s'] / h['chapter_5_epochs_s']:.2f} of the chapter's loop); the rest, "
            f"{job['seconds'] - job['wall_time_s']:,.0f} s, is process starts, imports, the data check, "
            "model logging, the evaluation report, the ONNX export and parity."
            if job.get("wall_time_s")
            else ""
        )
    )


def data_feeding_line(results: dict[str, Any]) -> str:
    feed = results["data_feeding"]
    return (
        f"Data feeding alone, per batch of 100: DataLoader + per-sample ToTensor "
        f"{feed['dataloader_ms_per_batch']:.2f} ms, tensor slicing {feed['tensor_slicing_ms_per_batch']:.3f} "
        f"ms ({feed['speedup']:,.0f}x), after a one-time decode of {feed['one_time_decode_s']:.2f} s."
    )


def accuracy_line(results: dict[str, Any]) -> str:
    accuracy = results["inference_accuracy"]
    return "Test accuracy of the benchmarked model: " + ", ".join(f"{k} {v:.2%}" for k, v in accuracy.items()) + "."


def tracking_line(results: dict[str, Any]) -> str:
    t = results["tracking"]
    return (
        f"MLflow: {t['seconds_per_step_off'] * 1000:.1f} ms/step off vs {t['seconds_per_step_on'] * 1000:.1f} "
        f"ms/step on, plus {t['model_logging_s']:.1f} s to log the model once: "
        f"{t['overhead_fraction_of_5_epochs']:.1%} of a 5-epoch training (extrapolated)."
    )


def photos_line(results: dict[str, Any]) -> str | None:
    photos = results.get("photos")
    if not photos:
        return None
    none, auto = photos["none"], photos["auto"]
    return (
        f"`pipeline predict` on {photos['images']:,} photo-like PNGs (about {photos['mean_pixels'] / 1e6:.2f} "
        f"Mpixel each): {none['images_per_s']:,.0f} images/s with `--preprocess none`, "
        f"{auto['images_per_s']:,.0f} images/s with `auto` (the conversion), {photos['auto_vs_none']:.0%} of it; "
        f"accuracy {none['accuracy']:.1%} without the conversion, {auto['accuracy']:.1%} with it."
    )


def memory_line(results: dict[str, Any]) -> str:
    memory = results["memory"]
    return "Peak memory (RSS): " + ", ".join(f"{k.removesuffix('_mib')} {v:,.0f} MiB" for k, v in memory.items()) + "."


# The report, top to bottom: tables, and a few sentences where a table would hold one row.
SECTIONS: tuple[Table | Callable[[dict[str, Any]], str | None], ...] = (
    machine_line,
    Table(
        None,
        (Column("target", "{target}"), Column("measured", measured), Column("result", "{status}")),
        lambda results: results["verdicts"],
    ),
    Table(
        "Training (images/s in training steps; evaluation timed apart):",
        (
            Column("model", "{model}"),
            Column("chapter's loop", "{chapter[train_images_per_s]:,.0f}"),
            Column("ours", "{ours[train_images_per_s]:,.0f}"),
            Column("ratio", "{train_throughput_ratio:.2f}x"),
            Column("ours GFLOP/s", "{ours_gflops:,.1f}"),
            Column("chapter 5 epochs (extrapolated)", "{chapter_5_epochs_s_extrapolated:,.0f} s"),
            Column("ours 5 epochs, train only (extrapolated)", "{ours_5_epochs_train_s_extrapolated:,.0f} s"),
        ),
        lambda results: ({"model": name, **row} for name, row in results["training"].items()),
    ),
    ceiling_line,
    full_job_line,
    Table(
        "The faster recipe against the chapter CNN's 5-epoch training (same run, tracking off; wall time "
        "includes each epoch's evaluation; steps/s and images/s are of the training steps alone, so batch "
        "size and epochs show apart):",
        (
            Column("model", "{model}"),
            Column("recipe", "{recipe}"),
            Column("epochs", "{epochs}"),
            Column("seeds", "{seeds}"),
            Column("steps/s", "{steps_per_s:.1f}"),
            Column("train images/s", "{train_images_per_s:,.0f}"),
            Column("test accuracy (mean ± sd)", lambda row: recipe_accuracy(row)),
            Column("training time", lambda row: recipe_time(row)),
        ),
        lambda results: (
            {
                "model": name,
                "seeds": results["recipe"]["seeds"] or "—",
                "measured": results["recipe"]["measured"],
                **row,
            }
            for name, row in results["recipe"].items()
            if isinstance(row, dict)
        ),
    ),
    Table(
        "Levers (CNN, ours):",
        (
            Column("lever", "{lever}"),
            Column("train images/s", "{train_images_per_s:,.0f}"),
            Column("train speed-up", "{train_speedup:.2f}x"),
            Column("evaluation speed-up", "{eval_speedup:.2f}x"),
        ),
        lambda results: results["levers"],
    ),
    compile_line,
    Table(
        "Inference, end to end from uint8 arrays (images/s, p50 / p99 batch latency in ms):",
        (
            Column("batch", "{batch}"),
            Column("runtime", "{runtime}"),
            Column("images/s", "{images_per_s:,.0f}"),
            Column("p50 ms", "{p50_ms:.2f}"),
            Column("p99 ms", "{p99_ms:.2f}"),
            Column("vs torch eager", "{vs_torch_eager:.2f}x"),
        ),
        lambda results: (
            {"batch": batch, "runtime": runtime, **stats}
            for batch, row in results["inference"].items()
            for runtime, stats in row.items()
        ),
    ),
    Table(
        "onnxruntime levers (batch 256, images/s):",
        (
            Column("variant", "{variant}"),
            Column("images/s", "{images_per_s:,.0f}"),
            Column("p50 ms", "{p50_ms:.2f}"),
            Column("vs first", "{vs_first:.2f}x"),
        ),
        lambda results: results["onnxruntime_levers"],
    ),
    photos_line,
    data_feeding_line,
    accuracy_line,
    tracking_line,
    memory_line,
)


def recipe_accuracy(row: dict[str, Any]) -> str:
    if row["test_accuracy_mean"] is None:
        return "not measured (--quick)"
    return f"{row['test_accuracy_mean']:.2%} ± {row['test_accuracy_sd']:.2%}"


def recipe_time(row: dict[str, Any]) -> str:
    if row["measured"]:
        return f"{row['wall_time_s_median']:,.0f} s (median)"
    return f"{row['wall_time_s_median']:,.0f} s (extrapolated from {row['train_images_per_s']:,.0f} images/s)"


def render_table(table: Table, results: dict[str, Any]) -> str:
    lines = [] if table.title is None else [table.title, ""]
    lines.append("| " + " | ".join(column.header for column in table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    for row in table.rows(results):
        lines.append("| " + " | ".join(column.render(row) for column in table.columns) + " |")
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    texts = (render_table(s, results) if isinstance(s, Table) else s(results) for s in SECTIONS)
    return "\n\n".join(text for text in texts if text is not None) + "\n"
