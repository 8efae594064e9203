"""Data parallelism for the offline stages (SFT, reward model, preference) under torchrun.

    torchrun --nproc_per_node=4 -m align.cli sft examples/sft.yaml

torchrun starts one process per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_from_env` joins that process group (NCCL on GPUs, gloo on CPUs). Each process
keeps a whole copy of the trainable weights and takes its slice of every combined micro-batch
(align/trainer.py). Gradients are *summed* here, not averaged as DDP does: the trainer already
divides each process's loss by the targets of the whole step on all processes, so the sum is
exactly the gradient of the combined batch. No wrapper class (DDP, accelerate): a handful of
collectives, called in plain sight by the trainer.

Without WORLD_SIZE > 1 nothing is initialised and every function here is a no-op for one process.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
import torch.distributed as dist

from align.device import dist_backend, worker_device

BUCKET_NUMEL = 2**24  # gradient elements per all-reduce (64 MB in fp32): few collectives, bounded extra memory


def init_from_env(request: str = "auto") -> torch.device:
    """This process's device (`align.device.worker_device`), after joining torchrun's process group
    (env:// rendezvous) when WORLD_SIZE > 1. Idempotent: every stage and the trainer may call it."""
    device = worker_device(request)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # device_id binds NCCL's communicator to this process's GPU (barriers then need no guess)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(dist_backend(device), init_method="env://", **kwargs)
    return device


def world_size() -> int:
    """Processes training together (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the run directory (metrics, plots, checkpoints, final/)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here."""
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a CLI run, so NCCL does not warn at exit)."""
    if world_size() > 1:
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` summed over all processes, computed on `device` (NCCL reduces only GPU tensors) and
    returned on `t`'s device. Every process gets bit-identical values."""
    if world_size() == 1:
        return t
    out = t.to(device, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def sum_dicts(values: dict[str, float]) -> dict[str, float]:
    """Per-key sums of every process's `values`; keys may differ between processes (a KTO
    micro-batch may hold no undesirable rows on one of them)."""
    if world_size() == 1:
        return dict(values)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, values)
    out: dict[str, float] = {}
    for part in parts:  # rank order: the same float sums on every process
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (picklable) on every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_params(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values into every process's `params`, so all start from the same weights
    even if initialisation consumed random numbers differently (as DDP does at construction)."""
    if world_size() > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


@torch.no_grad()
def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the processes, in flat buckets (one collective per
    BUCKET_NUMEL elements rather than one per LoRA matrix). A parameter without a gradient on this
    process contributes zeros, so every process issues the same collectives."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):
        bucket: list[torch.Tensor] = []
        numel = 0
        for g in [p.grad for p in params if p.grad.dtype == dtype]:
            bucket.append(g)
            numel += g.numel()
            if numel >= BUCKET_NUMEL:
                _reduce_flat(bucket)
                bucket, numel = [], 0
        if bucket:
            _reduce_flat(bucket)


def _reduce_flat(grads: list[torch.Tensor]) -> None:
    """All-reduce (sum) tensors of one dtype and device as one flat buffer, written back in place."""
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
