"""The benchmark still works: `pipeline bench --quick` on the real data (CI's smoke test).

It asserts that every measurement is there and sane, never a speed: timings on a shared
2-core machine are for the tables of docs/performance.md, not for pass/fail.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from pipeline import hardware
from pipeline.bench import BenchConfig
from pipeline.bench.inference import bench_onnxruntime_levers
from pipeline.bench.photos import PHOTO_COUNTS
from pipeline.bench.report import TARGETS, verdicts
from pipeline.cli import cli
from pipeline.config import CLASS_NAMES
from pipeline.errors import PipelineError
from pipeline.hardware import CpuFeatures
from pipeline.models import build_model
from pipeline.predict import Predictor

# Each target's direction and bound, written out here rather than read from bench: a bound or
# direction changed there must be changed here too, on purpose.
BOUNDS = {
    "cnn_train_ratio": ("higher", 2.5),
    "job_fraction": ("lower", 0.25),
    "ort_vs_eager_256": ("higher", 6.0),
    "int8_vs_fp32_256": ("higher", 1.3),
    "int8_drop_points": ("lower", 0.5),
    "tracking_overhead": ("lower", 0.03),
    "train_fraction_of_limit": ("higher", 0.40),
    "ort_fraction_of_limit": ("higher", 0.60),
    "recipe_accuracy_pct": ("higher", 93.0),
    "recipe_time_ratio": ("lower", 1.0),
    "photo_throughput_ratio": ("higher", 2 / 3),
}


def test_verdicts_compare_in_the_right_direction():
    rows = {
        r["target"]: r["status"]
        for r in verdicts(
            {
                "cnn_train_ratio": 3.0,
                "job_fraction": 0.3,
                "ort_vs_eager_256": None,
                "int8_vs_fp32_256": 1.0,
                "int8_drop_points": 0.2,
                "tracking_overhead": 0.01,
                "train_fraction_of_limit": 0.5,
                "ort_fraction_of_limit": 0.3,
                "recipe_accuracy_pct": 93.2,
                "recipe_time_ratio": 1.1,
                "photo_throughput_ratio": 0.7,
            }
        )
    }
    assert list(rows.values()) == [
        "PASS",
        "MISS",
        "NOT MEASURED",
        "MISS",
        "PASS",
        "PASS",
        "PASS",
        "MISS",
        "PASS",
        "MISS",
        "PASS",
    ]
    assert len(rows) == len(TARGETS)


def test_every_target_is_bounded_as_written_here():
    assert {key: bound for _, key, bound in TARGETS} == {key: bound for key, (_, bound) in BOUNDS.items()}


@pytest.mark.parametrize("key", list(BOUNDS))
def test_each_verdict_turns_at_its_bound(key):
    direction, bound = BOUNDS[key]
    position = [k for _, k, _ in TARGETS].index(key)

    def status(value):
        row = verdicts({key: value})[position]
        assert row["value"] == value
        return row["status"]

    below, above = status(bound * 0.9), status(bound * 1.1)
    assert status(bound) == "PASS"  # the bound itself meets the target
    assert (below, above) == (("MISS", "PASS") if direction == "higher" else ("PASS", "MISS"))
    assert status(None) == "NOT MEASURED"
    assert verdicts({})[position]["status"] == "NOT MEASURED"


def test_int8_speed_target_is_not_applicable_without_vnni():
    position = [k for _, k, _ in TARGETS].index("int8_vs_fp32_256")
    without = verdicts({"int8_vs_fp32_256": 0.84, "int8_applicable": False})[position]
    assert without["status"].startswith("N/A") and "VNNI" in without["status"]
    assert verdicts({"int8_vs_fp32_256": 0.84, "int8_applicable": True})[position]["status"] == "MISS"


AVX2_ONLY = CpuFeatures(model="AMD EPYC (AVX2 only)", avx2=True)
WITH_BF16 = CpuFeatures(model="AMD EPYC", avx2=True, avx512=True, avx512_bf16=True, avx512_vnni=True)


@pytest.mark.parametrize(
    ("features", "precision", "default_row", "emulated"),
    [
        (AVX2_ONLY, "fp32", "fp32 + channels_last (default here)", True),
        (WITH_BF16, "bf16", "bf16 autocast + channels_last (default here)", False),
    ],
)
def test_default_resolves_as_auto_does_on_that_cpu(monkeypatch, features, precision, default_row, emulated):
    import torch

    from pipeline.bench.training import default_levers, lever_variants
    from pipeline.train import resolve_precision

    monkeypatch.setattr(hardware, "cpu_features", lambda: features)
    assert resolve_precision("auto", torch.device("cpu")) == precision
    assert default_levers() == {"precision": precision, "channels_last": True}
    labels = {label: levers for label, levers, _ in lever_variants()}
    assert [label for label in labels if "(default here)" in label] == [default_row]
    # Every "default" row runs what auto runs here, and says so.
    for label, levers in labels.items():
        if label.startswith("default"):
            assert levers["precision"] == precision and f"default ({precision}" in label
    assert any("(emulated)" in label for label in labels) == emulated


@pytest.mark.parametrize("threads", [1, 2])
def test_a_lever_row_that_trains_as_an_earlier_one_times_only_its_evaluation(monkeypatch, threads):
    from types import SimpleNamespace

    from pipeline.bench import training

    trained, evaluated = [], []

    def our_training(data_dir, model_name, steps, **levers):
        trained.append((levers, torch.get_num_threads()))
        return SimpleNamespace(id=len(trained))

    def training_figures(result, data_dir, eval_images, eval_batch_size=None):
        evaluated.append((result.id, eval_batch_size))
        return {"train_images_per_s": 100.0 * result.id, "seconds_per_evaluation": 1.0}

    monkeypatch.setattr(training, "our_training", our_training)
    monkeypatch.setattr(training, "training_figures", training_figures)
    monkeypatch.setattr(training, "warm_up", lambda *args: None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = training.bench_levers(BenchConfig(quick=True))
    finally:
        torch.set_num_threads(before)
    variants = training.lever_variants()
    assert len(rows) == len(evaluated) == len(variants)  # every row has its own evaluation
    # The grid (4), then the 1-thread row (its own training only where 1 thread is not what runs
    # already); the two eval-batch rows evaluate the default's training.
    assert len(trained) == (4 if threads == 1 else 5)
    default = next(i for i, (label, _, _) in enumerate(variants) if "(default here)" in label)
    assert [result for result, _ in evaluated[-2:]] == [default + 1] * 2
    assert [batch for _, batch in evaluated[-2:]] == [100, 1000]


def test_cpu_features_are_read_from_cpuinfo_flags():
    text = "model name\t: Intel Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_bf16 amx_int8\n"
    features = hardware.parse_cpuinfo(text)
    assert features.model == "Intel Xeon" and features.native_bf16 and features.vnni
    assert not features.avx512_bf16 and "AMX-BF16" in features.summary()
    plain = hardware.parse_cpuinfo("model name : EPYC\nflags : fpu avx2 fma\n")
    assert not plain.native_bf16 and not plain.vnni
    assert plain.summary() == "AVX2; no native bf16, no VNNI, no AMX"


def test_flops_are_counted_from_the_layers():
    from pipeline.bench.flops import forward_flops

    # The DNN: 784->256->128->10 linear layers, 2 FLOPs per multiply-add.
    assert forward_flops(build_model("dnn")) == 2 * (784 * 256 + 256 * 128 + 128 * 10)
    # The CNN: conv1 32x28x28 outputs of 1x3x3, conv2 64x12x12 of 32x3x3, then 2304->600->120->10.
    conv = 2 * (32 * 28 * 28 * 9 + 64 * 12 * 12 * 32 * 9)
    assert forward_flops(build_model("cnn")) == conv + 2 * (2304 * 600 + 600 * 120 + 120 * 10)


@pytest.mark.slow
def test_onnxruntime_levers_time_the_real_predictor(synthetic_data_dir, tmp_path, monkeypatch):
    """Each variant is Predictor.predict_arrays over a session opened with the variant's options."""
    import onnxruntime as ort

    seen = set()
    original = Predictor.predict_arrays

    def recording(self, images, batch_size=256):
        options = self.session.get_session_options()
        seen.add((self.path.name, options.graph_optimization_level, options.intra_op_num_threads, batch_size))
        return original(self, images, batch_size)

    monkeypatch.setattr(Predictor, "predict_arrays", recording)
    cfg = BenchConfig(quick=True, data_dir=synthetic_data_dir, timing_s=0.1)  # what is timed, not how long
    rows = bench_onnxruntime_levers(cfg, build_model("cnn"), list(CLASS_NAMES), tmp_path, batch=16)
    level = ort.GraphOptimizationLevel
    assert seen == {
        ("plain.onnx", level.ORT_ENABLE_ALL, 0, 16),
        ("folded.onnx", level.ORT_ENABLE_ALL, 0, 16),
        ("folded.onnx", level.ORT_ENABLE_BASIC, 0, 16),
        ("folded.onnx", level.ORT_DISABLE_ALL, 0, 16),
        ("folded.onnx", level.ORT_ENABLE_ALL, 1, 16),
    }
    assert len(rows) == 5 and rows[0]["vs_first"] == 1.0 and all(row["images_per_s"] > 0 for row in rows)


