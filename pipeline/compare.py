"""Compare evaluated runs side by side: is the CNN really better than the DNN, and where?

Input is a frame of runs (runs_frame, from tracking.search_runs's records), so any run with
`pipeline evaluate`'s per-class metrics can take part. The first run is the
baseline; each other run gets a per-class difference column with an approximate 95 %
noise margin, and a one-line verdict built from those numbers.

The margin is the unpaired binomial one, 1.96 * sqrt(p1 q1 / n1 + p2 q2 / n2). Both
models see the same test images, so their errors are correlated and a paired test would
be tighter: this margin errs on the side of calling a difference noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.config import CLASS_NAMES, slug
from pipeline.config import class_metric_name as class_metric
from pipeline.errors import PipelineError
from pipeline.files import atomic_write

if TYPE_CHECKING:
    from pipeline.tracking.records import RunRecord

KEY_PARAMS = ("epochs", "max_steps", "batch_size", "lr", "seed")
OVERALL_METRICS = ("test_accuracy", "test_loss", "test_macro_f1")
# How far to trust each model (pipeline evaluate's calibration and ranking): compared run against
# baseline too. Only top-2 accuracy is a proportion of test images and gets a binomial noise margin;
# ECE, NLL and ROC-AUC have no such closed form, so their differences are shown without one.
TRUST_METRICS = ("test_ece", "test_ece_calibrated", "test_nll", "test_macro_roc_auc", "test_top2_accuracy")
PROPORTION_METRICS = ("test_top2_accuracy",)
Z_95 = 1.96
COMPARE_CSV = "compare.csv"
COMPARE_PNG = "per_class_accuracy.png"


def runs_frame(records: Iterable[RunRecord]) -> pd.DataFrame:
    """One row per run: run_id, experiment_id, status, start_time, then a `params.<name>` column per
    param (text) and a `metrics.<name>` column per metric (latest value), as the store holds them."""
    rows = [
        {
            "run_id": r.run_id,
            "experiment_id": r.experiment_id,
            "status": r.status,
            "start_time": pd.Timestamp(r.start_time, unit="s", tz="UTC"),
            **{f"params.{k}": v for k, v in r.params.items()},
            **{f"metrics.{k}": float(v) for k, v in r.metrics.items()},
        }
        for r in records
    ]
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "experiment_id", "status", "start_time"])


def class_names_of(runs: pd.DataFrame) -> list[str]:
    """The runs' class names (train logs them as a JSON param), else Fashion-MNIST's."""
    column = runs.get("params.class_names")
    if column is not None:
        for value in column.dropna():
            try:
                names = json.loads(value)
            except (TypeError, ValueError):
                continue
            if isinstance(names, list) and names:
                return [str(name) for name in names]
    return list(CLASS_NAMES)


def _has_per_class(runs: pd.DataFrame, class_names: Sequence[str]) -> pd.Series:
    columns = [f"metrics.{class_metric(name)}" for name in class_names]
    if not set(columns) <= set(runs.columns):
        return pd.Series(False, index=runs.index)
    return runs[columns].notna().all(axis=1)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def select_runs(runs: pd.DataFrame, run_ids: Sequence[str] = ()) -> pd.DataFrame:
    """The given runs in the given order, or the latest FINISHED evaluated run of each model.

    Without run ids the baseline (first) is the model with fewer parameters, so the
    differences read "bigger model minus smaller model".
    """
    class_names = class_names_of(runs) if not runs.empty else list(CLASS_NAMES)
    evaluated = _has_per_class(runs, class_names) if not runs.empty else pd.Series(dtype=bool)
    if run_ids:
        run_ids = list(dict.fromkeys(run_ids))
        missing = [r for r in run_ids if r not in set(runs.get("run_id", []))]
        if missing:
            raise PipelineError(f"no run {', '.join(missing)} in the tracking store")
        lacking = [r for r in run_ids if not evaluated[runs["run_id"] == r].any()]
        if lacking:
            raise PipelineError(
                f"run {', '.join(lacking)} has no per-class metrics; run `pipeline evaluate --run-id "
                f"{lacking[0]}` first"
            )
        return runs.set_index("run_id").loc[run_ids].reset_index()
    if runs.empty:
        raise PipelineError("no runs to compare; train and evaluate some first")
    candidates = runs[(runs["status"] == "FINISHED") & evaluated].copy()
    if candidates.empty:
        raise PipelineError(
            "no FINISHED run with per-class metrics; run `pipeline evaluate --run-id ID` on a trained run first"
        )
    full = ~cut_short(candidates)
    if not full.any():
        raise PipelineError(
            "every evaluated run was cut short by --max-steps (a smoke run): train one in full, or name the runs "
            "to compare with --run-id"
        )
    candidates = candidates[full]
    if "params.model" not in candidates:
        candidates["params.model"] = "?"
    candidates["params.model"] = candidates["params.model"].fillna("?")
    latest = candidates.sort_values("start_time", ascending=False).drop_duplicates("params.model")
    latest = latest.assign(_size=latest.get("params.num_parameters", pd.Series(index=latest.index)).map(_num))
    return (
        latest.sort_values(["_size", "params.model"], na_position="last").drop(columns="_size").reset_index(drop=True)
    )


def cut_short(runs: pd.DataFrame) -> pd.Series:
    """Which runs stopped at --max-steps before their epochs were done (smoke runs): not the model's figures."""

    def column(name: str) -> pd.Series:
        return runs.get(name, pd.Series(index=runs.index, dtype=object)).map(_num)

    # epochs_completed counts the epochs a run started, so a limit at or past the last epoch's end is a full run.
    return (column("params.max_steps") > 0) & (column("metrics.epochs_completed") < column("params.epochs"))


