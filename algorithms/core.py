"""Shared pieces of the online-RL algorithms: loss reduction, masked statistics, KL estimators,
group statistics, the clipped policy-gradient term, KL-shaped token rewards and batch selection.

Every RL algorithm (GRPO and its variants, PPO, RLOO, REINFORCE++) is a dataclass of
hyper-parameters that composes these functions; nothing here knows an algorithm's name.
Formulas and their sources: /work/shared/ALGORITHMS.md sections 0-5 and 9.

Shapes: B = sequences, T = padded completion length (or prompt + completion: position t of every
(B, T) tensor is token t; `mask` / `action_mask` is 1 on the tokens that the loss trains on).

Micro-batches (gradient accumulation) — the one rule the learner follows:
    counts = normalizers(minibatch.action_mask)          # over the WHOLE minibatch (optimizer step)
    for mb in minibatch.split(micro):                    # then, for every micro-batch,
        loss, m = algo.loss(logprobs=..., **mb.tensors(), **counts)
        loss.backward()                                  # summed, NOT divided by the number of steps
This gives exactly the gradient of one big batch for every `aggregate` mode (tests check it).
Under data parallelism with gradient averaging, pass the global counts divided by the world size.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from align.types import Sample

__all__ = [
    "LOSS_AGG_MODES", "KL_ESTIMATORS", "RATIO_LEVELS", "SELECTIONS", "Needs", "Selection",
    "GroupStats", "aggregate", "normalizers", "masked_sum", "masked_mean", "masked_var",
    "masked_whiten", "kl_estimate", "entropy_from_logits", "clean_rewards", "group_stats",
    "log_ratio", "clipped_policy_loss", "rollout_weights", "policy_loss", "surrogate", "last_token_index", "token_rewards", "gae",
    "reward_variance", "select_groups", "keep_all", "check_choice",
]

log = logging.getLogger(__name__)

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")  # Schulman's estimators of KL(pi || pi_ref)
RATIO_LEVELS = ("token", "sequence", "sequence-token")  # PPO/GRPO, GSPO, GSPO-token
SELECTIONS = ("none", "dynamic", "duplicate", "ranked")  # GRPO identity, DAPO refill, DUPO duplicate-fill, top spread
CORRECTIONS = ("off", "token-truncate", "token-mask", "sequence-truncate", "sequence-mask")  # rollout_weights

_LOG_RATIO_CLAMP = 20.0  # |log rho| cap before exp (verl and OpenRLHF): ratios past e^20 are noise
_K3_OUT_CLAMP = 10.0  # verl clamps the k3 value to +-10 (kl_penalty_forward, "low_var_kl")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise a ValueError naming the field and the valid values when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class Needs:
    """Which tensors the driver must compute before `advantages` / `loss` (Experience field names)."""

    old_logprobs: bool = True  # behaviour-policy logprobs even on-policy (a KL in the reward uses them);
    # the driver computes them anyway whenever updates are off-policy (epochs or minibatches > 1)
    ref_logprobs: bool = False  # reference-policy logprobs (KL in the reward or in the loss)
    values: bool = False  # critic values (PPO): the critic learner must exist


@dataclass
class Selection:
    """What `algorithm.select(groups, ...)` returns: the kept groups and whether to generate more."""

    groups: list[list[Sample]]  # kept groups in order; the training batch once `need == 0`
    need: int = 0  # kept groups still missing: generate at least this many more prompt groups
    metrics: dict[str, float] = field(default_factory=dict)  # zero_std_frac, duplicated_frac, ...


# --------------------------------------------------------------------------------------------------
# Reduction and masked statistics
# --------------------------------------------------------------------------------------------------


def _bool(mask: Tensor) -> Tensor:
    """Any 0/1 mask (bool, int or float) as bool."""
    return mask if mask.dtype == torch.bool else mask != 0


def _at_least_one(n: float | Tensor) -> float | Tensor:
    """A denominator floored at 1 (an all-masked batch gives loss 0, not NaN); no GPU sync."""
    return n.clamp(min=1) if isinstance(n, Tensor) else max(float(n), 1.0)


def normalizers(action_mask: Tensor) -> dict[str, int]:
    """Global denominators of a minibatch, for `aggregate(..., num_tokens=, num_seqs=)`.

    num_tokens: masked tokens (token-mean); num_seqs: sequences with at least one masked token
    (the seq-mean modes skip empty rows, as verl does).
    """
    m = _bool(action_mask)  # (B, T)
    return {"num_tokens": int(m.sum()), "num_seqs": int(m.any(-1).sum())}


def aggregate(per_token: Tensor, mask: Tensor, mode: str, loss_scale_factor: float | None = None,
              num_tokens: float | Tensor | None = None, num_seqs: float | Tensor | None = None) -> Tensor:
    """Reduce a per-token matrix to a scalar (verl `agg_loss`, ALGORITHMS.md section 0).

    token-mean:              sum L*M / sum M                  (or / num_tokens)
    seq-mean-token-mean:     mean_i (sum_t L*M / sum_t M)     over rows with a token (or / num_seqs)
    seq-mean-token-sum:      mean_i sum_t L*M                 over rows with a token (or / num_seqs)
    seq-mean-token-sum-norm: sum L*M / C, C = loss_scale_factor or T, with no 1/B (verl's Dr. GRPO;
                             the paper and TRL `dr_grpo` also divide by B: use C = B * L_max).
    Masked positions are never read (torch.where), so padding may hold any value, even NaN.
    `num_tokens` / `num_seqs` replace the local counts: see the module docstring on micro-batches.
    """
    check_choice("loss_agg", mode, LOSS_AGG_MODES)
    m = _bool(mask)  # (B, T)
    x = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "token-mean":
        return x.sum() / _at_least_one(m.sum() if num_tokens is None else num_tokens)
    if mode == "seq-mean-token-sum-norm":
        c = per_token.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return x.sum() / c
    seq = x.sum(-1)  # (B,)
    tokens = m.sum(-1)  # (B,)
    if mode == "seq-mean-token-mean":
        seq = seq / tokens.clamp(min=1)  # (B,) empty rows give 0 and are not counted below
    return seq.sum() / _at_least_one((tokens > 0).sum() if num_seqs is None else num_seqs)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is set (padding never read)."""
    x = torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` where `mask` is set; 0 where nothing is set."""
    count = _bool(mask).sum() if dim is None else _bool(mask).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of `x` (Bessel-corrected by default, as verl and TRL)."""
    mean = masked_mean(x, mask)
    n = _bool(mask).sum()
    ss = masked_sum((x - mean) ** 2, mask)
    return ss / (n - 1).clamp(min=1) if unbiased else ss / n.clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (verl `masked_whiten`); 0 off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps) if shift_mean else x * torch.rsqrt(var + eps)
    return torch.where(_bool(mask), out, torch.zeros((), dtype=x.dtype, device=x.device))


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token logprobs (B, T) -> (B, T).

    With l = logprobs - ref_logprobs: k1 = l, k2 = l^2 / 2, k3 = exp(-l) - 1 + l (unbiased and
    non-negative; DeepSeekMath's GRPO KL). k3 clamps -l to +-20 and its value to +-10 like verl's
    `low_var_kl`, so one absurd token cannot blow up the loss.
    """
    check_choice("kl_estimator", kind, KL_ESTIMATORS)
    diff = logprobs - ref_logprobs  # (B, T)
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    neg = (-diff).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # (B, T) log(pi_ref / pi)
    return (neg.exp() - neg - 1.0).clamp(-_K3_OUT_CLAMP, _K3_OUT_CLAMP)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dimension: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------------------------------
# Rewards and group statistics
# --------------------------------------------------------------------------------------------------


def clean_rewards(rewards: Tensor, scored: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(rewards with unscored rows set to 0, scored mask): a NaN reward also counts as unscored."""
    ok = torch.isfinite(rewards)  # (B,)
    if scored is not None:
        ok = ok & _bool(scored)
    return torch.where(ok, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device)), ok


@dataclass
class GroupStats:
    """Statistics of each row's group over its scored rows, broadcast back to rows: all (B,)."""

    mean: Tensor  # (B,) group mean of the scored rewards
    std: Tensor  # (B,) unbiased group std (0 for a single scored row)
    count: Tensor  # (B,) number of scored rows in the group
    constant: Tensor  # (B,) bool: every scored reward of the group is equal (zero variance)


def group_stats(rewards: Tensor, group_ids: Tensor, scored: Tensor) -> GroupStats:
    """Per-group mean / unbiased std / count of the scored rewards (B,), looked up per row."""
    _, inv = torch.unique(group_ids, return_inverse=True)  # (B,) group index of each row
    g = int(inv.max()) + 1 if inv.numel() else 0
    w = scored.to(rewards.dtype)  # (B,)
    zeros = torch.zeros(g, dtype=rewards.dtype, device=rewards.device)  # (G,)
    count = zeros.index_add(0, inv, w)  # (G,)
    mean = zeros.index_add(0, inv, rewards * w) / count.clamp(min=1)  # (G,)
    ss = zeros.index_add(0, inv, (rewards - mean[inv]).square() * w)  # (G,)
    std = (ss / (count - 1).clamp(min=1)).sqrt()  # (G,) Bessel, as TRL / verl / OpenRLHF
    # Equality of max and min, not std == 0: the mean of equal floats (0.1, 0.1, 0.1) is not exact.
    s = scored.nonzero().squeeze(-1)  # (S,) scored rows
    hi = zeros.scatter_reduce(0, inv[s], rewards[s], reduce="amax", include_self=False)  # (G,)
    lo = zeros.scatter_reduce(0, inv[s], rewards[s], reduce="amin", include_self=False)  # (G,)
    return GroupStats(mean=mean[inv], std=std[inv], count=count[inv], constant=(hi == lo)[inv])


def reward_variance(group: Sequence[Sample], metric: str = "reward") -> bool:
    """True when the scored rewards of one prompt's group differ (the group carries a signal);
    `metric` = "reward" (the combined reward) or a reward function's name."""
    return len(set(_values(group, metric))) > 1


# --------------------------------------------------------------------------------------------------
# The clipped policy-gradient term (PPO, GRPO, DAPO, GSPO, DUPO, RLOO, REINFORCE++)
# --------------------------------------------------------------------------------------------------


def log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log of the importance ratio per token (B, T) at the given level.

    token:          lp - lp_old                                         (PPO / GRPO)
    sequence:       (1/|y|) sum_t (lp - lp_old), the same for every token (GSPO, 2507.18071)
    sequence-token: sg[log s_i] + lp - sg[lp]: the value of GSPO, a per-token gradient (GSPO-token)
    """
    check_choice("ratio_level", level, RATIO_LEVELS)
    tok = torch.where(_bool(mask), logprobs - old_logprobs, torch.zeros((), dtype=logprobs.dtype,
                                                                        device=logprobs.device))
    if level == "token":
        return tok  # (B, T)
    seq = masked_mean(tok, mask, dim=-1).unsqueeze(-1)  # (B, 1) log s_i
    if level == "sequence":
        return seq.expand_as(tok)  # (B, T)
    return seq.detach() + logprobs - logprobs.detach()  # (B, T)


def clipped_policy_loss(log_rho: Tensor, advantages: Tensor, mask: Tensor, clip_low: float,
                        clip_high: float, dual_clip: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate L = max(-A rho, -A clip(rho, 1-clip_low, 1+clip_high)) (B, T).

    log rho is clamped to +-20 (verl, OpenRLHF). Dual-clip (Ye et al. 2020, verl `clip_ratio_c`):
    where A < 0, L = min(L, -c A), so a huge ratio on a bad token cannot give an unbounded loss.
    Metrics are 0-dim tensors (masked token means); `policy_loss` turns them into floats.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    rho = log_rho.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()  # (B, T)
    unclipped = -adv * rho  # (B, T)
    clipped = -adv * rho.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    loss = torch.maximum(unclipped, clipped)  # (B, T)
    with torch.no_grad():
        r, a = rho.detach(), adv.detach().expand_as(rho)
        metrics = {  # TRL's definitions: tokens whose gradient the clip removed
            "clip_frac_low": masked_mean(((r < 1.0 - clip_low) & (a < 0)).float(), mask),
            "clip_frac_high": masked_mean(((r > 1.0 + clip_high) & (a > 0)).float(), mask),
            "ratio_mean": masked_mean(r, mask),
            "ratio_max": torch.where(_bool(mask), r, torch.zeros_like(r)).max() if r.numel() else r.sum(),
        }
    if dual_clip is not None:
        capped = torch.minimum(loss, -adv * dual_clip)  # (B, T)
        neg = (adv < 0).expand_as(loss)  # (B, T)
        with torch.no_grad():
            metrics["dual_clip_frac"] = masked_mean((neg & (capped < loss)).float(), mask)
        loss = torch.where(neg, capped, loss)
    return loss, metrics


def rollout_weights(old_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, mode: str,
                    cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights (B, T) that correct for the rollout engine's numerics differing from the
    learner's: w = pi_old / mu, with pi_old the learner's behaviour log-probs and mu the engine's
    (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training";
    TRL `vllm_importance_sampling_correction`, verl `rollout_correction`). Detached.

    token-truncate (TIS):  w_t = min(pi_old_t / mu_t, cap)
    token-mask (MIS):      w_t = pi_old_t / mu_t where it is <= cap, else 0 (the token is dropped)
    sequence-truncate:     w_i = min(prod_t pi_old_t / mu_t, cap), the same for every token of row i
    sequence-mask:         w_i = prod_t pi_old_t / mu_t where it is <= cap, else 0 (the row is dropped)
    Also returns the mismatch metrics: mean |log pi_old - log mu| and KL(mu || pi_old) (k3, from
    the engine's own samples).
    """
    check_choice("rollout_correction", mode, CORRECTIONS)
    with torch.no_grad():
        zero = torch.zeros((), dtype=old_logprobs.dtype, device=old_logprobs.device)
        diff = torch.where(mask, old_logprobs.detach() - engine_logprobs, zero)  # (B, T) log(pi_old / mu)
        metrics = {"rollout/logprob_diff_abs": masked_mean(diff.abs(), mask),
                   "rollout/kl_engine_learner": masked_mean(kl_estimate(engine_logprobs, old_logprobs.detach(), "k3"), mask)}
        if mode == "off":
            return torch.ones_like(diff), metrics
        level, how = mode.split("-")
        log_w = diff if level == "token" else diff.sum(-1, keepdim=True).expand_as(diff)  # (B, T)
        w = log_w.clamp(max=_LOG_RATIO_CLAMP).exp()  # (B, T)
        over = w > cap
        w = w.clamp(max=cap) if how == "truncate" else torch.where(over, torch.zeros_like(w), w)
        metrics["rollout/is_weight_mean"] = masked_mean(w, mask)
        metrics["rollout/is_capped_frac"] = masked_mean(over.float(), mask)
    return w, metrics


def policy_loss(*, logprobs: Tensor, advantages: Tensor, action_mask: Tensor, clip_low: float, clip_high: float, dual_clip: float | None,
                ratio_level: str, loss_agg: str, loss_scale_factor: float | None, kl_coef: float,
                kl_estimator: str, old_logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None,
                num_tokens: float | None = None, num_seqs: float | None = None, engine_logprobs: Tensor | None = None, rollout_correction: str = "off",
                correction_cap: float = 2.0, entropy: Tensor | None = None, entropy_coef: float = 0.0
                ) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy gradient plus kl_coef * KL(pi || pi_ref) as a loss, both reduced by `loss_agg`,
    minus `entropy_coef` times the (B, T) token `entropy` reduced the same way (verl `entropy_coeff`,
    OpenRLHF `entropy_loss_coef`: a bonus that keeps the policy from collapsing onto one answer).

    verl aggregates the KL term separately with the same mode; TRL adds it per token first: the two
    are equal because `aggregate` is linear. `old_logprobs=None` means on-policy (ratio exactly 1).
    With `kl_coef == 0` a given `ref_logprobs` is still measured (metric `kl`) but adds no gradient.
    With the engine's `engine_logprobs`, the engine/learner mismatch is measured and the policy
    term's tokens are weighted by `rollout_weights(..., rollout_correction, correction_cap)`.
    """
    mask = _bool(action_mask)  # (B, T)
    old = logprobs.detach() if old_logprobs is None else old_logprobs  # (B, T)
    lr = log_ratio(logprobs, old, mask, ratio_level)  # (B, T)
    per_token, m = clipped_policy_loss(lr, advantages, mask, clip_low, clip_high, dual_clip)  # (B, T)
    if engine_logprobs is not None:
        w, wm = rollout_weights(old, engine_logprobs, mask, rollout_correction, correction_cap)  # (B, T)
        per_token = per_token * w
        m.update(wm)
    agg = dict(mode=loss_agg, loss_scale_factor=loss_scale_factor, num_tokens=num_tokens, num_seqs=num_seqs)
    pg = aggregate(per_token, mask, **agg)
    loss = pg
    metrics = {k: float(v) for k, v in m.items()}
    metrics["pg_loss"] = float(pg.detach())
    with torch.no_grad():  # how far the policy moved since the rollout (k3 of the old policy)
        metrics["approx_kl_old"] = float(masked_mean(kl_estimate(old, logprobs.detach(), "k3"), mask))
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs (the driver computes them when "
                         "algorithm.needs.ref_logprobs is True)")
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs, kl_estimator)  # (B, T)
        metrics["kl"] = float(masked_mean(kl.detach(), mask))
        if kl_coef > 0:
            loss = loss + kl_coef * aggregate(kl, mask, **agg)
    if entropy_coef > 0:
        if entropy is None or not entropy.requires_grad:
            raise ValueError(f"entropy_coef={entropy_coef} needs the differentiable token entropies "
                             "(the learner passes them when the algorithm's entropy_coef > 0)")
        loss = loss - entropy_coef * aggregate(entropy, mask, **agg)
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def surrogate(algo, fields: dict, kl_coef: float, ratio_level: str = "token") -> tuple[Tensor, dict[str, float]]:
    """`policy_loss` with `algo`'s clip and aggregation hyper-parameters over the Experience
    `fields` (logprobs, advantages, action_mask, old / ref / engine logprobs, counts, the run's
    rollout correction): the one place every algorithm's policy term is computed."""
    keys = ("old_logprobs", "ref_logprobs", "num_tokens", "num_seqs", "engine_logprobs", "rollout_correction",
            "correction_cap", "entropy")
    return policy_loss(
        logprobs=fields["logprobs"], advantages=fields["advantages"], action_mask=fields["action_mask"],
        clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip, ratio_level=ratio_level,
        loss_agg=algo.loss_agg, loss_scale_factor=algo.loss_scale_factor, kl_coef=kl_coef,
        entropy_coef=getattr(algo, "entropy_coef", 0.0),
        kl_estimator=algo.kl_estimator, **{k: fields[k] for k in keys if fields.get(k) is not None})


# --------------------------------------------------------------------------------------------------
# Token rewards (KL in the reward, score on the last token) and GAE: PPO and REINFORCE++
# --------------------------------------------------------------------------------------------------


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last masked-in token of every row (B,); 0 for an empty row."""
    m = _bool(mask)  # (B, T)
    pos = torch.arange(m.shape[-1], device=m.device).expand_as(m)  # (B, T)
    return torch.where(m, pos, torch.zeros_like(pos)).max(-1).values  # (B,)


def token_rewards(scores: Tensor, action_mask: Tensor, kl: Tensor | None = None,
                  kl_coef: float = 0.0) -> Tensor:
    """r_t = -kl_coef * kl_t on every completion token, + the score at the last one (B,) -> (B, T).

    InstructGPT-style shaping (verl `apply_kl_penalty`, OpenRLHF `compute_reward`); kl is usually
    k1 of the behaviour policy against the reference. 0 off the mask.
    """
    m = _bool(action_mask)  # (B, T)
    r = torch.zeros(m.shape, dtype=scores.dtype, device=scores.device)  # (B, T)
    if kl is not None and kl_coef != 0:
        r = torch.where(m, -kl_coef * kl.to(scores.dtype), r)
    rows = torch.arange(m.shape[0], device=m.device)
    last = last_token_index(m)  # (B,)
    has = m.any(-1)  # (B,) an empty row gets no score
    r[rows[has], last[has]] += scores[has]
    return r


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, arXiv 1506.02438) -> (advantages, returns).

    delta_t = r_t + gamma V_{t'} - V_t and A_t = delta_t + gamma lam A_{t'}, where t' is the next
    masked-in token (verl `compute_gae_advantage_return`: tokens off the mask, e.g. tool output,
    are skipped, and the value after the last token is 0). returns = A + V. Inputs (B, T); both
    outputs (B, T), 0 off the mask.
    """
    m = (mask != 0).to(values.dtype)  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    last_adv = torch.zeros_like(values[:, 0])  # (B,)
    out = torch.zeros_like(values)  # (B, T)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = delta + gamma * lam * last_adv  # (B,)
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        last_adv = torch.where(m[:, t] > 0, adv, last_adv)
        out[:, t] = adv
    on = m > 0  # (B, T) where, not a product: padding may hold NaN values
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(on, out, zero), torch.where(on, out + values, zero)


# --------------------------------------------------------------------------------------------------
# Batch selection over groups of samples: identity, DAPO dynamic sampling, DUPO duplicate-fill
# --------------------------------------------------------------------------------------------------


def _values(group: Sequence[Sample], metric: str) -> list[float]:
    """The group's finite values of `metric`: "reward" (the combined reward) or a reward function's name."""
    vals = [s.reward if metric == "reward" else s.reward_components.get(metric) for s in group]
    return [v for v in vals if v is not None and math.isfinite(v)]


def spread(group: Sequence[Sample], metric: str = "reward") -> float:
    """Population std of `metric` over the group (0 for one value): a 0/1 accuracy's is largest at
    half right, where a group teaches most (its Bernoulli variance p(1-p))."""
    vals = _values(group, metric)
    return statistics.pstdev(vals) if len(vals) > 1 else 0.0


def _informative(group: Sequence[Sample], metric: str = "reward") -> bool:
    """DAPO's keep rule (verl dapo_ray_trainer, `filter_groups.metric`): `metric` varies, or the group holds one sample."""
    return len(group) == 1 or reward_variance(group, metric)


def _renumber(groups: list[list[Sample]]) -> list[list[Sample]]:
    """Give group k the id k: groups from several rounds, and duplicates, must not share an id,
    or the group statistics of the assembled batch would merge them. Samples are copied, not mutated."""
    return [[s if s.group_id == k else dataclasses.replace(s, group_id=k) for s in g]
            for k, g in enumerate(groups)]


def _select_dynamic(groups: list[list[Sample]], batch_groups: int, round: int, max_gen_rounds: int,
                    strict: bool, metric: str = "reward") -> Selection:
    """DAPO dynamic sampling (2503.14476; verl `recipe/dapo`). `groups` = every group generated in
    this step so far (the driver appends each round's groups): keep the informative ones in order
    and truncate the surplus. While groups are missing, ask for a whole fresh batch (verl generates
    `gen_batch_size` prompts a round, not the missing count: when most groups are uninformative, the
    batch fills in few rounds). After `max_gen_rounds` (> 0) the step trains on what it has (or on
    the last round's groups when none varies, whose advantages are all 0), logs
    `gen_rounds_exhausted`, and the run goes on; `strict` raises instead."""
    kept = [g for g in groups if _informative(g, metric)]
    dropped = len(groups) - len(kept)
    missing = max(batch_groups - len(kept), 0)
    exhausted = bool(missing) and 0 < max_gen_rounds <= round
    if exhausted and strict:
        raise RuntimeError(
            f"dynamic sampling: after {round} generation round(s) (max_gen_rounds={max_gen_rounds}) only "
            f"{len(kept)} of the {batch_groups} groups needed have rewards that differ ({dropped} of "
            f"{len(groups)} groups had zero reward variance). Raise max_gen_rounds (<= 0: unlimited), "
            "set strict_gen_rounds=false to train on what there is, or check that the reward can vary.")
    metrics = {"zero_std_frac": dropped / max(len(groups), 1), "kept_groups": float(len(kept)),
               "gen_rounds": float(round), "surplus_groups": float(max(len(kept) - batch_groups, 0)),
               "gen_rounds_exhausted": float(exhausted)}
    if exhausted:
        return Selection(groups=_renumber(kept or groups[-batch_groups:]), metrics=metrics)
    return Selection(groups=_renumber(kept[:batch_groups]), need=batch_groups if missing else 0, metrics=metrics)


def _select_duplicate(groups: list[list[Sample]], batch_groups: int, rng: random.Random,
                      metric: str = "reward") -> Selection:
    """DUPO (WebSailor, 2507.02592): drop zero-variance groups and fill the freed slots with random
    copies (with replacement) of whole kept groups, so the batch keeps its size with no generation.
    When no group varies, the batch is kept as it is: every advantage is 0 (only a KL term trains)."""
    kept = [g for g in groups if _informative(g, metric)]
    zero = len(groups) - len(kept)
    metrics = {"zero_std_frac": zero / max(len(groups), 1), "kept_groups": float(len(kept))}
    if not kept:
        log.warning("duplicate selection: none of the %d groups has reward variance; the batch is "
                    "kept as is and every advantage is 0", len(groups))
        metrics.update(duplicated_frac=0.0, all_zero_std=1.0)
        return Selection(groups=list(groups[:batch_groups]), metrics=metrics)
    kept = kept[:batch_groups]
    extra = rng.choices(kept, k=batch_groups - len(kept))  # whole groups, with replacement
    metrics.update(duplicated_frac=len(extra) / batch_groups, all_zero_std=0.0)
    return Selection(groups=_renumber(kept + extra), metrics=metrics)


def _select_ranked(groups: list[list[Sample]], batch_groups: int, metric: str) -> Selection:
    """Online difficulty filtering over an over-sampled round (`rollout.gen_prompts_per_step` >
    `prompts_per_step`, verl's gen_batch_size): keep the `batch_groups` groups whose `metric` varies
    most, ties broken by the combined reward's spread, in generation order. Unlike DAPO's refill it
    never generates another round, so a step's cost is fixed; while no group's `metric` varies (an
    accuracy still at 0) the combined reward's spread decides alone."""
    order = sorted(range(len(groups)), key=lambda k: (-spread(groups[k], metric), -spread(groups[k]), k))
    kept = [groups[k] for k in sorted(order[:batch_groups])]
    metrics = {"zero_std_frac": sum(not _informative(g) for g in groups) / max(len(groups), 1),
               "kept_groups": float(len(kept)),
               "kept_varied_frac": sum(spread(g, metric) > 0 for g in kept) / max(len(kept), 1),
               "dropped_varied_frac": sum(spread(groups[k], metric) > 0 for k in order[batch_groups:])
               / max(len(groups) - len(kept), 1)}
    return Selection(groups=_renumber(kept), need=max(batch_groups - len(groups), 0), metrics=metrics)


def keep_all(groups: list[list[Sample]], batch_groups: int | None = None, round: int = 1) -> Selection:
    """The identity selection: every generated group trains (PPO, RLOO, REINFORCE++, plain GRPO)."""
    return Selection(groups=list(groups))


def select_groups(groups: list[list[Sample]], mode: str, batch_groups: int | None = None, round: int = 1,
                  max_gen_rounds: int = 10, rng: random.Random | None = None, strict: bool = False,
                  metric: str = "reward") -> Selection:
    """Dispatch on the selection mode ("none" | "dynamic" | "duplicate" | "ranked"); `batch_groups`
    defaults to len(groups); `metric` is what must vary in a kept group ("reward" or a reward
    function's name). "none" returns the groups untouched (plus the zero-variance fraction as a metric)."""
    check_choice("selection", mode, SELECTIONS)
    groups = [g for g in groups if len(g)]
    n = len(groups) if batch_groups is None else batch_groups
    if n <= 0:
        raise ValueError(f"batch_groups must be positive, got {n}")
    if mode == "dynamic":
        return _select_dynamic(groups, n, round, max_gen_rounds, strict, metric)
    if mode == "duplicate":
        return _select_duplicate(groups, n, rng if rng is not None else random.Random(0), metric)
    if mode == "ranked":
        return _select_ranked(groups, n, metric)
    zero = sum(not _informative(g) for g in groups)
    return Selection(groups=groups, metrics={"zero_std_frac": zero / max(len(groups), 1)})
