"""`pipeline compare`: run selection, per-class differences with noise margins, and the outputs."""

from __future__ import annotations

import math
import shutil

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.compare import COMPARE_CSV, COMPARE_PNG, binomial_margin, compare, format_comparison, select_runs
from pipeline.config import CLASS_NAMES, slug
from pipeline.errors import PipelineError

# --------------------------------------------------------------------------- on a handmade search_runs frame


def fake_run(run_id, model, start, accuracies, status="FINISHED", num_parameters=1000, wall=10.0):
    row = {
        "run_id": run_id,
        "status": status,
        "start_time": pd.Timestamp(start, tz="UTC"),
        "params.model": model,
        "params.num_parameters": str(num_parameters),
        "params.epochs": "5",
        "params.batch_size": "100",
        "params.lr": "0.001",
        "params.seed": "0",
        "params.test_size": "10000",
        "metrics.wall_time_s": wall,
    }
    if accuracies is not None:
        row["metrics.test_accuracy"] = sum(accuracies) / len(accuracies)
        row.update({f"metrics.test_accuracy_{slug(n)}": a for n, a in zip(CLASS_NAMES, accuracies, strict=True)})
    else:
        row["metrics.test_accuracy"] = 0.5
    return row


DNN = [0.80, 0.95, 0.75, 0.85, 0.75, 0.94, 0.60, 0.95, 0.96, 0.95]
CNN = [0.86, 0.97, 0.85, 0.90, 0.86, 0.97, 0.70, 0.95, 0.98, 0.96]


@pytest.fixture
def runs():
    return pd.DataFrame(
        [
            fake_run("cnn_new_failed", "cnn", "2026-01-05", CNN, status="FAILED", num_parameters=9000),
            fake_run("dnn_new_unevaluated", "dnn", "2026-01-04", None, num_parameters=200),
            fake_run("cnn_ok", "cnn", "2026-01-03", CNN, num_parameters=9000, wall=100.0),
            fake_run("dnn_ok", "dnn", "2026-01-02", DNN, num_parameters=200, wall=10.0),
            fake_run("dnn_old", "dnn", "2026-01-01", DNN, num_parameters=200),
        ]
    )


def test_selects_latest_finished_evaluated_run_per_model_smallest_first(runs):
    assert select_runs(runs)["run_id"].tolist() == ["dnn_ok", "cnn_ok"]


def test_runs_cut_short_by_max_steps_are_left_out_unless_named(runs):
    smoke = {**fake_run("cnn_smoke", "cnn", "2026-01-06", CNN, num_parameters=9000)}
    smoke.update({"params.max_steps": "50", "metrics.epochs_completed": 1.0})
    within = {**fake_run("dnn_capped_past_the_end", "dnn", "2026-01-07", DNN, num_parameters=200)}
    within.update({"params.max_steps": "99999", "metrics.epochs_completed": 5.0})  # the limit never bit
    both = pd.concat([runs, pd.DataFrame([smoke, within])], ignore_index=True)
    assert select_runs(both)["run_id"].tolist() == ["dnn_capped_past_the_end", "cnn_ok"]
    assert select_runs(both, ["cnn_smoke"])["run_id"].tolist() == ["cnn_smoke"]
    with pytest.raises(PipelineError, match="cut short by --max-steps"):
        select_runs(pd.DataFrame([smoke]))


def test_explicit_run_ids_keep_their_order_and_must_be_evaluated(runs):
    assert select_runs(runs, ["cnn_ok", "dnn_old"])["run_id"].tolist() == ["cnn_ok", "dnn_old"]
    with pytest.raises(PipelineError, match="pipeline evaluate --run-id dnn_new_unevaluated"):
        select_runs(runs, ["dnn_ok", "dnn_new_unevaluated"])
    with pytest.raises(PipelineError, match="no FINISHED run with per-class metrics"):
        select_runs(runs[runs["run_id"] == "dnn_new_unevaluated"])


