"""torchrun / DDP plumbing: who am I, set up the process group, agree on values across ranks.

Under ``torchrun --nproc_per_node N`` the environment holds ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; without it everything degrades to one process (rank 0 of 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def teardown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_float(info: DistInfo, value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank."""
    if not info.enabled:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def all_reduce_mean(info: DistInfo, value: float, device: torch.device) -> float:
    if not info.enabled:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / info.world_size


def gather_strings(info: DistInfo, text: str) -> list[str]:
    """Every rank's ``text`` (on every rank)."""
    if not info.enabled:
        return [text]
    import torch.distributed as dist

    out: list = [None] * info.world_size
    dist.all_gather_object(out, text)
    return [str(v) for v in out]


def broadcast_string(info: DistInfo, text: str) -> str:
    """Rank 0's ``text`` on every rank."""
    if not info.enabled:
        return text
    import torch.distributed as dist

    box = [text if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])
