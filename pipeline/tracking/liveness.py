"""Which runs are alive: stale RUNNING runs (a process that died without cleaning up), listing runs,
and which runs can be resumed."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import mlflow

from pipeline import processes
from pipeline.config import STALE_AFTER_S
from pipeline.errors import PipelineError
from pipeline.tracking.names import CHECKPOINT_STEP_TAG, HEARTBEAT_TAG, HOSTNAME_TAG, PID_TAG
from pipeline.tracking.records import RunRecord, record_of
from pipeline.tracking.runs import get_run
from pipeline.tracking.store import connect, tracking_uri


def _heartbeat(found: RunRecord) -> float:
    """When the run last showed signs of life (unix seconds): its heartbeat, else its start."""
    try:
        return float(found.tag(HEARTBEAT_TAG) or "")
    except ValueError:
        return found.start_time


def staleness(found: RunRecord, stale_after: float = STALE_AFTER_S, now: float | None = None) -> str | None:
    """Why a RUNNING run is stale (its process is gone, or its heartbeat is too old); None if it looks alive."""
    if found.status != "RUNNING":
        return None
    pid = found.tag(PID_TAG) or ""
    if found.tag(HOSTNAME_TAG) == socket.gethostname() and pid.isdigit() and not processes.alive(int(pid)):
        return f"its process {pid} on this host is gone"
    age = (now or time.time()) - _heartbeat(found)
    if age > stale_after:
        return (
            f"no heartbeat for {age:,.0f} s" if found.tag(HEARTBEAT_TAG) else f"started {age:,.0f} s ago, no heartbeat"
        )
    return None


def describe_liveness(found: RunRecord) -> str:
    pid, host = found.tag(PID_TAG), found.tag(HOSTNAME_TAG)
    where = f"pid {pid} on {host}, " if pid and host else ""
    return f"{where}last heartbeat {time.time() - _heartbeat(found):,.0f} s ago"


@dataclass
class RunRow:
    """One run as `pipeline runs` lists it."""

    run_id: str
    experiment: str
    name: str
    status: str
    start_time: float  # unix seconds
    checkpoint_step: int | None
    liveness: str  # for RUNNING runs: pid, host and heartbeat age
    stale: str | None  # why a RUNNING run is stale


def list_runs(
    experiment: str | None = None, running_only: bool = False, stale_after: float = STALE_AFTER_S, write: bool = False
) -> list[RunRow]:
    """Runs of `experiment` (default: every experiment in the store), newest first. Listing only reads, so a
    read-only store serves it; `write`: the caller will change runs (mark them failed), so check it can."""
    connect(write=write)
    client = mlflow.MlflowClient()
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise PipelineError(f"no experiment {experiment!r} in the tracking store {tracking_uri()}")
        experiments = [found]
    else:
        experiments = client.search_experiments()
    names = {e.experiment_id: e.name for e in experiments}
    if not names:
        return []
    runs = client.search_runs(
        list(names),
        filter_string="attributes.status = 'RUNNING'" if running_only else "",
        order_by=["attributes.start_time DESC"],
        max_results=10_000,
    )
    now = time.time()
    rows = []
    for record in map(record_of, runs):
        step = record.tag(CHECKPOINT_STEP_TAG)
        rows.append(
            RunRow(
                run_id=record.run_id,
                experiment=names[record.experiment_id],
                name=record.name,
                status=record.status,
                start_time=record.start_time,
                checkpoint_step=int(step) if step is not None else None,
                liveness=describe_liveness(record) if record.status == "RUNNING" else "",
                stale=staleness(record, stale_after, now),
            )
        )
    return rows


def resumable_run(run_id: str) -> RunRecord:
    """A KILLED, FAILED or stale RUNNING run with a training checkpoint; else a PipelineError that says why."""
    connect()
    found = get_run(run_id)
    status = found.status
    if status == "FINISHED":
        raise PipelineError(f"run {run_id} is FINISHED: there is nothing to resume")
    if status == "RUNNING":
        why = staleness(found)
        if why is None:
            raise PipelineError(
                f"run {run_id} is still RUNNING ({describe_liveness(found)}); stop it first, "
                "or resume it once `pipeline runs --stale` lists it"
            )
    elif status not in ("KILLED", "FAILED"):
        raise PipelineError(f"run {run_id} is {status}; only KILLED, FAILED or stale RUNNING runs can be resumed")
    if found.tag(CHECKPOINT_STEP_TAG) is None:
        raise PipelineError(
            f"run {run_id} has no training checkpoint to resume from (it stopped before its first "
            "checkpoint, or was not made by `pipeline train`); train it again"
        )
    return found