def binomial_margin(p1: float, n1: float, p2: float, n2: float) -> float:
    """Approximate 95 % margin of p2 - p1 (see the module docstring); NaN without sample sizes."""
    if not (n1 > 0 and n2 > 0):
        return math.nan
    return Z_95 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


@dataclass
class Comparison:
    runs: pd.DataFrame  # the selected rows of search_runs, baseline first
    labels: list[str]  # a column name per run: the model name, plus the run id when models repeat
    class_names: list[str]
    accuracy: pd.DataFrame  # per-class accuracy: index class names, columns labels
    deltas: pd.DataFrame  # run minus baseline: index "overall" + class names, one column per other run
    margins: pd.DataFrame  # approximate 95 % margins of `deltas`, same shape
    table: pd.DataFrame  # the side-by-side table that is printed and written as CSV
    verdicts: list[str]  # one line per run compared with the baseline


def _label_runs(runs: pd.DataFrame) -> list[str]:
    models = [str(m) for m in runs.get("params.model", pd.Series(["?"] * len(runs))).fillna("?")]
    if len(set(models)) == len(models):
        return models
    return [f"{model} {run_id[:8]}" for model, run_id in zip(models, runs["run_id"], strict=True)]


def _count(items: list[str], total: int) -> str:
    return f"{len(items)} of {total} classes" if items else "none"


def _items(items: list[str], unit: str = "") -> str:
    return f" ({', '.join(items)}{unit})" if items else ""


def _verdict(base: str, other: str, c: Comparison, column: str, runs: pd.DataFrame) -> str:
    overall, margin = c.deltas.at["overall", column], c.margins.at["overall", column]
    acc_base, acc_other = (
        runs.iloc[0]["metrics.test_accuracy"],
        runs.loc[c.labels.index(other), "metrics.test_accuracy"],
    )

    def clear(delta: float, noise: float) -> int:
        noise = 0.0 if math.isnan(noise) else noise
        return 1 if delta > noise else -1 if delta < -noise else 0

    word = {1: "better than", -1: "worse than", 0: "not clearly different from"}[clear(overall, margin)]
    per_class = c.deltas.loc[c.class_names, column]
    per_margin = c.margins.loc[c.class_names, column]
    signs = pd.Series([clear(d, m) for d, m in zip(per_class, per_margin, strict=True)], index=c.class_names)
    ranked = per_class.sort_values(ascending=False)
    better = [f"{name} {100 * ranked[name]:+.1f}" for name in ranked.index if signs[name] == 1]
    worse = [f"{name} {100 * ranked[name]:+.1f}" for name in ranked.index[::-1] if signs[name] == -1]
    noise = [name for name in c.class_names if signs[name] == 0]
    noise_note = f", noise margin ±{100 * margin:.2f} pp" if not math.isnan(margin) else ""
    line = (
        f"{other} is {word} {base}: {acc_other:.2%} vs {acc_base:.2%} "
        f"({100 * overall:+.2f} pp{noise_note}). "
        f"Clearly better on {_count(better, len(c.class_names))}{_items(better, ' pp')}; "
        f"clearly worse on {_count(worse, len(c.class_names))}{_items(worse, ' pp')}; "
        f"within noise on {_count(noise, len(c.class_names))}{_items(noise)}."
    )
    row_base, row_other = runs.iloc[0], runs.loc[c.labels.index(other)]
    params = _num(row_other.get("params.num_parameters")) / _num(row_base.get("params.num_parameters"))
    seconds = _num(row_other.get("metrics.wall_time_s")) / _num(row_base.get("metrics.wall_time_s"))
    costs = []
    if not math.isnan(params):
        costs.append(f"{params:.1f}x the parameters")
    if not math.isnan(seconds):
        costs.append(f"{seconds:.1f}x the training time")
    if costs:
        line += f" Cost: {' and '.join(costs)}."
    return line


