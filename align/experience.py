"""From rollout samples to a padded `Experience`, and per-token logprobs of a causal LM.

Layout (see `align.types.Experience`): prompts left-padded to P columns, completions right-padded
after them. Every completion then starts at column P, so the learner asks the model for the logits
of the last T - P + 1 columns only (`logits_to_keep`): prompt positions never reach the 49k-wide
output projection, which on short-answer tasks is most of the sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from align.types import Experience, Sample


def build_experience(samples: Sequence[Sample], pad_id: int) -> Experience:
    """Pad `samples` into an Experience; None rewards become 0 with `scored` False."""
    P = max(len(s.prompt_ids) for s in samples)
    C = max(max(len(s.completion_ids) for s in samples), 1)
    B = len(samples)
    ids = torch.full((B, P + C), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + C), dtype=torch.long)
    act = torch.zeros((B, P + C), dtype=torch.long)
    for i, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        ids[i, P - p:P] = torch.tensor(s.prompt_ids)
        ids[i, P:P + c] = torch.tensor(s.completion_ids, dtype=torch.long)
        attn[i, P - p:P + c] = 1
        act[i, P:P + c] = 1
    rewards = torch.tensor([0.0 if s.reward is None else float(s.reward) for s in samples])
    return Experience(
        input_ids=ids, attention_mask=attn, action_mask=act, rewards=rewards,
        group_ids=torch.tensor([s.group_id for s in samples], dtype=torch.long),
        scored=torch.tensor([s.reward is not None for s in samples]),
        truncated=torch.tensor([s.truncated for s in samples]), prompt_len=P)


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                   temperature: float = 1.0, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(B, T) log-probabilities of each token given the ones before it, at `temperature`, for the
    completion columns (prompt columns are 0), and optionally the (B, T) entropies there.

    Computed as `log_softmax(logits / temperature)` over the full vocabulary: the same definition
    the rollout engines return (rollout/base.py), so the ratio is 1 when weights agree.
    """
    B, T = input_ids.shape
    keep = T - prompt_len + 1  # logits at column j predict token j + 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does under left padding
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, logits_to_keep=keep)
    logits = out.logits[:, :-1].float()  # (B, T - P, V): predictions for columns P .. T-1
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, T - P, V)
    targets = input_ids[:, prompt_len:]  # (B, T - P)
    lp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T - P)
    full = torch.zeros((B, T), dtype=lp.dtype, device=lp.device)
    full[:, prompt_len:] = lp
    ent = None
    if with_entropy:
        with torch.no_grad():
            e = -(logp_all.exp() * logp_all).sum(-1)  # (B, T - P)
        ent = torch.zeros((B, T), dtype=e.dtype, device=e.device)
        ent[:, prompt_len:] = e
    return full, ent
