"""CPython's garbage collection as it comes against the pipeline's (pipeline/collector.py), side by side.

    .venv/bin/python scripts/bench_collector.py [--pairs 3] [--steps 100]

Each measurement is a whole `pipeline train --model cnn --max-steps STEPS` process on the real
data, logging to a temporary store made once beforehand (so no measurement pays for creating it):
start-up, training, test evaluation, model logging and exit, timed from outside. The baseline runs
the same command with `collect_for_a_command` left out. The two kinds alternate, --pairs times, so
a slow spell of a shared machine hits both; the medians and their ratios are printed as a Markdown
table, with the date and the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

# `pipeline train ...` as the console script runs it, with or without the collector's settings.
PROBE = """
import sys
from pipeline import cli, collector
if sys.argv.pop(1) == "default":
    collector.collect_for_a_command = lambda: None  # CPython's own thresholds and final collection
sys.argv[0] = "pipeline"
cli.main()
"""
KINDS = {"collector": "the pipeline's (pipeline.collector)", "default": "CPython's defaults"}


def measure(kind: str, steps: int, env: dict[str, str]) -> dict[str, float]:
    command = [sys.executable, "-c", PROBE, kind, "train", "--model", "cnn", "--max-steps", str(steps)]
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time and peak memory
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    if process.returncode != 0:
        raise SystemExit(f"the {kind} probe failed:\n{output[-2000:]}")
    # "Trained cnn for 100 steps in 1.9 s (5,160 images/s): ..."
    images_per_s = float(output.split(" images/s)")[0].rsplit("(", 1)[1].replace(",", ""))
    return {
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "kernel_s": usage.ru_stime,
        "train_images_per_s": images_per_s,
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        code = "from pipeline import tracking; tracking.connect()"  # the store, made once
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        for _ in range(args.pairs):
            for kind in KINDS:
                runs[kind].append(measure(kind, args.steps, env))
    from pipeline import hardware

    cpu = hardware.cpu_features()
    print(
        f"{date.today().isoformat()}, {cpu.model} ({cpu.summary()}): `pipeline train --model cnn "
        f"--max-steps {args.steps}` (start-up, training, test evaluation, model logging, exit), medians of "
        f"{args.pairs} fresh processes each, alternating.\n"
    )
    print(
        "| garbage collection | wall s | user CPU s | kernel CPU s | training images/s | peak memory MiB |\n"
        "|---|---|---|---|---|---|"
    )
    medians = {kind: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for kind, rows in runs.items()}
    for kind, label in KINDS.items():
        m = medians[kind]
        print(
            f"| {label} | {m['wall_s']:.2f} | {m['user_s']:.2f} | {m['kernel_s']:.2f} | "
            f"{m['train_images_per_s']:,.0f} | {m['peak_rss_mib']:,.0f} |"
        )
    saved = medians["default"]["wall_s"] - medians["collector"]["wall_s"]
    ratio = medians["collector"]["wall_s"] / medians["default"]["wall_s"]
    print(f"\nWall time with the pipeline's collection: {ratio:.2f}x CPython's defaults', {saved:.1f} s less.")


if __name__ == "__main__":
    main()
