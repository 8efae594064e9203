"""The few types that every package shares: one rollout `Sample`, a learner `Experience`, a `PairBatch`.

This module imports nothing else from the project, so `algorithms/`, `rewards/` and `rollout/` may
import it without forming an import circle (see DESIGN.md, "Who imports whom").
Shapes: B = sequences in the batch, T = padded sequence length (prompt + completion).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor


@dataclass
class Sample:
    """One prompt and one sampled completion, as a rollout engine returns it."""

    prompt: str  # the prompt text as given to the engine (chat template already applied)
    prompt_ids: list[int]  # (P,) prompt token ids
    completion: str  # decoded completion text
    completion_ids: list[int]  # (C,) completion token ids, EOS included when generated
    logprobs: list[float] | None = None  # (C,) engine logprobs of the completion tokens
    finish_reason: str = "stop"  # "stop" (EOS / stop string) or "length" (hit max_new_tokens)
    group_id: int = 0  # samples of the same prompt share a group id
    columns: dict[str, Any] = field(default_factory=dict)  # the dataset row's other fields (gold answer)
    reward: float | None = None  # the combined scalar reward; None = could not be scored
    reward_components: dict[str, float | None] = field(default_factory=dict)  # per reward function
    completion_mask: list[int] | None = None  # (C,) 1 on the model's own tokens; None = all (one turn)
    episode: dict[str, Any] | None = None  # a multi-turn episode's conversation and counts (align.episodes)

    @property
    def truncated(self) -> bool:
        """True when generation stopped at the token limit rather than at EOS / a stop string."""
        return self.finish_reason == "length"


@dataclass
class Experience:
    """A padded learner batch; every tensor field is (B, T) unless its comment says otherwise.

    Layout: prompts are left-padded to P columns and completions right-padded after them, so every
    completion starts at column P and the learner computes logits for the last T - P + 1 columns
    only (`logits_to_keep`). Token t of `logprobs`-like fields is the log-probability of
    `input_ids[:, t]` given the tokens before it; prompt columns are 0 and masked out.
    """

    input_ids: Tensor  # (B, T) left-padded prompt + right-padded completion
    attention_mask: Tensor  # (B, T) 1 on real tokens
    action_mask: Tensor  # (B, T) 1 on completion tokens that the loss trains on
    rewards: Tensor  # (B,) scalar reward per sequence (None rewards already replaced, see `scored`)
    group_ids: Tensor  # (B,) long: samples of one prompt share an id
    scored: Tensor | None = None  # (B,) bool: False where every reward function returned None
    old_logprobs: Tensor | None = None  # (B, T) behaviour-policy logprobs (learner recomputed)
    engine_logprobs: Tensor | None = None  # (B, T) the rollout engine's logprobs of the sampled tokens
    ref_logprobs: Tensor | None = None  # (B, T) reference-policy logprobs
    values: Tensor | None = None  # (B, T) critic values
    advantages: Tensor | None = None  # (B, T) or (B,) broadcast
    returns: Tensor | None = None  # (B, T) value targets
    truncated: Tensor | None = None  # (B,) bool: completion hit the token limit
    prompt_len: int = 0  # P: completions start at this column

    def __post_init__(self) -> None:
        if not self.prompt_len:  # derive P from the masks when not given (first completion column)
            cols = self.action_mask.any(0).nonzero()
            self.prompt_len = int(cols[0]) if len(cols) else self.input_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        """The tensor fields that are set, by name: what `algorithm.loss(**fields)` receives."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def index(self, idx: Tensor | slice | list[int]) -> "Experience":
        """Rows `idx` of every tensor field (a micro-batch or a shuffled minibatch)."""
        if isinstance(idx, list):
            idx = torch.tensor(idx, dtype=torch.long)
        return Experience(**{k: v[idx] for k, v in self.tensors().items()}, prompt_len=self.prompt_len)

    def split(self, size: int) -> Iterator["Experience"]:
        """Consecutive chunks of at most `size` rows."""
        for start in range(0, len(self), size):
            yield self.index(slice(start, start + size))

    def to(self, device: torch.device | str) -> "Experience":
        """A copy with every tensor moved to `device`."""
        return Experience(**{k: v.to(device) for k, v in self.tensors().items()}, prompt_len=self.prompt_len)

    @staticmethod
    def cat(parts: list["Experience"]) -> "Experience":
        """Concatenate experiences with equal T and P along the batch dimension."""
        names = parts[0].tensors().keys()
        return Experience(**{k: torch.cat([p.tensors()[k] for p in parts]) for k in names},
                          prompt_len=parts[0].prompt_len)


@dataclass
class PairBatch:
    """Preference pairs, tokenised: prompt + chosen and prompt + rejected, each right-padded."""

    chosen_ids: Tensor  # (B, Tc)
    chosen_attention_mask: Tensor  # (B, Tc)
    chosen_loss_mask: Tensor  # (B, Tc) 1 on chosen completion tokens
    rejected_ids: Tensor  # (B, Tr)
    rejected_attention_mask: Tensor  # (B, Tr)
    rejected_loss_mask: Tensor  # (B, Tr) 1 on rejected completion tokens
    ref_chosen_logps: Tensor | None = None  # (B,) summed reference logprobs, when precomputed
    ref_rejected_logps: Tensor | None = None  # (B,)

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]
