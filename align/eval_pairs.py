"""Pairwise evaluations for `align eval`: a reward model's accuracy on preference pairs, and a
policy's implicit-reward accuracy against its reference (DPO's rewards/accuracies).

Both read pairs exactly as the reward-model stage does (`align.pairs.encode_pairs`): the same
templates, truncation and end-of-turn, so a held-out accuracy here equals the stage's own eval.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from align.pairs import Pair, collate_side
from align.rm import sequence_rewards


def _batches(pairs: list[Pair], size: int, progress: bool, desc: str):
    """`pairs` in slices of `size`, with a progress bar."""
    bar = tqdm(total=len(pairs), desc=desc, disable=not progress, dynamic_ncols=True)
    for i in range(0, len(pairs), size):
        yield pairs[i:i + size]
        bar.update(min(size, len(pairs) - i))
    bar.close()


@torch.no_grad()
def reward_model_scores(model: torch.nn.Module, pairs: list[Pair], pad_id: int, batch_size: int = 16,
                        progress: bool = True) -> tuple[list[float], list[float]]:
    """(chosen, rejected) scalar rewards of every pair."""
    chosen, rejected = [], []
    for chunk in _batches(pairs, batch_size, progress, "eval pairs"):
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            b = collate_side(chunk, side, pad_id)
            out += sequence_rewards(model, b["input_ids"], b["attention_mask"]).tolist()
    return chosen, rejected


@torch.no_grad()
def completion_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     loss_mask: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of the completion tokens (loss_mask 1) given what precedes them."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (lp * loss_mask[:, 1:]).sum(-1)


def implicit_rewards(policy: torch.nn.Module, reference: torch.nn.Module, pairs: list[Pair], pad_id: int,
                     beta: float, batch_size: int = 16, progress: bool = True) -> tuple[list[float], list[float]]:
    """(chosen, rejected) implicit rewards beta * (log pi(y|x) - log pi_ref(y|x)) of every pair."""
    chosen, rejected = [], []
    for chunk in _batches(pairs, batch_size, progress, "eval pairs"):
        for side, out in (("chosen", chosen), ("rejected", rejected)):
            b = collate_side(chunk, side, pad_id)
            diff = completion_logps(policy, **b) - completion_logps(reference, **b)
            out += (beta * diff).tolist()
    return chosen, rejected


def pair_summary(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Accuracy (chosen scored above rejected; ties count half, as a coin flip), mean margin and
    the mean scores."""
    n = len(chosen)
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return {"n": n, "accuracy": wins / n, "margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
            "chosen": sum(chosen) / n, "rejected": sum(rejected) / n}


def pair_records(rows: list[dict], chosen: list[float], rejected: list[float],
                 keep: Callable[[dict], dict[str, Any]]) -> list[dict[str, Any]]:
    """One JSON record per pair: the row's text fields and both scores."""
    return [{**keep(r), "score_chosen": c, "score_rejected": j, "correct": c > j}
            for r, c, j in zip(rows, chosen, rejected)]
