"""GRPO and the variants that differ from it only by fields: DAPO, GSPO, DUPO (and Dr. GRPO).

GRPO (DeepSeekMath, arXiv 2402.03300): sample G completions per prompt, score them, and use the
group z-score A_i = (r_i - mean r) / (std r + eps) as every token's advantage in a PPO-clipped
surrogate, with no critic; optionally beta * k3 KL to a reference as a loss term. Its nearest
sibling is PPO (ppo.py), which learns a critic and uses GAE instead of the group baseline.

Variants are registrations of the same class with other defaults, never copied branches:
- dapo  (2503.14476): clip-higher 0.2/0.28, token-mean, no KL, dynamic sampling (refill).
- gspo  (2507.18071): sequence-level ratio exp(mean_t log rho), clip 3e-4/4e-4, seq-mean-token-mean.
- dupo  (WebSailor, 2507.02592): GRPO + duplicate-fill selection, token-mean, clip-higher.
- Dr. GRPO (2503.20783) is a setting, not a name: scale_rewards="none",
  loss_agg="seq-mean-token-sum-norm", loss_scale_factor=<max new tokens>.
Fields compose: GSPO + DUPO is `algorithms.get("gspo", selection="duplicate")`.

Edge cases (ALGORITHMS.md section 2): a zero-variance group gets A = 0 (its tokens still count in
the denominators and still get the KL term); a row whose reward is None / NaN (`scored` False) is
left out of its group's statistics and gets A = 0; a group with one scored sample gets mean 0 and
std 1, so A = r (verl's rule, which DAPO's "keep groups of size 1" relies on).
"""
from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from algorithms.core import (LOSS_AGG_MODES, KL_ESTIMATORS, RATIO_LEVELS, SELECTIONS, Needs, Selection,
                             check_choice, clean_rewards, group_stats, masked_var, surrogate,
                             select_groups)
from algorithms.registry import register
from align.types import Sample

__all__ = ["GRPO", "DAPO", "GSPO", "DUPO", "group_advantages"]

SCALE_REWARDS = ("group", "batch", "none")  # TRL's `scale_rewards`; "none" is Dr. GRPO


