"""Online preference tuning inside the RL loop: for each group of scored rollouts, its best and worst
completions form a pair, and a pairwise loss (DPO, IPO, SimPO, ORPO) trains on those pairs.

`OnlinePairs(inner)` gives a pairwise loss the RL algorithm hooks (`needs`, `select`, `advantages`,
`loss`), so the same driver runs it: `algorithm.name: dpo` in an `align rl` config is all it takes
(the RL stage wraps a pairwise algorithm in this adapter when it builds it). Online DPO in this
form follows "Iterative / online DPO" recipes (e.g. Xu et al. 2023, arXiv 2312.16682; Guo et al.
2024, arXiv 2402.04792), with the reward functions as the judge.

Batch layout: each selected group is [chosen, rejected], so rows 2i / 2i+1 of the Experience are a
pair. The learner shuffles and splits by whole groups (micro-batch sizes are even), so pairs stay
together. Group ids travel with the rows and are checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from algorithms.core import Needs, Selection, masked_sum
from align.types import Sample


@dataclass
class OnlinePairs:
    """Best-vs-worst pairs from each scored group, trained with a pairwise preference loss."""

    inner: Any  # a pairwise loss object: DPO, ORPO or SimPO (its `loss` takes summed logprobs)

    @property
    def needs(self) -> Needs:
        """The reference when the inner loss has one (DPO); never old logprobs or a critic."""
        return Needs(old_logprobs=False, ref_logprobs=bool(getattr(self.inner, "needs_reference", False)),
                     values=False)

    def select(self, groups: list[list[Sample]], batch_groups: int | None = None, round: int = 1,
               rng: Any = None) -> Selection:
        """[best, worst] of every group whose scored rewards differ; the rest cannot form a pair."""
        pairs = []
        for g in groups:
            scored = [s for s in g if s.reward is not None]
            if len(scored) < 2:
                continue
            best = max(scored, key=lambda s: s.reward)
            worst = min(scored, key=lambda s: s.reward)
            if best.reward > worst.reward:
                pairs.append([best, worst])
        for i, pair in enumerate(pairs):  # renumber so rows 2i, 2i+1 share group id i
            for s in pair:
                s.group_id = i
        n = max(len(groups), 1)
        return Selection(groups=pairs, metrics={"pair_frac": len(pairs) / n, "pairs": float(len(pairs))})

    def advantages(self, *, rewards: Tensor, **_: Any) -> Tensor:
        """No advantages: the pairwise loss needs none (zeros keep the Experience complete)."""
        return torch.zeros_like(rewards)

    def loss(self, *, logprobs: Tensor, action_mask: Tensor, group_ids: Tensor,
             ref_logprobs: Tensor | None = None, num_seqs: float | None = None, **_: Any) -> tuple[Tensor, dict]:
        """The inner pairwise loss on summed completion logprobs of rows (2i, 2i+1), weighted by this
        micro-batch's share of the minibatch's pairs (so micro-batches accumulate exactly)."""
        if logprobs.shape[0] % 2 or not torch.equal(group_ids[0::2], group_ids[1::2]):
            raise ValueError("online pairs must arrive as consecutive (chosen, rejected) rows")
        mask = action_mask != 0
        seq = masked_sum(logprobs, mask, dim=-1)  # (B,)
        lengths = mask.sum(-1).to(seq.dtype)  # (B,)
        kw = dict(policy_chosen_logps=seq[0::2], policy_rejected_logps=seq[1::2],
                  chosen_lengths=lengths[0::2], rejected_lengths=lengths[1::2])
        if ref_logprobs is not None:
            ref = masked_sum(ref_logprobs, mask, dim=-1)  # (B,)
            kw.update(ref_chosen_logps=ref[0::2], ref_rejected_logps=ref[1::2])
        loss, metrics = self.inner.loss(**kw)
        pairs = logprobs.shape[0] // 2
        total = (num_seqs or logprobs.shape[0]) / 2
        return loss * (pairs / total), metrics
