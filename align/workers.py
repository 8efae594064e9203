"""The non-learning workers of online RL, plain classes that `ActorGroup` turns into Ray actors
(the learners are in `align.learners`):

- `RolloutWorker`: one rollout engine (vLLM, llama.cpp or HF generate); takes weight updates.
- `ReferenceWorker`: a frozen copy of the initial policy, only for full / freeze tuning (a PEFT
  policy's reference is the same model with its adapter disabled: no second copy).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from align.config import ModelConfig
from align.cores import ThreadBudget
from align.device import autocast, engine_dtype, to_host, worker_device
from align.logprobs import logprobs_in_chunks
from align.models import load_causal_lm, set_threads
from align.placement import Placed
from align.types import Experience, Sample


class RolloutWorker(Placed):
    """One rollout engine behind the `RolloutEngine` protocol."""

    def __init__(self, backend: str, model: Any, tokenizer: Any = None, dtype: str = "float32",
                 num_threads: int = 0, seed: int = 0, max_lora_rank: int = 64, max_model_len: int | None = None,
                 vllm_kwargs: dict | None = None, enable_lora: bool = True, device: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5, sleep_mode: bool = False,
                 loan_path: str | None = None):
        """`device`: where an HF engine runs (vLLM places itself on the GPUs Ray gave this actor);
        `tensor_parallel_size`, `gpu_memory_utilization`: vLLM's; `sleep_mode`: the engine may free
        its GPU memory between rollouts (`sleep` / `wake`), for engines colocated with learners;
        `loan_path`: the driver's core-loan file (align/cores.py): extra threads while the learner waits."""
        from rollout import make_engine

        threads = set_threads(num_threads)
        self.device = worker_device(device)
        vllm = dict(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                    enable_sleep_mode=sleep_mode, **(vllm_kwargs or {}))
        self.engine = make_engine(backend, model=model, tokenizer=tokenizer, dtype=engine_dtype(dtype, self.device),
                                  num_threads=threads,
                                  enable_lora=enable_lora, max_lora_rank=max_lora_rank, seed=seed,
                                  max_model_len=max_model_len, hf_kwargs={"device": self.device},
                                  vllm_kwargs=vllm)
        self.backend = type(self.engine).__name__
        self.threads = ThreadBudget(threads, loan_path, "engine", self._set_threads)
        if hasattr(self.engine, "before_decode"):  # llama.cpp: the loan is re-read at every decode step
            self.engine.before_decode = self.threads.refresh
        self.version = 0  # weights version last loaded; 0 = the initial checkpoint (also after a restart)

    def generate(self, prompts: list[str], sampling: Any, group_offset: int = 0,
                 columns: list[dict] | None = None,
                 prompt_ids: list[list[int]] | None = None) -> tuple[list[Sample], float, int]:
        """Samples for `prompts` (given as token ids too where the caller tokenised them), the
        seconds generation took, and the weights version that made them (a restarted worker
        reports 0, so the driver re-syncs it and asks again)."""
        t0 = time.perf_counter()
        self.threads.refresh()
        out = self.engine.generate(prompts, sampling, group_offset=group_offset, columns=columns,
                                   prompt_ids=prompt_ids)
        self.threads.reset()
        return out, time.perf_counter() - t0, self.version

    def _set_threads(self, n: int) -> None:
        """Resize this worker's thread pools: torch's (HF generate, sampling) and the engine's own."""
        torch.set_num_threads(n)
        if hasattr(self.engine, "set_threads"):
            self.engine.set_threads(n)

    def update(self, payload: dict[str, Any]) -> float:
        """Load weights from `PolicyLearner.sync_payload`; returns the seconds it took."""
        t0 = time.perf_counter()
        self.version = payload.get("version", self.version + 1)
        if payload["kind"] == "lora":
            self.engine.update_lora(payload["tensors"], payload["config"])
        else:
            self.engine.update_weights(payload["tensors"])
        return time.perf_counter() - t0

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next generate or update (colocated engines)."""
        self.engine.sleep()

    def ping(self) -> bool:
        """True once the worker is up (used to wait for actor start-up)."""
        return True


class ReferenceWorker(Placed):
    """The frozen initial policy, for KL terms when the policy is not a PEFT adapter."""

    def __init__(self, model_cfg: ModelConfig, num_threads: int = 0, model: torch.nn.Module | None = None,
                 temperature: float = 1.0, micro_batch_size: int = 8, amp: str = "none", device: str = "auto"):
        set_threads(num_threads)
        self.device = worker_device(device)
        model = model if model is not None else load_causal_lm(model_cfg)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.temperature, self.micro, self.amp = temperature, micro_batch_size, amp

    def logprobs(self, exp: Experience) -> torch.Tensor:
        """(B, T) reference logprobs, on the host (under the learner's autocast, so that the
        reference is computed as the policy is)."""
        with autocast(self.device, self.amp):
            return to_host(logprobs_in_chunks(self.model, exp.to(self.device), self.micro, self.temperature))