def test_deltas_margins_and_verdict(runs):
    c = compare(select_runs(runs), supports={"dnn_ok": dict.fromkeys(CLASS_NAMES, 1000)})
    column = "cnn - dnn"
    assert c.labels == ["dnn", "cnn"] and list(c.deltas.columns) == [column]
    for name, d, k in zip(CLASS_NAMES, DNN, CNN, strict=True):
        assert c.accuracy.at[name, "dnn"] == d and c.deltas.at[name, column] == pytest.approx(k - d)
    assert c.deltas.at["overall", column] == pytest.approx(sum(CNN) / 10 - sum(DNN) / 10)
    # Overall margin from params.test_size; per class only where both runs' supports are known.
    p1, p2 = sum(DNN) / 10, sum(CNN) / 10
    assert c.margins.at["overall", column] == pytest.approx(1.96 * math.sqrt(p1 * (1 - p1) / 1e4 + p2 * (1 - p2) / 1e4))
    assert math.isnan(c.margins.at["Shirt", column])  # cnn_ok's per-class supports are unknown

    c = compare(select_runs(runs), supports={r: dict.fromkeys(CLASS_NAMES, 1000) for r in ("dnn_ok", "cnn_ok")})
    assert c.margins.at["Shirt", column] == pytest.approx(binomial_margin(0.60, 1000, 0.70, 1000))
    verdict = c.verdicts[0]
    # +10 pp on Shirt is far outside a ~4 pp margin; Sneaker (0.0) and Trouser (+2, margin ~1.7) ...
    assert verdict.startswith("cnn is better than dnn: ")
    assert "Shirt +10.0" in verdict and "within noise on" in verdict and "Sneaker" in verdict.split("within noise")[1]
    assert "45.0x the parameters" in verdict and "10.0x the training time" in verdict

    table = c.table
    assert table.at["test_accuracy_shirt", "cnn"] == 0.70 and table.at["num_parameters", "dnn"] == 200
    assert table.at["test_accuracy_shirt", column] == pytest.approx(0.10)
    text = format_comparison(c)
    assert "Shirt" in text and "+10.00 ±" in text and "per-class accuracy:" in text


def test_binomial_margin_needs_sample_sizes():
    assert math.isnan(binomial_margin(0.5, 0, 0.5, 10))
    assert binomial_margin(0.5, 100, 0.5, 100) == pytest.approx(1.96 * math.sqrt(0.005))


# --------------------------------------------------------------------------- on real (tiny) runs


@pytest.fixture(scope="module")
def two_runs(synthetic_data_dir, tmp_path_factory, empty_store):
    """A dnn and a cnn trained a few steps on synthetic data and evaluated, in their own store."""
    folder = tmp_path_factory.mktemp("compare_mlruns")
    shutil.copyfile(empty_store, folder / "mlflow.db")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "tests"}
    env["MLFLOW_RUN_ID"] = None
    runner, run_ids = CliRunner(), {}
    for model in ("dnn", "cnn"):
        # One whole epoch (600 images in 12 steps of 50): full runs, which compare picks by default.
        args = ["--model", model, "--epochs", "1", "--max-steps", "12", "--batch-size", "50", "--allow-other-data"]
        args += ["--data-dir", str(synthetic_data_dir)]
        result = runner.invoke(cli, ["train", *args], env=env)
        assert result.exit_code == 0, result.output
        run_ids[model] = result.output.split("Run id:")[1].split()[0]
    # An un-evaluated run: compare must ignore it without --run-id, and refuse it with one.
    result = runner.invoke(
        cli,
        ["train", "--model", "dnn", "--max-steps", "2", "--allow-other-data", "--data-dir", str(synthetic_data_dir)],
        env=env,
    )
    assert result.exit_code == 0, result.output
    run_ids["unevaluated"] = result.output.split("Run id:")[1].split()[0]
    for model in ("dnn", "cnn"):
        result = runner.invoke(
            cli,
            ["evaluate", "--run-id", run_ids[model], "--no-explain", "--data-dir", str(synthetic_data_dir)],
            env=env,
        )
        assert result.exit_code == 0, result.output
    return {"env": env, "run_ids": run_ids}


