"""The project's own small types for what the tracking store holds: no MLflow object leaves the package."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.tracking.names import tag


@dataclass(frozen=True)
class RunRecord:
    """One run as the store holds it: its id, where and when, its status, params, metrics and tags."""

    run_id: str
    experiment_id: str
    name: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED, SCHEDULED
    start_time: float  # unix seconds
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)  # the latest value of each
    tags: Mapping[str, str] = field(default_factory=dict)

    def tag(self, name: str) -> str | None:
        """A tag by its current name, else by the name older versions of the pipeline gave it."""
        return tag(self.tags, name)


def record_of(run: Any) -> RunRecord:
    """An mlflow Run as a RunRecord."""
    return RunRecord(
        run_id=run.info.run_id,
        experiment_id=str(run.info.experiment_id),
        name=run.info.run_name or "",
        status=run.info.status,
        start_time=(run.info.start_time or 0) / 1000,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
    )


@dataclass(frozen=True)
class ActiveRun:
    """The run a `with tracking.run(...)` block logs into."""

    run_id: str
    experiment_id: str
