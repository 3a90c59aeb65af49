"""The loop's small collectives: one vote or a few means per step, on the process group's
device. NCCL serves only CUDA tensors, so every tensor handed to it is built on ``device``
(the rank's GPU under NCCL, the CPU under gloo), never on the CPU by default."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if _world() == 1:
        return flag  # no tensor, no device round trip
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_finite(x: torch.Tensor, device: torch.device) -> bool:
    """Is ``x`` finite on every rank? (A vote: ranks must agree before a collective backward.)"""
    t = (~torch.isfinite(x.detach())).any().to(device=device, dtype=torch.float32).reshape(1)
    if _world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return not bool(t.item())


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The mean over ranks of each value (the logged losses, not rank 0's share alone)."""
    world = _world()
    if world == 1:
        return list(values)
    t = torch.tensor(
        values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device
    )
    dist.all_reduce(t)
    return [float(v) / world for v in t.tolist()]