def test_too_few_steps_would_skip_the_chapters_evaluation():
    with pytest.raises(ValueError, match="at least 50"):
        BenchConfig(train_steps=20)


def test_quick_mode_times_our_evaluation_on_a_fifth_of_the_test_set_unless_chosen():
    from pipeline.bench.config import BenchConfig

    assert BenchConfig(quick=True).eval_images == 2000 and BenchConfig().eval_images == 10000
    assert BenchConfig(quick=True, eval_images=10000).eval_images == 10000
    with pytest.raises(ValueError, match="eval_images"):
        BenchConfig(eval_images=10001)


def test_timing_budget_is_by_mode_unless_chosen():
    assert BenchConfig(quick=True).timing_budget(3.0) == 1.0
    assert BenchConfig().timing_budget(3.0) == 3.0 and BenchConfig().timing_budget(2.0) == 2.0
    assert BenchConfig(quick=True, timing_s=0.25).timing_budget(3.0) == 0.25
    with pytest.raises(ValueError, match="negative"):
        BenchConfig(timing_s=-1)


@pytest.mark.real_data
@pytest.mark.slow
def test_quick_bench_end_to_end(real_data_dir, tracking_store, tmp_path):
    out = tmp_path / "bench"
    # Each inference figure and GEMM ceiling timed for 0.2 s instead of quick mode's 1 s:
    # what is measured, not how well.
    args = ["bench", "--quick", "--steps", "50", "--timing-seconds", "0.2", "--output-dir", str(out)]
    page = tmp_path / "performance.md"
    page.write_text(PAGE)
    result = CliRunner().invoke(cli, [*args, "--docs", str(page), "--data-dir", str(real_data_dir)])
    assert result.exit_code == 0, result.output
    written = page.read_text()
    assert "old native tables" not in written and "old avx2 tables" in written and "quick mode.*" in written
    assert "| target | measured | result |" in written.split("<!-- bench:native:end -->")[0]
    results = json.loads((out / "bench.json").read_text())
    assert results["config"]["timing_s"] == 0.2 and results["config"]["eval_images"] == 2000
    assert "the chapter's and ours, is timed on 2,000 test images and scaled to 10,000" in result.output
    assert (out / "bench.md").read_text().startswith("Machine:")
    for model in ("cnn", "dnn"):
        row = results["training"][model]
        assert row["chapter"]["steps"] == row["ours"]["steps"] == 50
        assert row["train_throughput_ratio"] > 0 and row["chapter_5_epochs_s_extrapolated"] > 0
    assert set(results["inference"]) == {"1", "256"}
    assert set(results["inference"]["256"]) == {"torch eager", "onnxruntime fp32", "onnxruntime int8"}
    accuracy = results["inference_accuracy"]
    # The same model, exported faithfully; float32 kernels differ, so at most a couple of
    # near-ties may flip among 10,000 images (as in test_predict).
    assert abs(accuracy["torch eager"] - accuracy["onnxruntime fp32"]) <= 2e-4
    assert results["memory"]["train_stage_mib"] > 100 and results["memory"]["predict_10k_mib"] > 10
    assert len(results["onnxruntime_levers"]) == 5
    photos = results["photos"]
    assert photos["images"] == PHOTO_COUNTS["quick"]
    assert photos["none"]["images_per_s"] > 0 and photos["auto_vs_none"] > 0
    assert photos["auto"]["accuracy"] > photos["none"]["accuracy"] + 0.3  # the conversion is what makes photos work
    # Quick mode measures every target (the 5-epoch job and the recipe's time by extrapolation) but the
    # recipe's accuracy, which needs full trainings: each verdict has its headline value.
    assert [row["target"] for row in results["verdicts"]] == [label for label, _, _ in TARGETS]
    for row, (_, key, _) in zip(results["verdicts"], TARGETS, strict=True):
        assert row["value"] == results["headline"][key]
        assert row["value"] is not None or (key == "recipe_accuracy_pct" and row["status"].startswith("N/A"))
    recipe = results["recipe"]
    assert not recipe["measured"] and recipe["cnn_plus"]["train_images_per_s"] > 0 and recipe["time_ratio"] > 0
    assert "| cnn_plus | adamw lr" in result.output
    assert "| target | measured | result |" in result.output


