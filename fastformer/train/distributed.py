"""DDP helpers: the same command runs single-process or under torchrun (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

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
        count = torch.cuda.device_count()
        if device == "cuda":
            local = info.local_rank if info else 0
            if local >= count:  # else "invalid device ordinal" from set_device, as a traceback
                raise ValueError(
                    f"LOCAL_RANK {local} has no GPU of its own: this machine has {count} "
                    f"(start at most {count} processes per machine, torchrun --nproc_per_node {count})"
                )
            device = f"cuda:{local}"
        else:
            try:
                parsed = torch.device(device)
            except RuntimeError:
                raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
            if parsed.index is not None and parsed.index >= count:
                raise ValueError(f"--device {device}: this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1})")
            if info is not None and info.enabled and local_world() > 1 and count > 1:
                # every process of the machine would take the same GPU, which nccl refuses ("Duplicate
                # GPU"); a process that sees one GPU only (its own CUDA_VISIBLE_DEVICES) may name it
                raise ValueError(
                    f"--device {device} under torchrun: each process takes the GPU of its LOCAL_RANK; "
                    "give --device cuda"
                )
    return torch.device(device)


def local_world(env=None) -> int:
    """Processes torchrun started on this machine (LOCAL_WORLD_SIZE, 1 when unset)."""
    env = os.environ if env is None else env
    try:
        return max(1, int(env.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return 1


def launched(env=None) -> tuple[int, int]:
    """(rank, world size) torchrun gave this process (env: default os.environ): (0, 1) unless
    WORLD_SIZE > 1, whatever RANK a scheduler set for a single process."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE") or 1)
    return (int(env["RANK"]), world) if world > 1 else (0, 1)


TIMEOUT_ENV = "FASTFORMER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_MINUTES = 60.0


def collective_timeout(env=None) -> timedelta:
    """How long a rank waits in a collective for the others (FASTFORMER_DIST_TIMEOUT minutes, default
    60). Rank 0 alone writes checkpoints and generates text (text2text's evaluation, its final eval
    set) while the other ranks wait in the next collective; torch's default for nccl is 10 minutes,
    after which its watchdog kills the waiting ranks and torchrun the whole run, rank 0's unfinished
    predictions included (gloo's default is 30 minutes)."""
    env = os.environ if env is None else env
    raw = (env.get(TIMEOUT_ENV) or "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        minutes = -1.0
    if not (minutes * 60 >= 1 and minutes < float("inf")):  # under a second rounds to no timeout at all
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the collective timeout in minutes (at least 1/60)")
    return timedelta(minutes=minutes)


def init(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns (info, device)."""
    rank, world = launched()
    if world <= 1:
        return DistInfo(), resolve_device(device)
    info = DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", "0")))
    dev = resolve_device(device, info)
    if not dist.is_initialized():
        timeout = collective_timeout()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return info, dev


def local_processes(info: DistInfo, device: torch.device) -> int:
    """Processes on this machine that share `device`'s memory: every local rank on the CPU, one per GPU."""
    if device.type != "cpu" or not info.enabled:
        return 1
    return local_world()


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
