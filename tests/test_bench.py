"""The benchmark still works: `pipeline bench --quick` on the real data (CI's smoke test).

It asserts that every measurement is there and sane, never a speed: timings on a shared
2-core machine are for the README's table, not for pass/fail.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.bench import TARGETS, BenchConfig, verdicts
from pipeline.cli import cli


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
            }
        )
    }
    assert list(rows.values()) == ["PASS", "MISS", "NOT MEASURED", "MISS", "PASS", "PASS"]
    assert len(rows) == len(TARGETS)


def test_too_few_steps_would_skip_the_chapters_evaluation():
    with pytest.raises(ValueError, match="at least 50"):
        BenchConfig(train_steps=20)


@pytest.mark.real_data
@pytest.mark.slow
def test_quick_bench_end_to_end(real_data_dir, tracking_store, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        cli, ["bench", "--quick", "--steps", "50", "--output-dir", str(out), "--data-dir", str(real_data_dir)]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().startswith("Machine:")
    for model in ("cnn", "dnn"):
        row = results["training"][model]
        assert row["chapter"]["steps"] == row["ours"]["steps"] == 50
        assert row["train_throughput_ratio"] > 0 and row["chapter_5_epochs_s_extrapolated"] > 0
    assert set(results["inference"]) == {"1", "256"}
    assert set(results["inference"]["256"]) == {"torch eager", "onnxruntime fp32", "onnxruntime int8"}
    accuracy = results["inference_accuracy"]
    assert accuracy["torch eager"] == accuracy["onnxruntime fp32"]  # the same model, exported faithfully
    assert results["memory"]["train_stage_mib"] > 100 and results["memory"]["predict_10k_mib"] > 10
    assert {row["status"] for row in results["verdicts"]} <= {"PASS", "MISS", "NOT MEASURED"}
    assert "| target | measured | result |" in result.output
