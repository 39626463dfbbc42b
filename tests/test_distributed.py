"""Data-parallel training: shards, the torchrun command line, and real 2-process gloo runs on CPU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import cli_args, tracking
from pipeline.cli import cli
from pipeline.config import TrainConfig, train_config
from pipeline.distributed import World, global_batch_size, shard, torchrun_command, train_flags
from pipeline.errors import PipelineError
from pipeline.train import shuffled_batches
from tests.warm import WarmPopen

REPO = Path(__file__).resolve().parent.parent


def test_a_rank_other_than_0_trains_without_loading_mlflow(monkeypatch):
    import pipeline
    from pipeline import jobs, train

    # Rank 1 of 2, with the training itself stubbed out, in a process where the tracking package
    # (the only way to MLflow: the stages never import it) cannot be imported.
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(train, "setup", lambda config: config)
    monkeypatch.setattr(train, "fit", lambda t: None)
    monkeypatch.delattr(pipeline, "tracking")
    monkeypatch.setitem(sys.modules, "pipeline.tracking", None)  # importing it now raises ImportError
    assert jobs.train_model(TrainConfig()) is None


def test_the_global_batch_is_split_and_the_ranks_cover_it_exactly_once():
    batch = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    for size in (1, 2, 3, 7):
        shards = [shard(batch, World(rank, size)) for rank in range(size)]
        assert torch.equal(torch.cat(shards), batch)  # disjoint, complete, in order
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_batch_size_is_global_by_default_and_per_rank_on_request():
    two = World(0, 2)
    assert global_batch_size(100, two, per_rank=False) == 100  # 50 images per rank
    assert global_batch_size(100, two, per_rank=True) == 200
    assert global_batch_size(100, World(), per_rank=False) == 100
    with pytest.raises(PipelineError, match="cannot be split over 4 ranks"):
        global_batch_size(3, World(0, 4), per_rank=False)


def test_every_rank_draws_the_same_epoch_order_from_the_seed():
    # What makes the shards disjoint: each rank's generator, seeded alike, yields the same batches.
    def epochs(seed):
        generator = torch.Generator().manual_seed(seed)
        return [torch.cat(shuffled_batches(600, 100, generator, 6)) for _ in range(2)]

    rank0, rank1, other = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))
    assert not torch.equal(rank0[0], rank0[1])  # a new order each epoch
    assert not torch.equal(rank0[0], other[0])


def test_torchrun_command_carries_every_setting_back_to_pipeline_train(tmp_path):
    config = TrainConfig(
        model="dnn",
        epochs=2,
        batch_size=64,
        lr=0.01,
        seed=3,
        max_steps=7,
        device="cpu",
        log_every=5,
        precision="fp32",
        channels_last=False,
        allow_other_data=True,
        checkpoint_every=4,
        system_metrics=False,
        per_rank_batch=True,
        data_dir=tmp_path,
    )
    command = torchrun_command(config, 2, "exp")
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node") + 1] == "2"
    args = command[command.index("train") + 1 :]
    params = cli.commands["train"].make_context("train", args).params  # the options the ranks will parse
    launcher = {name: params.pop(name) for name in ("resume", "nproc", "reuse", "experiment")}
    assert cli_args.config_from_options(**params) == config
    assert launcher == {"resume": None, "nproc": 1, "reuse": False, "experiment": "exp"}  # the ranks don't launch
    # A recipe's model: the ranks apply the recipe again, so a setting typed back to the chapter's
    # value (Adam, no smoothing, no flips) must still reach them, and one the recipe sets is not repeated.
    recipe = train_config(
        "cnn_plus", optimizer="adam", label_smoothing=0.0, hflip=False, val_size=500, data_dir=tmp_path
    )
    args = train_flags(recipe)
    assert {"--optimizer", "--label-smoothing", "--no-hflip", "--val-size"} <= set(args)
    assert "--lr" not in args and "--epochs" not in args
    params = cli.commands["train"].make_context("train", args).params
    for name in ("resume", "nproc", "reuse", "experiment"):
        params.pop(name)
    assert cli_args.config_from_options(**params) == recipe


@pytest.fixture
def store_env(tmp_path: Path, empty_store: Path) -> dict[str, str]:
    """The ranks' environment, with a store of the test's own: a copy of the empty one (no migrations
    in rank 0), in place before the test opens it."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {
        **env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "ddp",
        "PYTHONPATH": str(REPO),
    }


@pytest.mark.slow
def test_two_gloo_processes_train_one_run_logged_by_rank_0(synthetic_data_dir, tmp_path, store_env):
    args = ["--model", "cnn", "--epochs", "2", "--log-every", "3", "--allow-other-data", "--no-system-metrics"]
    args += ["--data-dir", str(synthetic_data_dir)]
    # The launcher warm (tests/warm.py); torchrun and the ranks are fresh interpreters, as always.
    launcher = WarmPopen(
        [sys.executable, "-m", "pipeline", "train", "--nproc", "2", *args],
        env=store_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, stderr[-3000:]
    assert stdout.count("Run id:") == 1  # rank 0 reports; rank 1 is silent

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1  # one run, not one per rank
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["world_size"], params["backend"]) == ("2", "gloo")
    assert (params["global_batch_size"], params["rank_batch_size"]) == ("100", "50")  # the recipe's batch, split
    assert params["steps_per_epoch"] == "6"  # 600 synthetic images / 100, as with one process
    metrics = run.data.metrics
    assert metrics["train_images_per_s_rank0"] > 0 and metrics["train_images_per_s_rank1"] > 0
    assert metrics["test_accuracy"] >= 0.9
    # Evaluated once per epoch (by rank 0), and the loss logged once per log point, not per rank.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [6, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss_step")] == [3, 6, 9, 12]
    # Rank 0 saved the plain model, not DDP's wrapper ("module." names would not load).
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model, _ = tracking.load_run_model(run.info.run_id)
    assert model.registry_name == "cnn"


def descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for child in Path("/proc").glob("[0-9]*"):
            try:
                if int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(child.name))
                    queue.append(int(child.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def rank_pid(launcher: int, rank: int) -> int | None:
    for pid in descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"\0".join(environ):
            return pid
    return None


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_with_an_error(synthetic_data_dir, tmp_path, store_env):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    launcher = WarmPopen(  # tests/warm.py
        [sys.executable, "-m", "pipeline", "train", "--nproc", "2", "--model", "dnn", "--epochs", "100000"]
        + ["--log-every", "1", "--allow-other-data", "--no-system-metrics", "--data-dir", str(synthetic_data_dir)],
        env=store_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until both ranks are inside the training loop
            experiment = client.get_experiment_by_name("ddp") if (tmp_path / "mlflow.db").exists() else None
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, "train_loss_step"):
                break
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            time.sleep(0.5)
        victim = rank_pid(launcher.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=60)
        stopped_after = time.monotonic() - killed
    finally:
        if launcher.poll() is None:
            for pid in descendants(launcher.pid):
                os.kill(pid, signal.SIGKILL)
            launcher.kill()
    assert launcher.returncode == 1
    assert stopped_after < 30  # torchrun noticed and ended rank 0; nothing waited for a timeout
    assert "rank      : 1" in stderr and "SIGKILL" in stderr  # torchrun names the rank that failed
    assert stderr.strip().splitlines()[-1].startswith("Error: distributed training failed: torchrun exited with")
    # Rank 0 either hit the lost peer in a collective (FAILED) or got torchrun's SIGTERM, which stops
    # a run like Ctrl-C (KILLED): either way its run is closed, not left RUNNING.
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.info.status in ("FAILED", "KILLED")