def compare(runs: pd.DataFrame, supports: Mapping[str, Mapping[str, float]] | None = None) -> Comparison:
    """Compare the selected runs (baseline first). `supports`: run id -> class name -> test images."""
    supports = supports or {}
    runs = runs.reset_index(drop=True)
    class_names = class_names_of(runs)
    labels = _label_runs(runs)
    accuracy = pd.DataFrame(
        {
            label: [float(row[f"metrics.{class_metric(name)}"]) for name in class_names]
            for label, (_, row) in zip(labels, runs.iterrows(), strict=True)
        },
        index=class_names,
    )
    overall = pd.Series([float(v) for v in runs["metrics.test_accuracy"]], index=labels)

    def sizes(i: int) -> tuple[float, dict[str, float]]:
        per_class = {name: _num(supports.get(runs.at[i, "run_id"], {}).get(name)) for name in class_names}
        total = _num(runs.at[i, "params.test_size"]) if "params.test_size" in runs else math.nan
        if math.isnan(total) and not any(math.isnan(v) for v in per_class.values()):
            total = sum(per_class.values())
        return total, per_class

    base = labels[0]
    base_total, base_classes = sizes(0)
    deltas, margins = {}, {}
    for i, label in enumerate(labels[1:], start=1):
        column = f"{label} - {base}"
        total, classes = sizes(i)
        deltas[column] = [overall[label] - overall[base]] + [
            accuracy.at[n, label] - accuracy.at[n, base] for n in class_names
        ]
        margins[column] = [binomial_margin(overall[base], base_total, overall[label], total)] + [
            binomial_margin(accuracy.at[n, base], base_classes[n], accuracy.at[n, label], classes[n])
            for n in class_names
        ]
    index = ["overall", *class_names]
    deltas_df = pd.DataFrame(deltas, index=index, dtype=float)
    margins_df = pd.DataFrame(margins, index=index, dtype=float)
    comparison = Comparison(
        runs=runs,
        labels=labels,
        class_names=class_names,
        accuracy=accuracy,
        deltas=deltas_df,
        margins=margins_df,
        table=pd.DataFrame(),
        verdicts=[],
    )
    comparison.table = side_by_side(comparison)
    comparison.verdicts = [_verdict(base, label, comparison, f"{label} - {base}", runs) for label in labels[1:]]
    return comparison


def overall_metrics(c: Comparison) -> dict[str, float]:
    """The headline numbers as metric names: accuracy_<run>, and delta_ / margin_<run>_minus_<baseline>.

    Margins that cannot be computed (no test-set sizes) are left out rather than logged as NaN.
    """
    metrics = {
        f"accuracy_{slug(label)}": float(accuracy)
        for label, accuracy in zip(c.labels, c.runs["metrics.test_accuracy"], strict=True)
    }
    for column in c.deltas.columns:
        name = slug(column.replace(" - ", "_minus_"))
        metrics[f"delta_{name}"] = float(c.deltas.at["overall", column])
        margin = float(c.margins.at["overall", column])
        if not math.isnan(margin):
            metrics[f"margin_{name}"] = margin
    return metrics


