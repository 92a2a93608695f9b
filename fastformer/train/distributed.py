"""DDP helpers: the same command runs single-process or under torchrun (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(device: str, info: DistInfo | None = None) -> torch.device:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available")
        if device == "cuda":
            device = f"cuda:{info.local_rank if info else 0}"
    return torch.device(device)


def launched(env=None) -> tuple[int, int]:
    """(rank, world size) torchrun gave this process (env: default os.environ): (0, 1) unless
    WORLD_SIZE > 1, whatever RANK a scheduler set for a single process."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE") or 1)
    return (int(env["RANK"]), world) if world > 1 else (0, 1)


def init(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns (info, device)."""
    rank, world = launched()
    if world <= 1:
        return DistInfo(), resolve_device(device)
    info = DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = resolve_device(device, info)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def local_processes(info: DistInfo, device: torch.device) -> int:
    """Processes on this machine that share `device`'s memory: every local rank on the CPU, one per GPU."""
    if device.type != "cpu" or not info.enabled:
        return 1
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without torchrun)."""
    if not info.enabled:
        return [obj]
    box = [None] * info.world
    dist.all_gather_object(box, obj)
    return box


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