def test_photo_bench_measures_predict_with_and_without_the_conversion(trained_onnx, trained_run):
    from pipeline.bench.config import BenchConfig
    from pipeline.bench.photos import bench_photos
    from pipeline.bench.report import photos_line

    results = bench_photos(BenchConfig(quick=True, data_dir=trained_run["data_dir"]), trained_onnx, count=24)
    assert results["images"] == 24 and results["mean_pixels"] > 200 * 200  # photos 8-16x a 28x28 image
    for mode in ("none", "auto"):
        assert results[mode]["images_per_s"] > 0 and 0 <= results[mode]["accuracy"] <= 1
    assert results["auto_vs_none"] == results["auto"]["images_per_s"] / results["none"]["images_per_s"]
    assert "24 photo-like PNGs" in photos_line({"photos": results})


def test_avx2_cap_masks_features_and_refuses_once_torch_is_loaded(monkeypatch):
    import sys

    monkeypatch.setenv(hardware.MAX_ISA_ENV, "avx2")
    hardware.cpu_features.cache_clear()
    try:
        capped = hardware.cpu_features()
        assert not (capped.avx512 or capped.native_bf16 or capped.vnni) and "limited to AVX2" in capped.model
    finally:
        monkeypatch.delenv(hardware.MAX_ISA_ENV)
        hardware.cpu_features.cache_clear()
    assert "torch" in sys.modules  # this test process has it loaded, so the cap can't apply any more
    with pytest.raises(PipelineError, match="before torch is loaded"):
        hardware.limit_to_avx2()


