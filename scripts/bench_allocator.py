"""glibc's malloc as it comes against the pipeline's setting (pipeline/allocator.py), side by side.

    .venv/bin/python scripts/bench_allocator.py [--pairs 3] [--steps 150]

Each measurement is a fresh process (the setting cannot be undone inside one) that trains our CNN
for --steps steps on the real data with its test evaluation, tracking off, twice: the first
training is what `pipeline train` runs, the second shows what is left once glibc has raised its
own thresholds. The two kinds alternate, --pairs times, so a slow spell of a shared machine hits
both; the medians and their ratios are printed as a Markdown table, with the date and the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import date

# Run in a fresh interpreter: CPU and wall seconds of its first training (what `pipeline train` runs)
# and of a second one in the same process (once glibc has adapted its thresholds to what it saw).
PROBE = """
import json, os, sys
from pipeline.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
from pipeline.config import TrainConfig, default_data_dir
from pipeline.train import train
config = TrainConfig(model="cnn", epochs=1, max_steps=int(sys.argv[2]), data_dir=default_data_dir())
times = {}
for which in ("first", "second"):
    before = os.times()
    train(config, [])
    after = os.times()
    times[which] = {"user_s": after.user - before.user, "kernel_s": after.system - before.system,
                    "wall_s": after.elapsed - before.elapsed}
print(json.dumps(times))
"""
KINDS = {"kept": "freed memory kept (the pipeline's setting)", "default": "glibc's defaults"}


def measure(kind: str, steps: int) -> dict[str, dict[str, float]]:
    done = subprocess.run([sys.executable, "-c", PROBE, kind, str(steps)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {kind} probe failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, dict[str, float]]]] = {kind: [] for kind in KINDS}
    for _ in range(args.pairs):
        for kind in KINDS:
            runs[kind].append(measure(kind, args.steps))
    from pipeline import hardware

    cpu = hardware.cpu_features()
    print(
        f"{date.today().isoformat()}, {cpu.model} ({cpu.to_dict()['summary']}): our CNN, {args.steps} steps of "
        f"batch 100 and a test evaluation, medians of {args.pairs} fresh processes each, alternating.\n"
    )
    print("| training | malloc | wall s | user CPU s | kernel CPU s |\n|---|---|---|---|---|")
    ratios = {}
    for which in ("first", "second"):
        medians = {
            kind: {key: statistics.median(r[which][key] for r in rows) for key in rows[0][which]}
            for kind, rows in runs.items()
        }
        for kind, label in KINDS.items():
            m = medians[kind]
            print(f"| {which} in its process | {label} | {m['wall_s']:.2f} | {m['user_s']:.2f} | {m['kernel_s']:.2f} |")
        ratios[which] = medians["kept"]["wall_s"] / medians["default"]["wall_s"]
    print(
        f"\nWall time with the setting: {ratios['first']:.2f}x glibc's defaults' for a process's first training "
        f"(`pipeline train`), {ratios['second']:.2f}x for a second one in the same process."
    )


if __name__ == "__main__":
    main()
