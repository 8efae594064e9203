"""Critic-free baselines other than GRPO's group z-score: RLOO and REINFORCE++.

- RLOO (Kool et al. 2019; Ahmadian et al., arXiv 2402.14740): each sample's baseline is the mean
  reward of the *other* samples of its prompt, A_i = r_i - (1/(n-1)) sum_{j != i} r_j
  = n/(n-1) (r_i - mean). Unlike GRPO it does not divide by the std. The KL to the reference is
  folded into the sequence reward first (TRL, OpenRLHF): r_i <- r_i - beta * sum_t k1_t.
  The ratio is token-level with a token-mean PPO clip (verl / OpenRLHF); TRL's RLOOTrainer uses
  one sequence-level ratio exp(sum lp - sum lp_old) instead.
- REINFORCE++ (Hu, arXiv 2501.03262): token rewards r_t = -beta * k1_t + R on the last token,
  reward-to-go G_t = sum_{s >= t} gamma^(s-t) r_s, whitened over the WHOLE batch (no per-prompt
  baseline, no critic), then a token-level PPO clip. baseline=True is REINFORCE++-baseline:
  R <- R - mean of its group first (verl `compute_reinforce_plus_plus_baseline_outcome_advantage`).
Both share GRPO's loss machinery (core.surrogate); only the advantage estimator differs.
Formulas: /work/shared/ALGORITHMS.md section 9.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algorithms.core import (Selection, keep_all, KL_ESTIMATORS, LOSS_AGG_MODES, Needs, check_choice, clean_rewards, gae,
                             group_stats, kl_estimate, masked_sum, masked_whiten, surrogate, token_rewards)
from algorithms.registry import register

__all__ = ["RLOO", "ReinforcePP"]

KL_MODES = ("reward", "loss")  # KL folded into the reward, or a loss term


def _check(algo) -> None:
    """Validation shared by the two classes (same field names)."""
    check_choice("loss_agg", algo.loss_agg, LOSS_AGG_MODES)
    check_choice("kl_estimator", algo.kl_estimator, KL_ESTIMATORS)
    check_choice("kl_mode", algo.kl_mode, KL_MODES)
    if algo.dual_clip is not None and algo.dual_clip <= 1:
        raise ValueError(f"dual_clip must be None or > 1, got {algo.dual_clip}")
    if algo.kl_coef < 0 or algo.entropy_coef < 0:
        raise ValueError(f"kl_coef and entropy_coef must be >= 0, got {algo.kl_coef}, {algo.entropy_coef}")


def _reward_kl(algo, old_logprobs: Tensor | None, ref_logprobs: Tensor | None) -> Tensor | None:
    """Per-token KL (B, T) of the behaviour policy to the reference for the reward, or None if unused."""
    if algo.kl_mode != "reward" or algo.kl_coef == 0:
        return None
    if old_logprobs is None or ref_logprobs is None:
        raise ValueError("kl_mode='reward' with kl_coef > 0 needs old_logprobs and ref_logprobs")
    return kl_estimate(old_logprobs, ref_logprobs, algo.kl_estimator)


class _KLInReward:
    """What RLOO and REINFORCE++ share besides their advantages: validation, needs, selection and the loss."""

    def __post_init__(self) -> None:
        _check(self)

    @property
    def needs(self) -> Needs:
        """Reference logprobs for a KL term; old logprobs only where that KL is in the reward (it is
        taken at the behaviour policy there; as a loss term it is taken at the current one); no critic."""
        kl = self.kl_coef > 0
        return Needs(old_logprobs=kl and self.kl_mode == "reward", ref_logprobs=kl, values=False)

    @property
    def zero_advantage_trains(self) -> bool:
        """Whether a row whose advantages are all 0 still has a gradient: with the KL or an entropy
        bonus in the loss."""
        return (self.kl_mode == "loss" and self.kl_coef > 0) or self.entropy_coef > 0

    def select(self, groups: list, batch_groups: int | None = None, round: int = 1, rng=None) -> Selection:
        """Every generated group trains."""
        return keep_all(groups)

    def loss(self, **fields) -> tuple[Tensor, dict[str, float]]:
        """Token-level clipped surrogate (+ KL as a loss when kl_mode="loss") over the Experience
        fields (logprobs, advantages, action_mask, ...) -> (loss, metrics)."""
        return surrogate(self, fields, self.kl_coef if self.kl_mode == "loss" else 0.0)


@register("rloo")
@dataclass
class RLOO(_KLInReward):
    """REINFORCE Leave-One-Out (arXiv 2402.14740): per-prompt leave-one-out baseline, KL in the reward."""

    clip_low: float = 0.2  # ratio lower clip (TRL RLOO epsilon 0.2)
    clip_high: float = 0.2  # ratio upper clip
    dual_clip: float | None = None  # c > 1: dual-clip where A < 0
    loss_agg: str = "token-mean"  # verl / OpenRLHF
    loss_scale_factor: float | None = None  # C of seq-mean-token-sum-norm
    kl_coef: float = 0.05  # beta (TRL RLOO default)
    kl_mode: str = "reward"  # reward: r_i - beta * sum_t k1_t (TRL, OpenRLHF) | loss
    kl_estimator: str = "k1"  # estimator of the KL term
    entropy_coef: float = 0.0  # entropy bonus weight in the loss (verl entropy_coeff, OpenRLHF entropy_loss_coef)
    normalize_advantages: bool = False  # whiten A over the batch afterwards (TRL option)

    def advantages(self, *, rewards: Tensor, group_ids: Tensor, action_mask: Tensor | None = None,
                   scored: Tensor | None = None, old_logprobs: Tensor | None = None,
                   ref_logprobs: Tensor | None = None, **_) -> Tensor:
        """Leave-one-out advantages (B,). A group with one scored sample keeps A = r (verl); unscored
        rows get A = 0 and are left out of the baselines."""
        r, ok = clean_rewards(rewards, scored)  # (B,)
        kl = _reward_kl(self, old_logprobs, ref_logprobs)
        if kl is not None:
            if action_mask is None:
                raise ValueError("the KL in the reward needs action_mask")
            r = r - self.kl_coef * masked_sum(kl, action_mask, dim=-1).to(r.dtype)  # (B,)
        st = group_stats(r, group_ids, ok)
        n = st.count  # (B,)
        adv = torch.where(n > 1, (r - st.mean) * n / (n - 1).clamp(min=1), r)  # (B,)
        adv = torch.where(ok, adv, torch.zeros_like(adv))
        if self.normalize_advantages:
            adv = masked_whiten(adv, ok)
        return adv


@register("reinforce_pp")
@dataclass
class ReinforcePP(_KLInReward):
    """REINFORCE++ (arXiv 2501.03262): k1 KL in the token reward, reward-to-go whitened over the batch;
    baseline=True subtracts each prompt's mean reward first (REINFORCE++-baseline)."""

    clip_low: float = 0.2  # ratio lower clip
    clip_high: float = 0.2  # ratio upper clip
    dual_clip: float | None = None  # c > 1: dual-clip where A < 0
    loss_agg: str = "token-mean"  # token-level PPO loss
    loss_scale_factor: float | None = None  # C of seq-mean-token-sum-norm
    kl_coef: float = 0.01  # beta (OpenRLHF --algo.kl.init_coef); -baseline runs use KL as a loss, 1e-5
    kl_mode: str = "reward"  # reward (the paper) | loss (OpenRLHF's -baseline example, with k2)
    kl_estimator: str = "k1"  # k1 in the reward (the paper)
    entropy_coef: float = 0.0  # entropy bonus weight in the loss (verl entropy_coeff, OpenRLHF entropy_loss_coef)
    gamma: float = 1.0  # discount of the reward-to-go
    baseline: bool = False  # subtract the group mean of the scores before whitening

    def advantages(self, *, rewards: Tensor, action_mask: Tensor, group_ids: Tensor | None = None,
                   scored: Tensor | None = None, old_logprobs: Tensor | None = None,
                   ref_logprobs: Tensor | None = None, **_) -> Tensor:
        """Globally whitened reward-to-go (B, T); 0 off the mask and on unscored rows."""
        scores, ok = clean_rewards(rewards, scored)  # (B,)
        if self.baseline:
            if group_ids is None:
                raise ValueError("baseline=True needs group_ids")
            st = group_stats(scores, group_ids, ok)
            scores = torch.where(st.count > 1, scores - st.mean, scores)  # verl: a group of one keeps R
        mask = action_mask != 0  # (B, T)
        r = token_rewards(scores, mask, _reward_kl(self, old_logprobs, ref_logprobs), self.kl_coef)  # (B, T)
        returns, _ = gae(r, torch.zeros_like(r), mask, self.gamma, 1.0)  # (B, T) V = 0: reward-to-go
        keep = mask & ok.unsqueeze(-1)  # (B, T)
        return masked_whiten(returns, keep)