def test_export_says_when_int8_cannot_be_faster_on_this_cpu(monkeypatch):
    from types import SimpleNamespace

    from pipeline.jobs import ExportJob

    job = ExportJob("run", "cnn", [], None, None, int8_check=SimpleNamespace(passed=True))
    monkeypatch.setattr(hardware, "cpu_features", lambda: AVX2_ONLY)
    assert "no VNNI" in job.int8_note
    monkeypatch.setattr(hardware, "cpu_features", lambda: WITH_BF16)
    assert job.int8_note is None
    assert ExportJob("run", "cnn", [], None, None).int8_note is None  # no int8 model, nothing to say


def test_recipe_table_and_verdicts_from_full_trainings():
    from pipeline.bench.report import SECTIONS, Table, recipe_headline, render_table

    def runs(accuracies, seconds):
        return {
            "recipe": "r",
            "epochs": 5,
            "test_accuracy_mean": sum(accuracies) / len(accuracies),
            "test_accuracy_sd": 0.001,
            "wall_time_s_median": seconds,
            "steps_per_s": 60.0 / len(accuracies),
            "train_images_per_s": 6000.0,
        }

    results = {
        "recipe": {
            "measured": True,
            "seeds": 3,
            "cnn": runs([0.909, 0.911, 0.910], 80.0),
            "cnn_plus": runs([0.931, 0.929, 0.933], 76.0),
            "time_ratio": 0.95,
        }
    }
    headline = recipe_headline(results["recipe"])
    assert headline["recipe_accuracy_pct"] == pytest.approx(93.1)
    statuses = {row["target"]: row["status"] for row in verdicts(headline)}
    assert statuses["cnn_plus test accuracy >= 93.0 % (mean of seeds)"] == "PASS"
    assert statuses["cnn_plus training time <= the chapter CNN's 5 epochs"] == "PASS"
    table = next(s for s in SECTIONS if isinstance(s, Table) and s.title and "faster recipe" in s.title)
    rendered = render_table(table, results)
    assert "| cnn_plus | r | 5 | 3 | 20.0 | 6,000 | 93.10% ± 0.10% | 76 s (median) |" in rendered
    assert "| cnn | r | 5 | 3 | 20.0 | 6,000 | 91.00% ± 0.10% | 80 s (median) |" in rendered


