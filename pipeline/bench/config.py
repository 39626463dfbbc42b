"""What one benchmark run measures, and the chapter's constants it is measured against."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import default_data_dir

CHAPTER_BATCH = 100
CHAPTER_EVAL_EVERY = 50  # listing 5-11 evaluates the whole test set every 50 iterations
EPOCH_STEPS = 600  # 60,000 images / batch 100
TEST_IMAGES = 10_000
QUICK_EVAL_IMAGES = 2_000


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
    # The recipe against the chapter CNN: full trainings of both, one pair per seed (full mode);
    # 0 = quick mode's extrapolation from a few steps of each (no accuracy).
    recipe_seeds: int = -1  # -1 = by mode: 3 in full mode, 0 with --quick
    # Seconds each inference throughput figure is timed for (at least 5 calls each); 0 = by mode:
    # 1 in quick mode, else 3 (2 for the onnxruntime levers). Each GEMM ceiling takes the same
    # budget, at most 1 s (its best call is the figure, so a longer wait adds little).
    timing_s: float = 0.0
    # Test images each training's evaluation (the chapter's and ours) is timed on, scaled to all
    # 10,000; 0 = by mode: all of them, or 2,000 with --quick (evaluating is most of a quick
    # measurement's 25-50 steps).
    eval_images: int = 0

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
        if self.recipe_seeds < 0:
            self.recipe_seeds = 0 if self.quick else 3
        if not self.eval_images:
            self.eval_images = QUICK_EVAL_IMAGES if self.quick else TEST_IMAGES
        if not 0 < self.eval_images <= TEST_IMAGES:
            raise ValueError(f"eval_images must be 1 to {TEST_IMAGES}")
        if self.timing_s < 0:
            raise ValueError("timing_s must not be negative")

    def timing_budget(self, full_mode_s: float) -> float:
        """Seconds one throughput figure is timed for: the chosen timing_s, else by mode."""
        return self.timing_s or (1.0 if self.quick else full_mode_s)


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