def side_by_side(c: Comparison) -> pd.DataFrame:
    """Rows: model, run, key params, cost, overall and per-class accuracy; columns: runs, then deltas."""
    rows: dict[str, list] = {}
    runs = c.runs
    rows["model"] = list(runs.get("params.model", pd.Series(["?"] * len(runs))))
    rows["run_id"] = list(runs["run_id"])
    rows["start_time"] = [str(t)[:19] for t in runs.get("start_time", pd.Series([""] * len(runs)))]
    for param in KEY_PARAMS:
        rows[param] = list(runs.get(f"params.{param}", pd.Series([None] * len(runs))))
    rows["num_parameters"] = [
        int(v) if not math.isnan(v) else None
        for v in map(_num, runs.get("params.num_parameters", pd.Series([None] * len(runs))))
    ]
    rows["wall_time_s"] = [_num(v) for v in runs.get("metrics.wall_time_s", pd.Series([None] * len(runs)))]
    for metric in OVERALL_METRICS + TRUST_METRICS:
        rows[metric] = [_num(v) for v in runs.get(f"metrics.{metric}", pd.Series([None] * len(runs)))]
    for name in c.class_names:
        rows[class_metric(name)] = list(c.accuracy.loc[name])
    table = pd.DataFrame.from_dict(rows, orient="index", columns=c.labels)
    table.index.name = "field"
    for column in c.deltas.columns:
        delta = pd.Series(np.nan, index=table.index, dtype=float)
        margin = pd.Series(np.nan, index=table.index, dtype=float)
        delta["test_accuracy"], margin["test_accuracy"] = (
            c.deltas.at["overall", column],
            c.margins.at["overall", column],
        )
        for name in c.class_names:
            delta[class_metric(name)], margin[class_metric(name)] = (
                c.deltas.at[name, column],
                c.margins.at[name, column],
            )
        other = c.labels[list(c.deltas.columns).index(column) + 1]
        base = c.labels[0]
        sizes = runs.get("params.test_size", pd.Series([None] * len(runs))).map(_num).tolist()
        for metric in TRUST_METRICS:
            delta[metric] = table.at[metric, other] - table.at[metric, base]
            if metric in PROPORTION_METRICS:
                i = c.labels.index(other)
                margin[metric] = binomial_margin(table.at[metric, base], sizes[0], table.at[metric, other], sizes[i])
        table[column] = delta
        table[f"±95% {column}"] = margin
    return table


def format_comparison(c: Comparison) -> str:
    """The side-by-side table for a terminal: percentages, per-class rows named by class."""
    names = {class_metric(name): name for name in c.class_names}
    percent_rows = {"test_accuracy", "test_macro_f1", "test_ece", "test_ece_calibrated", "test_top2_accuracy", *names}
    plain_rows = {"test_nll", "test_macro_roc_auc"}  # not proportions: differences in their own units
    headers = list(c.labels) + list(c.deltas.columns)
    cells: list[list[str]] = []
    for field in c.table.index:
        if field == "start_time":
            continue
        row = [names.get(field, field)]
        for label in c.labels:
            value = c.table.at[field, label]
            if field == "run_id":
                row.append(str(value)[:8])
            elif field in percent_rows:
                row.append("" if math.isnan(value) else f"{value:.2%}")
            elif field == "num_parameters":
                row.append(f"{value:,}" if value is not None else "")
            elif field == "wall_time_s":
                row.append(f"{value:.1f}")
            elif field == "test_loss" or field in plain_rows:
                row.append("" if math.isnan(value) else f"{value:.4f}")
            else:
                row.append("" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value))
        for column in c.deltas.columns:
            delta, margin = c.table.at[field, column], c.table.at[field, f"±95% {column}"]
            if math.isnan(delta):
                row.append("")
            elif field in plain_rows:
                row.append(f"{delta:+.4f}")
            else:
                noise = "" if math.isnan(margin) else f" ±{100 * margin:.1f}"
                row.append(f"{100 * delta:+.2f}{noise} pp")
        cells.append(row)
    first = max(len("field"), *(len(r[0]) for r in cells))
    widths = [max(len(h), *(len(r[i + 1]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join([f"{'':<{first}}", *(f"{h:>{w}}" for h, w in zip(headers, widths, strict=True))])]
    for row in cells:
        if row[0] == c.class_names[0]:
            lines.append("per-class accuracy:")
        lines.append("  ".join([f"{row[0]:<{first}}", *(f"{v:>{w}}" for v, w in zip(row[1:], widths, strict=True))]))
    if len(c.deltas.columns):
        lines.append("")
        lines.append("± is an approximate 95 % noise margin (unpaired binomial, so conservative).")
        lines.extend(c.verdicts)
    else:
        lines.append("")
        lines.append("Only one run: evaluate a run of another model to compare.")
    return "\n".join(lines)


def write_outputs(c: Comparison, folder: Path) -> list[Path]:
    """compare.csv and the grouped bar chart, each written atomically into `folder`."""
    from pipeline import figures

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / COMPARE_CSV
    with atomic_write(csv_path, "w", newline="") as handle:
        c.table.to_csv(handle)
    deltas = c.deltas.loc[c.class_names] if len(c.deltas.columns) else None
    margins = c.margins.loc[c.class_names] if len(c.margins.columns) else None
    if margins is not None and margins.isna().all().all():
        margins = None
    fig = figures.per_class_comparison_figure(c.accuracy, deltas, margins)
    return [csv_path, figures.save_figure(fig, folder / COMPARE_PNG)]