def test_fp32_limit_is_the_better_library_unless_torch_is_capped(monkeypatch):
    from pipeline.bench import machine

    monkeypatch.setattr(machine, "gemm_gflops", lambda dtype, seconds: 100.0 if dtype == torch.float32 else 400.0)
    monkeypatch.setattr(machine, "ort_gemm_gflops", lambda seconds: 180.0)
    monkeypatch.setattr(hardware, "cpu_features", lambda: WITH_BF16)
    monkeypatch.delenv(hardware.MAX_ISA_ENV, raising=False)
    limits = machine.gemm_limits()
    assert (limits["fp32_gemm_gflops"], limits["fp32_torch_mm_gflops"], limits["bf16_gemm_gflops"]) == (180, 100, 400)
    monkeypatch.setenv(hardware.MAX_ISA_ENV, "avx2")  # onnxruntime is not capped: torch's own figure is the limit
    monkeypatch.setattr(hardware, "cpu_features", lambda: AVX2_ONLY)
    limits = machine.gemm_limits()
    assert limits["fp32_gemm_gflops"] == 100 and limits["bf16_gemm_gflops"] is None


def test_onnxruntime_gemm_ceiling_is_measured():
    from pipeline.bench.flops import ort_gemm_gflops

    assert ort_gemm_gflops(size=256, seconds=0.05) > 0.1


def test_the_report_says_what_the_training_target_asks_of_the_machine_and_whether_compile_won():
    from pipeline.bench.report import ceiling_line, compile_line, limit_fractions

    flops = 3 * 8e6  # training FLOPs per image
    results = {
        "config": {"rounds": 3},
        "limits": {"fp32_gemm_gflops": 100.0, "bf16_gemm_gflops": None},
        "inference": {},
        "training": {
            "cnn": {
                "levers": {"precision": "fp32"},
                "chapter": {"train_images_per_s": 1000.0},
                "ours_gflops": 2000 * flops / 1e9,
                "training_flops_per_image": flops,
            }
        },
    }
    headline = limit_fractions(results)
    # 2.5 x 1,000 images/s x 24 MFLOP = 60 GFLOP/s: 60 % of a 100 GFLOP/s limit; at the limit, 100/24 = 4.2x.
    assert headline["train_target_fraction_of_limit"] == pytest.approx(0.60)
    assert headline["train_ratio_at_limit"] == pytest.approx(100e9 / flops / 1000)
    assert headline["train_fraction_of_limit"] == pytest.approx(0.48)
    line = ceiling_line({**results, "headline": headline})
    assert "2,500 images/s, 60% of the fp32 GEMM limit (ours runs at 48%)" in line and "4.2x" in line

    assert compile_line(results) is None  # quick mode does not measure it
    timed = {
        "levers": "fp32 + channels_last",
        "eager_seconds_per_step": 0.030,
        "compiled_seconds_per_step": 0.035,
        "step_speedup": 30 / 35,
        "compile_s_cold_cache": 13.0,
        "compile_s_warm_cache": 1.2,
        "eager_5_epochs_train_s": 90.0,
        "compiled_5_epochs_train_s": 106.2,
        "adopted": False,
    }
    line = compile_line({**results, "compile": timed})
    assert "35.0 ms/step against eager's 30.0 (0.86x)" in line and line.endswith("not adopted (`--compile` stays off).")


def test_the_job_line_splits_training_from_everything_else():
    from pipeline.bench.report import full_job_line

    job = {"seconds": 60.0, "test_accuracy": 0.909, "onnx_test_accuracy": 0.909, "wall_time_s": 45.0}
    line = full_job_line({"full_job": job, "headline": {"job_fraction": 0.3, "chapter_5_epochs_s": 200.0}})
    assert "took 45 s of it (0.23 of the chapter's loop); the rest, 15 s," in line
    assert full_job_line({"headline": {}}) is None  # quick mode runs no job


# ------------------------------------------------------------- the tables in docs/performance.md

PAGE = (
    "# Performance\r\n\r\nProse a person wrote, kept as it is.\r\n\r\n"
    "<!-- bench:native:start -->\r\nold native tables\r\n<!-- bench:native:end -->\r\n\r\n"
    "More prose, with a table of its own:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
    "<!-- bench:avx2:start -->\nold avx2 tables\n<!-- bench:avx2:end -->\nThe end, no newline"
)