@pytest.mark.slow
def test_compare_writes_csv_and_chart_that_match_the_runs(two_runs, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["compare", "--experiment", "tests", "--output-dir", str(out)], env=two_runs["env"]
    )
    assert result.exit_code == 0, result.output
    ids = two_runs["run_ids"]
    assert "cnn is" in result.output and " dnn: " in result.output and "Shirt" in result.output

    table = pd.read_csv(out / COMPARE_CSV, index_col="field")
    assert list(table.columns[:3]) == ["dnn", "cnn", "cnn - dnn"]
    assert table.at["run_id", "dnn"] == ids["dnn"] and table.at["run_id", "cnn"] == ids["cnn"]
    mlflow.set_tracking_uri(two_runs["env"]["MLFLOW_TRACKING_URI"])
    for model in ("dnn", "cnn"):
        run = mlflow.get_run(ids[model])
        assert float(table.at["test_accuracy", model]) == pytest.approx(run.data.metrics["test_accuracy"])
        assert float(table.at["wall_time_s", model]) == pytest.approx(run.data.metrics["wall_time_s"])
        assert int(table.at["num_parameters", model]) == int(run.data.params["num_parameters"])
        for name in CLASS_NAMES:
            key = f"test_accuracy_{slug(name)}"
            assert float(table.at[key, model]) == pytest.approx(run.data.metrics[key])
    shirt = "test_accuracy_shirt"
    delta = float(table.at[shirt, "cnn - dnn"])
    assert delta == pytest.approx(float(table.at[shirt, "cnn"]) - float(table.at[shirt, "dnn"]))
    # Supports came from each run's per_class.csv: 20 synthetic test images per class.
    p1, p2 = float(table.at[shirt, "dnn"]), float(table.at[shirt, "cnn"])
    assert float(table.at[shirt, "±95% cnn - dnn"]) == pytest.approx(binomial_margin(p1, 20, p2, 20))

    with Image.open(out / COMPARE_PNG) as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 600
    assert sorted(p.name for p in out.iterdir()) == [COMPARE_CSV, COMPARE_PNG]  # no temp files left


@pytest.mark.slow
def test_compare_explicit_runs_and_errors(two_runs, tmp_path):
    ids, env = two_runs["run_ids"], two_runs["env"]
    out = str(tmp_path / "out")
    result = CliRunner().invoke(
        cli, ["compare", "--run-id", ids["cnn"], "--run-id", ids["dnn"], "--output-dir", out], env=env
    )
    assert result.exit_code == 0, result.output
    assert "dnn - cnn" in result.output  # the first run given is the baseline

    for args, needle in (
        (["--run-id", ids["unevaluated"]], "pipeline evaluate --run-id"),
        (["--run-id", "0123456789abcdef0123456789abcdef"], "no run"),
        (["--experiment", "nope"], "no experiment 'nope'"),
    ):
        result = CliRunner().invoke(cli, ["compare", *args, "--output-dir", str(tmp_path / "bad")], env=env)
        assert result.exit_code != 0 and needle in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_compare_is_logged_to_mlflow_as_a_run_of_its_own(two_runs, tmp_path):
    ids, env = two_runs["run_ids"], two_runs["env"]
    result = CliRunner().invoke(cli, ["compare", "--output-dir", str(tmp_path / "out")], env=env)
    assert result.exit_code == 0, result.output
    compare_id = result.output.split("logged to MLflow as run ")[1].split()[0]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(compare_id)
    dnn, cnn = mlflow.get_run(ids["dnn"]), mlflow.get_run(ids["cnn"])
    assert run.info.experiment_id == dnn.info.experiment_id and run.info.run_name == "compare dnn vs cnn"
    assert run.data.tags["stages"] == "compare" and "cnn is " in run.data.tags["mlflow.note.content"]
    assert run.data.params == {"run_dnn": ids["dnn"], "run_cnn": ids["cnn"]}
    metrics = run.data.metrics
    assert metrics["accuracy_dnn"] == pytest.approx(dnn.data.metrics["test_accuracy"])
    assert metrics["delta_cnn_minus_dnn"] == pytest.approx(
        cnn.data.metrics["test_accuracy"] - dnn.data.metrics["test_accuracy"]
    )
    p_dnn, p_cnn = dnn.data.metrics["test_accuracy"], cnn.data.metrics["test_accuracy"]
    assert metrics["margin_cnn_minus_dnn"] == pytest.approx(binomial_margin(p_dnn, 200, p_cnn, 200))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(compare_id)}
    assert artifacts == {COMPARE_CSV, COMPARE_PNG, "compare_table.json"}
    table = mlflow.load_table("compare_table.json", run_ids=[compare_id])
    assert table.set_index("field").at["run_id", "cnn"] == ids["cnn"]

    # The comparison run is not a candidate for the next comparison.
    again = CliRunner().invoke(cli, ["compare", "--output-dir", str(tmp_path / "again")], env=env)
    assert again.exit_code == 0 and "cnn is " in again.output and "compare" not in again.output.split("\n")[0]
