"""What every warm process (tests/warm.py) starts with: the forkserver imports this module once.

Besides torch and mlflow, what the stages import on the way: dynamo (the first optimizer's
add_param_group imports it), MLflow's SQL store, torch.export (logging a model as pt2),
torch.onnx (onnxscript's torchlib, onnx_ir, sympy, ...), matplotlib and captum (evaluate),
optuna's storage and importance (tune), GitPython (a run's source commit): a second or more each,
in every warm process that runs that stage. A module of its own, so that a test importing
tests.warm does not pay for all of it. Not pipeline.cli: `-m pipeline.cli` runs it as __main__,
which a module imported already would shadow (runpy warns about it).
"""

import gc

from pipeline.collector import collect_for_a_command

# As in a `pipeline` command: a collection every 10,000 new objects, not every 700, while importing.
collect_for_a_command()


def _preload() -> None:
    import captum.attr  # noqa: F401
    import git  # noqa: F401
    import mlflow  # noqa: F401
    import mlflow.pyfunc  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript.function_libs.torch_lib.ops  # noqa: F401
    import optuna.importance  # noqa: F401
    import optuna.storages._rdb.models  # noqa: F401
    import optuna.visualization  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401
    import torch._functorch.partitioners  # noqa: F401
    import torch.export._trace  # noqa: F401
    import torch.onnx._internal.exporter._core  # noqa: F401

    import pipeline.evaluate  # noqa: F401
    import pipeline.explain  # noqa: F401
    import pipeline.export  # noqa: F401
    import pipeline.figures  # noqa: F401
    import pipeline.jobs  # noqa: F401
    import pipeline.parity  # noqa: F401
    import pipeline.tracking  # noqa: F401
    import pipeline.train  # noqa: F401
    import pipeline.tune  # noqa: F401


_preload()
# Forked children do not walk these objects in their collections (a collection writes to every
# object it walks, which would also copy all of their pages into the child).
gc.freeze()