def group_advantages(rewards: Tensor, group_ids: Tensor, scored: Tensor | None = None,
                     scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Group-baselined advantage per row (B,) -> (B,).

    group: (r - mean_g) / (std_g + eps); batch: (r - mean_g) / (std of all scored rewards + eps)
    (TRL scale_rewards="batch"); none: r - mean_g (Dr. GRPO). std is Bessel-corrected.
    """
    check_choice("scale_rewards", scale, SCALE_REWARDS)
    r, ok = clean_rewards(rewards, scored)  # (B,), (B,)
    st = group_stats(r, group_ids, ok)
    single = st.count == 1  # (B,) verl: mean 0, std 1 for a group of one
    centered = torch.where(single, r, r - st.mean)  # (B,)
    if scale == "group":
        std = torch.where(single, torch.ones_like(st.std), st.std)  # (B,)
        adv = centered / (std + eps)
    elif scale == "batch":
        one = torch.ones((), dtype=r.dtype, device=r.device)
        std = torch.where(ok.sum() > 1, masked_var(r, ok).sqrt(), one)  # a single scored row: std 1
        adv = centered / (std + eps)
    else:
        adv = centered
    zero = ~ok | (st.constant & ~single)  # (B,) unscored rows and zero-variance groups
    return torch.where(zero, torch.zeros_like(adv), adv)


@register("grpo")
@dataclass
class GRPO:
    """Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300): group z-score advantages,
    PPO-clipped token ratio, k3 KL as a loss, seq-mean-token-mean (the paper's 1/G sum 1/|o_i|)."""

    clip_low: float = 0.2  # ratio lower clip: 1 - clip_low
    clip_high: float = 0.2  # ratio upper clip: 1 + clip_high (DAPO's clip-higher raises it)
    kl_coef: float = 0.0  # beta of the KL loss; the paper used 0.04, TRL >= 0.19 defaults to 0
    kl_steps: int = 0  # > 0: the KL term (and its reference pass) only on the first kl_steps training steps
    kl_estimator: str = "k3"  # k1 | k2 | k3 (the paper's unbiased, non-negative k3)
    entropy_coef: float = 0.0  # entropy bonus weight in the loss (verl entropy_coeff, OpenRLHF entropy_loss_coef)
    loss_agg: str = "seq-mean-token-mean"  # see core.aggregate; the paper's per-sequence mean
    loss_scale_factor: float | None = None  # C of seq-mean-token-sum-norm (Dr. GRPO: max new tokens)
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO: no std division)
    std_eps: float = 1e-6  # added to the std: verl's 1e-6 (TRL 1e-4, OpenRLHF 1e-9)
    ratio_level: str = "token"  # token | sequence (GSPO) | sequence-token (GSPO-token)
    dual_clip: float | None = None  # c > 1: cap the loss at -c*A where A < 0 (None = off)
    selection: str = "none"  # none | dynamic (DAPO refill) | duplicate (DUPO fill) | ranked (top spread of an over-sampled round)
    # what must vary within a kept group: "reward" (the combined reward) or a reward function's
    # name (verl's filter_groups.metric, e.g. the accuracy's, so that format-only differences do not count)
    filter_metric: str = "reward"
    max_gen_rounds: int = 10  # dynamic selection: generation rounds per step, then train on what there is (<= 0: no cap)
    strict_gen_rounds: bool = False  # dynamic selection: raise instead when max_gen_rounds leaves the batch short
    seed: int = 0  # seeds the RNG of duplicate selection when the caller passes none
    _rng: random.Random = field(init=False, repr=False, compare=False)  # duplicate-selection RNG

    def __post_init__(self) -> None:
        check_choice("loss_agg", self.loss_agg, LOSS_AGG_MODES)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        check_choice("selection", self.selection, SELECTIONS)
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be None or > 1, got {self.dual_clip}")
        if self.kl_steps < 0:
            raise ValueError(f"kl_steps must be >= 0 (0 = the KL term on every step), got {self.kl_steps}")
        if self.kl_coef < 0 or self.std_eps < 0 or self.entropy_coef < 0:
            raise ValueError(f"kl_coef, std_eps and entropy_coef must be >= 0, got {self.kl_coef}, {self.std_eps}, "
                             f"{self.entropy_coef}")
        if self.ratio_level != "token" and self.loss_agg != "seq-mean-token-mean":
            warnings.warn(f"ratio_level={self.ratio_level!r} with loss_agg={self.loss_agg!r} weighs sequences "
                          "by length; GSPO averages per sequence (seq-mean-token-mean)", stacklevel=3)
        self._rng = random.Random(self.seed)

    @property
    def needs(self) -> Needs:
        """The reference only for a KL term; never a critic. Old logprobs only off-policy: on-policy the
        ratio is 1 and its gradient is that of logprobs, as with old = logprobs.detach() (TRL)."""
        return Needs(old_logprobs=False, ref_logprobs=self.kl_coef > 0, values=False)

    @property
    def zero_advantage_trains(self) -> bool:
        """Whether a row whose advantages are all 0 still has a gradient (a KL or entropy term in
        the loss); where not, the learner skips such rows (`align.learners.live_rows`)."""
        return self.kl_coef > 0 or self.entropy_coef > 0

    def for_step(self, step: int) -> "GRPO":
        """The algorithm for training step `step` (0-based): itself, or without its KL term once
        `kl_steps` steps have passed, so that later steps compute no reference log-probs and skip
        idle rows again. A pure function of the step, so a resumed run gets the same."""
        if self.kl_steps and step >= self.kl_steps and self.kl_coef:
            return dataclasses.replace(self, kl_coef=0.0)
        return self

    def select(self, groups: list[list[Sample]], batch_groups: int | None = None, round: int = 1,
               rng: random.Random | None = None) -> Selection:
        """Batch selection by `self.selection` (see core.select_groups): `groups` holds every group
        generated in this step so far, `round` counts the generation rounds (1 = the first); `rng`
        draws DUPO's duplicates (the RL driver seeds one per step, so a resumed run draws the same)."""
        return select_groups(groups, self.selection, batch_groups, round, self.max_gen_rounds,
                             rng if rng is not None else self._rng, self.strict_gen_rounds, self.filter_metric)

    def advantages(self, *, rewards: Tensor, group_ids: Tensor, scored: Tensor | None = None, **_) -> Tensor:
        """Group-baselined advantages (B,), broadcast over tokens by `loss`."""
        return group_advantages(rewards, group_ids, scored, self.scale_rewards, self.std_eps)

    def loss(self, **fields) -> tuple[Tensor, dict[str, float]]:
        """Clipped surrogate (+ kl_coef * KL) over the Experience fields: logprobs (B, T), advantages
        (B,) or (B, T), action_mask, and optionally old / ref / engine logprobs and `num_tokens` /
        `num_seqs` (the whole minibatch's counts when this is one micro-batch: core docs).
        Returns (scalar loss, metrics: loss, pg_loss, kl, clip_frac_low/high, ratio_mean, ...)."""
        return surrogate(self, fields, self.kl_coef, self.ratio_level)


@register("dapo")
@dataclass
class DAPO(GRPO):
    """DAPO (arXiv 2503.14476): GRPO with clip-higher (0.2 / 0.28), token-mean over all tokens of
    the batch, no KL, and dynamic sampling (drop zero-variance groups, generate more until the batch
    is full, at most `max_gen_rounds` rounds). Dual-clip c = 10 as in verl's DAPO recipe scripts.
    Its soft overlong punishment is a reward function (rewards/), summed before normalization."""

    clip_high: float = 0.28  # clip-higher: room for low-probability tokens to grow
    loss_agg: str = "token-mean"  # every token weighs the same: long answers are not diluted
    selection: str = "dynamic"  # refill the batch with groups whose rewards differ
    dual_clip: float | None = 10.0  # verl recipe/dapo clip_ratio_c


@register("gspo")
@dataclass
class GSPO(GRPO):
    """GSPO (arXiv 2507.18071): GRPO with the sequence-level ratio s_i = exp(mean_t log rho) and a
    tiny clip range (3e-4 / 4e-4, paper), averaged per sequence; no KL. It changes anything only
    off-policy (several minibatches per rollout). ratio_level="sequence-token" is GSPO-token."""

    clip_low: float = 3e-4  # paper's epsilon_left
    clip_high: float = 4e-4  # paper's epsilon_right
    ratio_level: str = "sequence"  # one ratio per sequence
    loss_agg: str = "seq-mean-token-mean"  # 1/G sum_i: verl forces it, TRL warns otherwise


@register("dupo")
@dataclass
class DUPO(GRPO):
    """DUPO (WebSailor, arXiv 2507.02592): GRPO where zero-variance groups are dropped and their slots
    filled by random copies of the batch's other groups (no extra generation, unlike DAPO), with
    token-level loss and clip-higher. A copied group keeps its advantages, so it weighs x2."""

    clip_high: float = 0.28  # clip-higher, as DAPO
    loss_agg: str = "token-mean"  # token-level policy gradient
    selection: str = "duplicate"  # duplicate-fill
