"""PPO with a learned critic for RLHF (Ziegler et al. 2019, arXiv 1909.08593; InstructGPT 2203.02155).

The reward-model score goes on the last completion token; every completion token also pays
-beta * KL(pi_old || pi_ref) in the reward (or, with kl_mode="loss", the KL is a loss term as in
GRPO). GAE over the token rewards and the critic's values gives advantages and returns; the policy
takes the PPO-clipped surrogate (optionally dual-clipped), the critic a clipped value loss.
Nearest sibling: GRPO (grpo.py) replaces the critic by the group baseline of G samples per prompt.

The critic is a separate learner, so the two halves are separate methods:
    out = algo.advantages(**exp.tensors())              # PPOAdvantages(advantages, returns, metrics)
    exp.advantages, exp.returns = out.advantages, out.returns
    policy:  algo.policy_loss(logprobs=lp, **exp.tensors())            -> (loss, metrics)
    critic:  algo.value_loss(new_values=v, **exp.tensors())            -> (loss, metrics)
`exp.values` are the critic's values at rollout time (the clipping anchor); `new_values` are the
critic's current values. `loss(...)` adds both (value term times vf_coef) for a shared model.
Formulas and defaults: /work/shared/ALGORITHMS.md section 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from algorithms.core import (Selection, keep_all, KL_ESTIMATORS, LOSS_AGG_MODES, Needs, aggregate, check_choice, clean_rewards,
                             gae, kl_estimate, masked_mean, masked_var, masked_whiten, surrogate, token_rewards)
from algorithms.registry import register

__all__ = ["PPO", "PPOAdvantages", "gae"]

KL_MODES = ("reward", "loss")  # KL as a per-token reward penalty (InstructGPT) or as a loss term


class PPOAdvantages(NamedTuple):
    """What `PPO.advantages` returns, by name."""

    advantages: Tensor  # (B, T) GAE advantages, whitened when whiten_advantages; 0 off the mask
    returns: Tensor  # (B, T) value targets A + V, taken before whitening; 0 off the mask
    metrics: dict[str, float]  # kl_in_reward (observed, batch mean of per-sequence means), kl_coef
    updates: dict[str, float]  # hyper-parameters for the next step (the adaptive controller's kl_coef)


@register("ppo")
@dataclass
class PPO:
    """PPO with a critic, GAE, and KL to a reference in the reward (fixed or adaptive beta) or in the loss."""

    clip_low: float = 0.2  # ratio lower clip: 1 - clip_low
    clip_high: float = 0.2  # ratio upper clip: 1 + clip_high
    dual_clip: float | None = None  # c > 1: cap the loss at -c*A where A < 0 (verl uses 3.0)
    loss_agg: str = "token-mean"  # see core.aggregate; verl / OpenRLHF default
    loss_scale_factor: float | None = None  # C of seq-mean-token-sum-norm
    kl_coef: float = 0.05  # beta (TRL PPO 0.05; OpenRLHF 0.01; verl 0.001); the controller moves it
    kl_mode: str = "reward"  # reward: -beta*KL per token in the reward | loss: beta*KL as a loss term
    kl_estimator: str = "k1"  # k1 in the reward (InstructGPT, verl, OpenRLHF); k3 suits kl_mode="loss"
    entropy_coef: float = 0.0  # entropy bonus weight in the loss (verl entropy_coeff, OpenRLHF entropy_loss_coef)
    adaptive_kl: bool = False  # Ziegler's proportional controller on beta (next_kl_coef)
    target_kl: float = 0.1  # controller target (verl default)
    kl_horizon: float = 10000.0  # controller horizon in samples (verl default)
    gamma: float = 1.0  # discount (verl, OpenRLHF, TRL all use 1)
    lam: float = 0.95  # GAE lambda (TRL; verl and OpenRLHF use 1.0: no bias, more variance)
    whiten_advantages: bool = True  # masked batch whitening of A (unbiased var, eps 1e-8, as verl)
    value_clip: float | None = 0.5  # clip V to V_old +- value_clip (verl cliprange_value, OpenRLHF); None = off
    vf_coef: float = 0.1  # value-loss weight in `loss` (shared model, TRL 0.1); value_loss is unscaled

    def __post_init__(self) -> None:
        check_choice("loss_agg", self.loss_agg, LOSS_AGG_MODES)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("kl_mode", self.kl_mode, KL_MODES)
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be None or > 1, got {self.dual_clip}")
        if self.kl_coef < 0 or self.target_kl <= 0 or self.kl_horizon <= 0 or self.entropy_coef < 0:
            raise ValueError("need kl_coef >= 0, target_kl > 0, kl_horizon > 0 and entropy_coef >= 0")

    @property
    def needs(self) -> Needs:
        """A critic always; the reference when there is a KL term (or a controller that may grow it)."""
        kl = self.kl_coef > 0 or self.adaptive_kl
        return Needs(old_logprobs=kl and self.kl_mode == "reward", ref_logprobs=kl, values=True)

    def select(self, groups: list, batch_groups: int | None = None, round: int = 1, rng=None) -> Selection:
        """Every generated group trains."""
        return keep_all(groups)

    def next_kl_coef(self, observed_kl: float, n_steps: int) -> float:
        """Ziegler's adaptive controller: beta * (1 + clip(KL/target - 1, +-0.2) * n_steps / horizon);
        beta unchanged when adaptive_kl is False. n_steps = samples in the batch. Changes nothing:
        the caller applies it (the RL driver, from `PPOAdvantages.updates`, and checkpoints it)."""
        if not self.adaptive_kl:
            return self.kl_coef
        error = min(max(observed_kl / self.target_kl - 1.0, -0.2), 0.2)
        return self.kl_coef * (1.0 + error * n_steps / self.kl_horizon)

    def advantages(self, *, rewards: Tensor, values: Tensor, action_mask: Tensor,
                   old_logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None,
                   scored: Tensor | None = None, **_) -> PPOAdvantages:
        """Token rewards (score on the last token, -beta*KL in reward mode) -> GAE -> whitening.

        rewards (B,) scores; values (B, T) at rollout time; old / ref logprobs (B, T) for the KL.
        As verl's `apply_kl_penalty`, the penalty uses the current beta; the controller's next beta
        (from the observed KL) comes back in `updates` for the caller to apply: no side effect here.
        Unscored rows get A = 0 and returns = values (no value-loss signal).
        """
        mask = action_mask != 0  # (B, T)
        scores, ok = clean_rewards(rewards, scored)  # (B,)
        metrics: dict[str, float] = {"kl_coef": self.kl_coef}
        kl = None
        if ref_logprobs is not None and old_logprobs is not None:
            kl = kl_estimate(old_logprobs, ref_logprobs, self.kl_estimator)  # (B, T)
            metrics["kl_in_reward"] = float(masked_mean(kl, mask, dim=-1).mean())
        elif self.kl_mode == "reward" and self.kl_coef > 0:
            raise ValueError("kl_mode='reward' with kl_coef > 0 needs old_logprobs and ref_logprobs")
        beta = self.kl_coef if self.kl_mode == "reward" else 0.0
        r = token_rewards(scores.to(values.dtype), mask, kl, beta)  # (B, T)
        adv, ret = gae(r, values, mask, self.gamma, self.lam)  # (B, T), (B, T)
        keep = mask & ok.unsqueeze(-1)  # (B, T)
        if self.whiten_advantages:
            adv = masked_whiten(adv, keep)
        adv = torch.where(keep, adv, torch.zeros_like(adv))
        ret = torch.where(keep, ret, torch.where(mask, values, torch.zeros_like(values)))
        updates = {}
        if kl is not None and self.adaptive_kl:
            updates["kl_coef"] = self.next_kl_coef(metrics["kl_in_reward"], int(mask.shape[0]))
            metrics["kl_coef_next"] = updates["kl_coef"]
        return PPOAdvantages(advantages=adv, returns=ret, metrics=metrics, updates=updates)

    def policy_loss(self, **fields) -> tuple[Tensor, dict[str, float]]:
        """PPO-clipped surrogate over the Experience fields (+ beta*KL when kl_mode="loss") -> (loss, metrics)."""
        return surrogate(self, fields, self.kl_coef if self.kl_mode == "loss" else 0.0)

    def value_loss(self, *, new_values: Tensor, values: Tensor, returns: Tensor, action_mask: Tensor,
                   num_tokens: float | None = None, num_seqs: float | None = None,
                   **_) -> tuple[Tensor, dict[str, float]]:
        """0.5 * agg(max((V - R)^2, (clip(V, V_old +- value_clip) - R)^2)) (verl `compute_value_loss`).

        new_values: the critic's current values (B, T); values: those at rollout time; returns (B, T).
        """
        mask = action_mask != 0  # (B, T)
        err = (new_values - returns).square()  # (B, T)
        per_token = err
        if self.value_clip is not None:
            clipped = values + (new_values - values).clamp(-self.value_clip, self.value_clip)  # (B, T)
            err_clipped = (clipped - returns).square()  # (B, T)
            per_token = torch.maximum(err, err_clipped)
        loss = 0.5 * aggregate(per_token, mask, self.loss_agg, self.loss_scale_factor, num_tokens, num_seqs)
        with torch.no_grad():
            v = new_values.detach()
            var_r = masked_var(returns, mask)
            ev = 1.0 - masked_var(returns - v, mask) / var_r if var_r > 0 else torch.zeros(())
            clip_frac = masked_mean((per_token > err).float(), mask) if self.value_clip is not None else 0.0
        metrics = {"value_loss": float(loss.detach()), "vf_clip_frac": float(clip_frac),
                   "explained_variance": float(ev), "value_mean": float(masked_mean(v, mask))}
        return loss, metrics

    def loss(self, *, logprobs: Tensor, advantages: Tensor, action_mask: Tensor,
             new_values: Tensor | None = None, values: Tensor | None = None, returns: Tensor | None = None,
             **fields) -> tuple[Tensor, dict[str, float]]:
        """Policy loss, plus vf_coef * value loss when `new_values` is given (policy and critic in one model)."""
        loss, metrics = self.policy_loss(logprobs=logprobs, advantages=advantages, action_mask=action_mask, **fields)
        if new_values is not None:
            if values is None or returns is None:
                raise ValueError("the value loss needs values (at rollout time) and returns")
            vloss, vmetrics = self.value_loss(new_values=new_values, values=values, returns=returns,
                                              action_mask=action_mask, **fields)
            loss = loss + self.vf_coef * vloss
            metrics.update(vmetrics, loss=float(loss.detach()))
        return loss, metrics
