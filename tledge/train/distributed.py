"""Multi-process training with ``torchrun``: the same command line on one process or many.

``torchrun --nproc_per_node N -m tledge finetune DATA ...`` sets ``WORLD_SIZE``/``RANK``;
:func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU). With one
process every helper here is a no-op, so the training code has no special cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tledge.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but PyTorch sees no CUDA GPU",
                              hint="use --device cpu, or install a CUDA build of PyTorch")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {name!r}", hint="use auto, cpu or cuda")


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, device=dev)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (counts, confusion matrices)."""
    if d.enabled:
        t = t.to(d.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.cpu()


def gather_rows(d: Dist, t: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate the row shards ``rows[rank::world]`` of every process back into ``total`` rows in order."""
    if not d.enabled:
        return t
    per = (total + d.world - 1) // d.world
    padded = torch.zeros((per, *t.shape[1:]), dtype=t.dtype)
    padded[: len(t)] = t
    device = d.device if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = [torch.empty_like(padded, device=device) for _ in range(d.world)]
    dist.all_gather(parts, padded.to(device))
    out = torch.empty((total, *t.shape[1:]), dtype=t.dtype)
    for r, part in enumerate(parts):
        rows = out[r::d.world]
        rows.copy_(part[: len(rows)].cpu())
    return out


def broadcast_object(d: Dist, obj: object) -> object:
    """Rank 0's ``obj`` on every process (e.g. the run folder name)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
