"""torch.distributed for training launched by torchrun: who am I, and the few collectives `fit` needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (world of 1 when not launched by torchrun)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        )

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> bool:
        """Join the process group (NCCL on CUDA, gloo on CPU); True when this call created it."""
        if not self.enabled or torch_dist.is_initialized():
            return False
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: cuda:LOCAL_RANK."""
        if self.enabled and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, total: float, count: int) -> tuple[float, int]:
        """Sum `total` and `count` over ranks; return (mean, count)."""
        if not self.enabled:
            return total / max(count, 1), count
        t = torch.tensor([total, float(count)], dtype=torch.float64)
        torch_dist.all_reduce(t)
        total_sum, count_sum = float(t[0]), int(t[1])
        return total_sum / max(count_sum, 1), count_sum

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0])
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def stop(self, created: bool) -> None:
        if created and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
