"""Data-parallel training with PyTorch's own runtime: torchrun starts the ranks, DDP syncs them.

`torchrun --nproc-per-node N -m pipeline train ...` (or `pipeline train --nproc N`, which
runs exactly that) starts N copies of the training command. Each copy reads its rank from
the environment torchrun sets, joins the process group (gloo on CPU, NCCL on CUDA), and
trains its own shard of every batch; DDP averages the gradients, so every rank holds the
same weights. Rank 0 alone talks to MLflow, evaluates and saves the model.

Only `World.from_env` and `torchrun_command` are torch-free: the CLI and the jobs use them to
know their rank before torch is imported.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

    from pipeline.config import TrainConfig

# A collective that waits longer than this fails instead of hanging: a rank that dies without
# torchrun noticing (another node gone, a frozen process) stops the others after this long.
# Rank 0 evaluates and logs between epochs while the others wait, so it must cover that too.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)

# Rendezvous settings for `pipeline train --nproc`: one node, and no restarts, so a failing
# rank ends the job at once instead of restarting every rank from scratch.
TORCHRUN_FLAGS = ("--standalone", "--max-restarts", "0", "--monitor-interval", "1")


@dataclass(frozen=True)
class World:
    """Where this process stands: rank, world size, local rank (its GPU) and the backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # set once the process group is up

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """The rank torchrun gave this process (RANK, WORLD_SIZE, LOCAL_RANK); one process without it."""
        try:
            return cls(
                rank=int(os.environ.get("RANK", 0)),
                size=int(os.environ.get("WORLD_SIZE", 1)),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            )
        except ValueError:
            raise PipelineError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None


def init(world: World, device: torch.device) -> World:
    """Join the process group torchrun prepared: NCCL for CUDA, gloo for CPU. A no-op for one process."""
    import torch.distributed as dist

    if not world.distributed:
        return world
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return World(world.rank, world.size, world.local_rank, backend)


def local_device(device: torch.device, world: World) -> torch.device:
    """One GPU per rank on a node: rank `local_rank` takes cuda:`local_rank`."""
    import torch

    if device.type != "cuda" or not world.distributed:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise PipelineError(
            f"local rank {world.local_rank} has no GPU: torch sees {torch.cuda.device_count()}; "
            "start at most one process per GPU (--nproc-per-node)"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model; it broadcasts rank 0's weights when built."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def global_batch_size(batch_size: int, world: World, per_rank: bool) -> int:
    """Images per optimizer step over all ranks: the recipe's batch, or `batch_size` per rank."""
    total = batch_size * world.size if per_rank else batch_size
    if total < world.size:
        raise PipelineError(
            f"a global batch of {total} cannot be split over {world.size} ranks; use --batch-size {world.size} "
            "or more, or --per-rank-batch"
        )
    return total


def check_batch_fits(global_batch: int, images: int, world: World, per_rank: bool) -> None:
    """One optimizer step may not ask for more images than there are to train on."""
    if global_batch <= images:
        return
    if per_rank and world.distributed:
        raise PipelineError(
            f"a global batch of {world.size} ranks x --batch-size {global_batch // world.size} is more than the "
            f"{images:,} training images; use --batch-size {max(1, images // world.size)} or less"
        )
    raise PipelineError(
        f"--batch-size {global_batch} is more than the {images:,} training images; use --batch-size {images} or less"
    )


def check_launch(config: TrainConfig, nproc: int) -> None:
    """Refuse, before torchrun starts a single rank, what every rank's setup would refuse: a batch that
    cannot be split over the ranks or is larger than the training set, missing data, a validation
    split that leaves nothing. Each rank failing alone buries the reason under torchrun's report.
    Torch-free, like the launcher: the data files' headers are all it reads."""
    from pipeline.data import images_to_fit, split_size

    world = World(0, nproc)
    batch = global_batch_size(config.batch_size, world, config.per_rank_batch)
    images = images_to_fit(split_size(config.data_dir, "train"), config.val_size)
    check_batch_fits(batch, images, world, config.per_rank_batch)


def shard(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous part of one global batch (sizes differ by at most one)."""
    if not world.distributed:
        return batch
    return batch.tensor_split(world.size)[world.rank]


def mean(value: torch.Tensor, world: World) -> float:
    """The mean of a scalar over the ranks (its own value for one process)."""
    if not world.distributed:
        return value.item()
    import torch.distributed as dist

    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return total.item() / world.size


def gather(value: float, world: World, device: torch.device) -> list[float]:
    """One float from each rank, in rank order (its own value for one process)."""
    if not world.distributed:
        return [value]
    import torch
    import torch.distributed as dist

    mine = torch.tensor([value], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    return [t.item() for t in every]


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        # Objects in reference cycles (DDP's hooks) may still hold the group; free them now.
        gc.collect()


def train_flags(config: TrainConfig) -> list[str]:
    """`pipeline train` options that reproduce `config`: every setting that differs from the
    model's recipe (which the ranks apply again), and --model.

    Each TrainConfig field is an option of the same name (model -> --model, max_steps ->
    --max-steps, channels_last -> --channels-last/--no-channels-last).
    """
    from pipeline.config import train_config

    default = train_config(config.model, data_dir=config.data_dir)
    flags: list[str] = []
    for spec in fields(config):
        value, option = getattr(config, spec.name), "--" + spec.name.replace("_", "-")
        if value == getattr(default, spec.name) and spec.name not in ("model", "data_dir"):
            continue
        if isinstance(value, bool):
            flags.append(option if value else option.replace("--", "--no-", 1))
        elif value is not None:
            flags += [option, str(value)]
    return flags


def torchrun_command(config: TrainConfig, nproc: int, experiment: str | None) -> list[str]:
    """The torchrun command line that trains `config` on `nproc` local processes."""
    command = [sys.executable, "-m", "torch.distributed.run", *TORCHRUN_FLAGS, "--nproc-per-node", str(nproc)]
    command += ["-m", "pipeline", "train", *train_flags(config)]
    if experiment:
        command += ["--experiment", experiment]
    return command
