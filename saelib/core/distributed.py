"""Data parallelism on torch.distributed (gloo on CPU, nccl on GPU), launched by torchrun.

Every helper is a no-op in a single process, so the library code calls them unconditionally.
Each rank holds a slice of the global batch; a loss term is written as this rank's share of the
global-batch loss (global denominators), so summing gradients over ranks gives exactly the
gradient of the global-batch loss.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (sum, min or max); returns t."""
    if is_distributed():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t


def all_gather(t: Tensor) -> Tensor:
    """Stack of every rank's tensor (same shape on all ranks): [world_size, *t.shape]."""
    if not is_distributed():
        return t[None]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def all_gather_ragged(t: Tensor) -> Tensor:
    """Concatenation of every rank's 1-D tensor, whatever their lengths."""
    if not is_distributed():
        return t
    n = all_gather(torch.tensor([t.numel()], device=t.device))[:, 0]
    padded = t.new_full((int(n.max()),), float("-inf"))
    padded[: t.numel()] = t
    gathered = all_gather(padded)
    return torch.cat([gathered[r, : int(n[r])] for r in range(len(n))])


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env() -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); True if it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True
