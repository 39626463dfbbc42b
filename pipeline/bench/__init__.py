"""`pipeline bench`: our stages against the chapter's own loop, side by side, in one run.

Every figure is a ratio of two measurements taken in the same process, minutes apart,
because absolute times on a shared 2-core machine mean little. Returns plain dicts;
the CLI writes JSON + Markdown and logs them to MLflow.

  config     BenchConfig and the chapter's constants
  training   the chapter's loop vs our train stage, training levers, data feeding, MLflow's cost
  inference  torch eager vs the Predictor on fp32 / int8 exports, onnxruntime levers
  machine    the machine, peak memory of our commands
  timing     repeated calls timed, medians of rounds
  report     headline, verdicts, the table-driven Markdown report, the JSON file
  job        run_benchmarks (the whole benchmark), the real 5-epoch job timed end to end
  docs       the report's tables written between their markers in docs/performance.md (--docs)
"""

from pipeline.bench.config import BenchConfig, config_dict
from pipeline.bench.job import run_benchmarks
from pipeline.bench.report import render_markdown, save_json

__all__ = ["BenchConfig", "config_dict", "render_markdown", "run_benchmarks", "save_json"]
