"""The recipe's epochs on a CPU without native bf16: the chapter CNN's 5 epochs, then cnn_plus's
recipe with 6 epochs and with 7, each trained once on all 60,000 images and judged on the test set,
in one process, as `make bench-avx2` trains them (tracking off).

    .venv/bin/python scripts/recipe_epochs.py [--seed 0] [--max-cpu-isa avx2|native]

--max-cpu-isa avx2 (the default) caps torch at AVX2 first, so a CPU with AVX-512 or AMX shows
what an AVX2-only one would measure. About 6 minutes on a 2-core machine. Prints a Markdown table
with the date and the CPU.
"""

from __future__ import annotations

import argparse
import os
from datetime import date

from pipeline import hardware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-cpu-isa", choices=("avx2", "native"), default="avx2")
    args = parser.parse_args()
    if args.max_cpu_isa == "avx2":
        hardware.limit_to_avx2()  # before torch is imported
    from pipeline.allocator import keep_freed_memory
    from pipeline.collector import collect_for_a_command
    from pipeline.config import default_data_dir, train_config
    from pipeline.train import train

    keep_freed_memory()  # as the CLI does
    collect_for_a_command()  # as the CLI does
    trainings = [("the chapter CNN", "cnn", 5), ("cnn_plus", "cnn_plus", 6), ("cnn_plus", "cnn_plus", 7)]
    rows, chapter_s = [], None
    for label, model, epochs in trainings:
        result = train(train_config(model, seed=args.seed, epochs=epochs, data_dir=default_data_dir()))
        m = result.metrics
        chapter_s = chapter_s or m["wall_time_s"]
        rows.append(
            f"| {label}, {epochs} epochs | {result.params['precision']} | {m['test_accuracy']:.2%} "
            f"| {m['wall_time_s']:.0f} s | {m['wall_time_s'] / chapter_s:.2f} | {m['train_images_per_s']:,.0f} |"
        )
    cpu = hardware.cpu_features()
    print(f"{date.today()}, seed {args.seed}, {cpu.model} ({cpu.summary()}), {os.cpu_count()} cores:\n")
    print("| training | precision | test accuracy | time | of the chapter CNN's | training images/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
