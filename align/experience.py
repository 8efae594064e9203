"""From rollout samples to a padded `Experience`.

Layout (see `align.types.Experience`): prompts left-padded to P columns, completions right-padded
after them. Every completion then starts at column P, so the learner runs the LM head on the
completion columns only (`align.logprobs`): prompt positions never reach the 49k-wide output
projection, which on short-answer tasks is most of the sequence.
"""
from __future__ import annotations

from typing import Sequence

import torch

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
        # multi-turn episodes: environment tokens between the model's turns are context, never trained on
        act[i, P:P + c] = 1 if s.completion_mask is None else torch.tensor(s.completion_mask, dtype=torch.long)
    engine = None
    if all(s.logprobs is not None for s in samples):  # kept for the mismatch metric and rollout correction
        engine = torch.zeros((B, P + C))
        for i, s in enumerate(samples):
            engine[i, P:P + len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float)
    rewards = torch.tensor([0.0 if s.reward is None else float(s.reward) for s in samples])
    return Experience(
        input_ids=ids, attention_mask=attn, action_mask=act, rewards=rewards,
        group_ids=torch.tensor([s.group_id for s in samples], dtype=torch.long),
        scored=torch.tensor([s.reward is not None for s in samples]),
        truncated=torch.tensor([s.truncated for s in samples]), engine_logprobs=engine, prompt_len=P)