def test_bench_tables_replace_their_block_and_nothing_else(tmp_path):
    from pipeline.bench import docs

    page = tmp_path / "performance.md"
    page.write_bytes(PAGE.encode())
    docs.write_block(page, docs.block_name("native"), "| new | table |\n|---|---|\n| 1 | 2 |\n")
    text = page.read_bytes().decode()
    start, end = text.index("<!-- bench:native:start -->"), text.index("<!-- bench:native:end -->")
    # Every byte outside the block is the old page's, the line endings included.
    assert text[:start] == PAGE[: PAGE.index("<!-- bench:native:start -->")]
    assert text[end:] == PAGE[PAGE.index("<!-- bench:native:end -->") :]
    assert "old native" not in text and "old avx2 tables" in text
    assert text[start:end].endswith("\r\n\r\n| new | table |\r\n|---|---|\r\n| 1 | 2 |\r\n\r\n")
    # Written again, the page does not drift; the other block is written on its own.
    once = page.read_bytes()
    docs.write_block(page, "native", "| new | table |\n|---|---|\n| 1 | 2 |\n")
    assert page.read_bytes() == once
    docs.write_block(page, docs.block_name("avx2"), "capped tables")
    assert "capped tables" in page.read_text() and "| new | table |" in page.read_text()


def test_a_marker_quoted_in_prose_is_not_a_marker(tmp_path):
    from pipeline.bench import docs

    page = tmp_path / "performance.md"
    prose = "Each run owns the lines between `<!-- bench:native:start -->` and `<!-- bench:native:end -->`.\n\n"
    page.write_text(prose + "<!-- bench:native:start -->\n<!-- bench:native:end -->\n")
    docs.write_block(page, "native", "tables")
    assert page.read_text() == prose + "<!-- bench:native:start -->\n\ntables\n\n<!-- bench:native:end -->\n"


@pytest.mark.parametrize(
    "text",
    [
        "# Performance\n\nno markers at all\n",
        "only quoted: `<!-- bench:native:start -->` and `<!-- bench:native:end -->`\n",
        "<!-- bench:native:start -->\nonly the start\n",
        "<!-- bench:native:end -->\nbackwards\n<!-- bench:native:start -->\n",
        "<!-- bench:native:start -->\n<!-- bench:native:end -->\n<!-- bench:native:start -->\n",
    ],
)
def test_a_page_without_one_pair_of_markers_is_refused_in_one_line(tmp_path, text):
    from pipeline.bench import docs

    page = tmp_path / "performance.md"
    page.write_text(text)
    with pytest.raises(PipelineError) as refused:
        docs.write_block(page, "native", "tables")
    assert "\n" not in str(refused.value) and str(page) in str(refused.value)
    assert page.read_text() == text
    with pytest.raises(PipelineError, match="no page"):
        docs.check_page(tmp_path / "missing.md", "native")


def test_bench_tables_are_written_atomically(tmp_path, monkeypatch):
    import os

    from pipeline import files
    from pipeline.bench import docs

    page = tmp_path / "performance.md"
    page.write_bytes(PAGE.encode())

    def crash(*args):
        raise KeyboardInterrupt  # Ctrl-C between writing the new page and renaming it onto the old

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        docs.write_block(page, "native", "new tables")
    assert page.read_bytes() == PAGE.encode()
    assert os.listdir(tmp_path) == ["performance.md"]  # no temporary file left beside it


def test_the_bench_block_says_when_and_on_which_cpu(monkeypatch):
    from pipeline.bench import docs

    monkeypatch.setattr(docs, "render_markdown", lambda results: "| target | measured | result |\n")
    results = {
        "date": "2026-11-30",
        "machine": {"cpu": "AMD EPYC 9R14", "cores": 2, "cpu_features": {"summary": WITH_BF16.summary()}},
        "config": {"quick": False},
    }
    block = docs.render_block(results)
    assert block.startswith("*Generated by `pipeline bench` on 2026-11-30: AMD EPYC 9R14, 2 cores; CPU features: AVX2")
    assert "AVX512-BF16" in block.splitlines()[0] and "full mode" in block.splitlines()[0]
    assert block.endswith("| target | measured | result |\n")


def test_bench_refuses_a_docs_page_without_markers_before_measuring(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text("# Performance\n")
    result = CliRunner().invoke(cli, ["bench", "--quick", "--docs", str(page), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "bench:native:start" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
