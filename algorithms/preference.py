"""Preference losses over summed sequence log-probabilities: DPO (+ IPO, cDPO, robust, hinge), ORPO,
SimPO, KTO, and the Bradley-Terry reward-model loss.

Unlike the RL losses (GRPO, PPO), which reduce a per-token matrix with `aggregate`, every loss here
works on one number per sequence: the completion log-probability summed over completion tokens
(the prompt is masked), shape (B,). Length-normalised losses (IPO in TRL's form, ORPO, SimPO) also
take the number of completion tokens, `chosen_lengths` / `rejected_lengths` (B,), and divide.

The pairwise losses (DPO, ORPO, SimPO) share one keyword signature, so one call site serves the
family; each ignores the inputs it does not use (its docstring says which). KTO is unpaired: it
takes one completion per row with a desirable/undesirable label. Each class says which it is in
`pairwise`, and `preference_names()` reads the registry for them: the one list of preference
algorithms that the offline stage and online pairs in `align rl` accept.

Formulas and their sources: /work/shared/ALGORITHMS.md sections 6-9; TRL <= 0.28 `DPOTrainer.dpo_loss`,
`ORPOTrainer.odds_ratio_loss`, `CPOTrainer.cpo_loss`, `KTOTrainer.kto_loss`, `RewardTrainer.compute_loss`.
Every metric is a Python float (a batch mean), so it can go straight into metrics.jsonl.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from algorithms.registry import get_class, names, register

__all__ = ["DPO", "ORPO", "SimPO", "KTO", "bradley_terry_loss", "log1mexp", "preference_names"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # the `loss_type` values DPO accepts

# ORPO needs log(1 - p) of a mean token probability p = exp(avg logp); avg logp == 0 (every token
# certain) would make it -inf, so the average is clamped just below 0 (the gradient is 0 there).
_LOG1MEXP_MAX = -1e-7


# --------------------------------------------------------------------------------------------------
# Small shared helpers (kept local: algorithms/ modules do not import each other's internals).
# --------------------------------------------------------------------------------------------------


def _vector(name: str, t: Tensor, batch: int | None = None) -> Tensor:
    """`t` as a floating (B,) tensor (fp32 unless fp64); refuse other shapes, which would broadcast."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B,), got {type(t).__name__}")
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {batch}")
    return t if t.dtype == torch.float64 else t.float()


def _per_token(logps: Tensor, lengths: Tensor | None, name: str, why: str) -> Tensor:
    """Summed log-probabilities divided by completion lengths: the mean log-probability per token."""
    if lengths is None:
        raise ValueError(f"{why} needs {name}: the number of completion tokens per row, shape (B,)")
    n = _vector(name, lengths, logps.shape[0]).to(logps.dtype).clamp(min=1.0)  # (B,) no 0-division
    return logps / n  # (B,)


def _pair_metrics(loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                  chosen_logps: Tensor, rejected_logps: Tensor) -> dict[str, float]:
    """The metrics every pairwise loss reports (TRL's names), as batch means."""
    return {
        "loss": loss.item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": chosen_logps.detach().mean().item(),
        "logps/rejected": rejected_logps.detach().mean().item(),
    }


def _check_label_smoothing(eps: float, upper_open: bool) -> None:
    """0 <= eps <= 0.5 (eps < 0.5 when the loss divides by 1 - 2 eps)."""
    if not 0.0 <= eps <= 0.5 or (upper_open and eps == 0.5):
        bound = "0 <= label_smoothing < 0.5" if upper_open else "0 <= label_smoothing <= 0.5"
        raise ValueError(f"label_smoothing={eps} is out of range: need {bound}")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012, "Accurately computing
    log(1-exp(-|a|))").

    Near 0 use log(-expm1(x)); below -log 2 use log1p(-exp(x)). Half precision is computed in fp32,
    and x is clamped to <= -1e-7, where exp(x) < 1 in fp32: both branches stay finite, so
    `torch.where` never multiplies an infinite gradient by 0 (which would give NaN).
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x.clamp(max=_LOG1MEXP_MAX)  # (B,)
    near_zero = x > -math.log(2.0)  # (B,) bool
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))  # (B,)


# --------------------------------------------------------------------------------------------------
# DPO and its loss types
# --------------------------------------------------------------------------------------------------


@register("dpo")
@dataclass
class DPO:
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) and its loss types.

    With h = [lp(y_w) - lp_ref(y_w)] - [lp(y_l) - lp_ref(y_l)] (summed completion log-probs):
      - sigmoid: -(1-eps) logsig(beta h) - eps logsig(-beta h). eps = `label_smoothing` > 0 is
        conservative DPO (cDPO, Mitchell 2023; analysed in arXiv 2403.00409). This follows TRL <= 0.28,
        whose sigmoid loss applies label smoothing; TRL >= 0.29 ignores it for sigmoid.
      - robust: [-(1-eps) logsig(beta h) + eps logsig(-beta h)] / (1 - 2 eps) (Chowdhury et al.,
        arXiv 2403.00409): an unbiased loss under preference-label flips with rate eps.
      - ipo: (h - 1/(2 beta))^2 (Azar et al., arXiv 2310.12036): regresses the margin to a finite
        target instead of pushing it to infinity. With `ipo_length_normalize` (default, TRL) every
        log-prob is first divided by its completion length; OpenRLHF's IPO uses the sums.
      - hinge: relu(1 - beta h) (SLiC, arXiv 2305.10425), as TRL writes it.
    `reference_free` sets the reference terms to 0 (the policy's own margin). `rpo_alpha` adds
    alpha * `chosen_nll` (RPO, arXiv 2404.19733; TRL's `rpo_alpha`).
    Implicit rewards beta (lp - lp_ref) are reported detached (for IPO with length normalisation, from
    the per-token log-probs, as TRL does). Sibling: SimPO drops the reference and adds a margin.
    """

    beta: float = 0.1  # inverse temperature; TRL and OpenRLHF CLI default 0.1
    loss_type: str = "sigmoid"  # one of DPO_LOSS_TYPES
    label_smoothing: float = 0.0  # eps: assumed rate of flipped labels (sigmoid = cDPO, robust)
    reference_free: bool = False  # True: lp_ref = 0, no reference model needed
    ipo_length_normalize: bool = True  # IPO on per-token mean log-probs (TRL); False = sums (OpenRLHF)
    rpo_alpha: float = 0.0  # weight of the chosen NLL added to the loss (0 = off)
    pairwise: ClassVar[bool] = True  # takes (chosen, rejected) pairs

    def __post_init__(self) -> None:
        if self.loss_type not in DPO_LOSS_TYPES:
            valid = ", ".join(DPO_LOSS_TYPES)
            raise ValueError(f"unknown DPO loss_type {self.loss_type!r}; valid: {valid}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        _check_label_smoothing(self.label_smoothing, upper_open=self.loss_type == "robust")
        if self.label_smoothing > 0 and self.loss_type in ("ipo", "hinge"):
            raise ValueError(f"label_smoothing applies to loss_type sigmoid or robust, "
                             f"not {self.loss_type!r}")

    @property
    def needs_reference(self) -> bool:
        """Whether the driver must compute reference log-probabilities."""
        return not self.reference_free

    def loss(self, *, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             chosen_nll: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Mean DPO loss over the batch. All log-probs are summed over completion tokens, (B,).

        `chosen_lengths` / `rejected_lengths` are used only by length-normalised IPO; `chosen_nll` (a
        scalar) only when `rpo_alpha` > 0.
        """
        pc = _vector("policy_chosen_logps", policy_chosen_logps)  # (B,)
        pr = _vector("policy_rejected_logps", policy_rejected_logps, pc.shape[0])  # (B,)
        if self.reference_free:
            rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)  # (B,)
        else:
            if ref_chosen_logps is None or ref_rejected_logps is None:
                raise ValueError("DPO needs ref_chosen_logps and ref_rejected_logps (or reference_free=True)")
            rc = _vector("ref_chosen_logps", ref_chosen_logps, pc.shape[0]).to(pc.dtype)  # (B,)
            rr = _vector("ref_rejected_logps", ref_rejected_logps, pc.shape[0]).to(pc.dtype)  # (B,)
        if self.loss_type == "ipo" and self.ipo_length_normalize:
            why = "loss_type='ipo' with ipo_length_normalize=True"
            pc, rc = (_per_token(t, chosen_lengths, "chosen_lengths", why) for t in (pc, rc))
            pr, rr = (_per_token(t, rejected_lengths, "rejected_lengths", why) for t in (pr, rr))
        h = (pc - rc) - (pr - rr)  # (B,) the policy's log-ratio margin over the reference's
        bh = self.beta * h  # (B,)
        eps = self.label_smoothing
        if self.loss_type == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(bh) - eps * F.logsigmoid(-bh)  # (B,)
        elif self.loss_type == "robust":
            losses = (-(1 - eps) * F.logsigmoid(bh) + eps * F.logsigmoid(-bh)) / (1 - 2 * eps)  # (B,)
        elif self.loss_type == "ipo":
            losses = (h - 1 / (2 * self.beta)) ** 2  # (B,)
        else:  # hinge
            losses = torch.relu(1 - bh)  # (B,)
        loss = losses.mean()
        if self.rpo_alpha > 0:
            if chosen_nll is None:
                raise ValueError("rpo_alpha > 0 needs chosen_nll (mean NLL of the chosen completions)")
            loss = loss + self.rpo_alpha * chosen_nll
        chosen_rewards = self.beta * (pc - rc).detach()  # (B,)
        rejected_rewards = self.beta * (pr - rr).detach()  # (B,)
        return loss, _pair_metrics(loss, chosen_rewards, rejected_rewards,
                                   policy_chosen_logps, policy_rejected_logps)


# --------------------------------------------------------------------------------------------------
# ORPO
# --------------------------------------------------------------------------------------------------


@register("orpo")
@dataclass
class ORPO:
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv 2403.07691): SFT and preference in one
    loss, with no reference model.

    P = exp(mean completion log-prob), logodds(y) = log P - log(1 - P) (log(1 - P) via `log1mexp`),
    L = NLL(y_w) - beta * mean logsig(logodds(y_w) - logodds(y_l)); `beta` is the paper's lambda.
    Sibling: DPO contrasts log-ratios against a reference; ORPO contrasts odds of the policy alone and
    keeps the SFT term.

    NLL: the paper's L_SFT is the chosen completion's NLL. Passing no `chosen_nll` uses exactly that,
    token-mean over the batch: -sum_i lp(y_w,i) / sum_i |y_w,i| (completion tokens only). TRL, for
    decoder-only models, takes the NLL over prompt + chosen tokens; pass that as `chosen_nll` for
    parity with TRL. Rewards reported are beta * mean log-prob per token, as in TRL.
    """

    beta: float = 0.1  # lambda, the weight of the odds-ratio term (TRL default 0.1, paper 0.1)
    needs_reference: ClassVar[bool] = False  # reference-free by design
    pairwise: ClassVar[bool] = True  # takes (chosen, rejected) pairs

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")

    def loss(self, *, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             chosen_nll: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """ORPO loss. Log-probs summed over completion tokens (B,), lengths (B,) required; the
        reference log-probs are ignored. `chosen_nll`: scalar mean NLL (see the class docstring)."""
        pc = _vector("policy_chosen_logps", policy_chosen_logps)  # (B,)
        pr = _vector("policy_rejected_logps", policy_rejected_logps, pc.shape[0])  # (B,)
        why = "ORPO (log-odds of the mean token probability)"
        avg_c = _per_token(pc, chosen_lengths, "chosen_lengths", why)  # (B,) log P(y_w)
        avg_r = _per_token(pr, rejected_lengths, "rejected_lengths", why)  # (B,) log P(y_l)
        log_odds = (avg_c - log1mexp(avg_c)) - (avg_r - log1mexp(avg_r))  # (B,) log odds ratio
        ratio = F.logsigmoid(log_odds)  # (B,)
        if chosen_nll is None:
            n_c = _vector("chosen_lengths", chosen_lengths, pc.shape[0]).to(pc.dtype)  # (B,)
            chosen_nll = -pc.sum() / n_c.sum().clamp(min=1.0)  # token-mean over the batch
        loss = chosen_nll - self.beta * ratio.mean()
        metrics = _pair_metrics(loss, self.beta * avg_c.detach(), self.beta * avg_r.detach(),
                                policy_chosen_logps, policy_rejected_logps)
        metrics.update({
            "nll_loss": float(chosen_nll.detach()),
            "log_odds_ratio": ratio.detach().mean().item(),  # TRL's name: mean logsig(log odds)
            "log_odds_chosen": log_odds.detach().mean().item(),
        })
        return loss, metrics


# --------------------------------------------------------------------------------------------------
# SimPO
# --------------------------------------------------------------------------------------------------


@register("simpo")
@dataclass
class SimPO:
    """Simple Preference Optimization (Meng et al. 2024, arXiv 2405.14734): a reference-free DPO whose
    implicit reward is the length-normalised log-prob, with a target margin gamma.

    L = -(1-eps) logsig(beta (lp_w/|y_w| - lp_l/|y_l|) - gamma) - eps logsig(-(...)); eps = 0 is the
    paper. Sibling: DPO uses summed log-ratios against a reference and no margin.

    Defaults: beta = 2.0, gamma = 1.0 (gamma/beta = 0.5). The paper works with beta in 2.0-2.5 (its
    README: "we used a small beta (e.g., 2.0 or 2.5)"); on per-token log-probs (about -1) TRL's CPO
    default beta = 0.1 leaves the sigmoid nearly flat. Naming: `gamma` is the absolute margin, as
    TRL's `simpo_gamma` (TRL default 0.5); the SimPO repository's configs instead give
    `gamma_beta_ratio`, so its beta = 2.5, ratio 0.55 is gamma = 1.375 here.
    """

    beta: float = 2.0  # reward scale on per-token mean log-probs
    gamma: float = 1.0  # target reward margin (TRL: simpo_gamma), not the gamma/beta ratio
    label_smoothing: float = 0.0  # eps, as in cDPO; the paper uses 0
    needs_reference: ClassVar[bool] = False  # reference-free by design
    pairwise: ClassVar[bool] = True  # takes (chosen, rejected) pairs

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        _check_label_smoothing(self.label_smoothing, upper_open=False)

    def loss(self, *, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor | None = None, ref_rejected_logps: Tensor | None = None,
             chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
             chosen_nll: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """SimPO loss. Log-probs summed over completion tokens (B,), lengths (B,) required; reference
        log-probs and `chosen_nll` are ignored. Rewards reported: beta * mean log-prob per token."""
        pc = _vector("policy_chosen_logps", policy_chosen_logps)  # (B,)
        pr = _vector("policy_rejected_logps", policy_rejected_logps, pc.shape[0])  # (B,)
        why = "SimPO (length-normalised reward)"
        chosen_rewards = self.beta * _per_token(pc, chosen_lengths, "chosen_lengths", why)  # (B,)
        rejected_rewards = self.beta * _per_token(pr, rejected_lengths, "rejected_lengths", why)  # (B,)
        z = chosen_rewards - rejected_rewards - self.gamma  # (B,)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)  # (B,)
        loss = losses.mean()
        return loss, _pair_metrics(loss, chosen_rewards.detach(), rejected_rewards.detach(),
                                   policy_chosen_logps, policy_rejected_logps)


# --------------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------------


@register("kto")
@dataclass
class KTO:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306): learns from unpaired
    completions labelled desirable or undesirable.

    r = lp - lp_ref (summed), z0 = max(0, mean(kl_logps - ref_kl_logps)) detached, estimated on
    mismatched (x, y') pairs. Per row: desirable w_D (1 - sig(beta (r - z0))), undesirable
    w_U (1 - sig(beta (z0 - r))); the loss is their mean over all B rows (TRL's concatenation).
    Sibling: DPO needs pairs and compares two completions of one prompt; KTO compares one completion
    with the reference point z0.

    Without `kl_logps` / `ref_kl_logps`, z0 = 0 (TRL's `calculate_KL=False`, also used by its APO
    variants): cheaper, but the reference point no longer tracks the policy's drift. TRL gathers
    the KL mean across ranks before clamping; in data parallel pass the gathered tensors.
    TRL warns unless w_D n_D / (w_U n_U) is in [1, 4/3] (paper, section 4.2); set the weights from
    your data's desirable/undesirable counts.
    """

    beta: float = 0.1  # inverse temperature (paper and TRL default)
    desirable_weight: float = 1.0  # lambda_D
    undesirable_weight: float = 1.0  # lambda_U
    needs_reference: ClassVar[bool] = True  # r is measured against the reference model
    pairwise: ClassVar[bool] = False  # takes single completions with a label

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("desirable_weight and undesirable_weight must be >= 0")

    def loss(self, *, policy_logps: Tensor, ref_logps: Tensor, labels: Tensor,
             kl_logps: Tensor | None = None, ref_kl_logps: Tensor | None = None,
             ) -> tuple[Tensor, dict[str, float]]:
        """KTO loss. `policy_logps`, `ref_logps`: summed completion log-probs (B,); `labels` (B,)
        bool, True = desirable; `kl_logps`, `ref_kl_logps` (K,): policy and reference log-probs of
        mismatched prompt/completion pairs, for z0 (both or neither)."""
        lp = _vector("policy_logps", policy_logps)  # (B,)
        ref = _vector("ref_logps", ref_logps, lp.shape[0]).to(lp.dtype)  # (B,)
        if labels.shape != lp.shape:
            raise ValueError(f"labels must have shape {tuple(lp.shape)}, got {tuple(labels.shape)}")
        desirable = labels.to(torch.bool)  # (B,)
        if (kl_logps is None) != (ref_kl_logps is None):
            raise ValueError("pass both kl_logps and ref_kl_logps, or neither (then z0 = 0)")
        if kl_logps is None:
            z0 = lp.new_zeros(())
        else:
            kl = _vector("kl_logps", kl_logps)  # (K,)
            kl_ref = _vector("ref_kl_logps", ref_kl_logps, kl.shape[0]).to(kl.dtype)  # (K,)
            z0 = (kl - kl_ref).mean().clamp(min=0).detach().to(lp.dtype)  # () reference point
        r = lp - ref  # (B,) implicit reward / beta
        losses = torch.where(
            desirable,
            self.desirable_weight * (1 - torch.sigmoid(self.beta * (r - z0))),
            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z0 - r))),
        )  # (B,)
        loss = losses.mean()
        rewards = self.beta * r.detach()  # (B,)
        metrics = {"loss": loss.item(), "kl": z0.item(),
                   "count/desirable": int(desirable.sum()), "count/undesirable": int((~desirable).sum())}
        # A batch may hold only one kind: its metrics are then left out rather than reported as 0.
        for kind, mask in (("chosen", desirable), ("rejected", ~desirable)):
            if mask.any():
                metrics[f"rewards/{kind}"] = rewards[mask].mean().item()
                metrics[f"logps/{kind}"] = lp.detach()[mask].mean().item()
        if desirable.any() and (~desirable).any():
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return loss, metrics


# --------------------------------------------------------------------------------------------------
# Which registered algorithms are preference losses
# --------------------------------------------------------------------------------------------------


def preference_names(pairwise: bool | None = None) -> list[str]:
    """Registered names of the losses over summed sequence log-probs, sorted (pairwise=True: pair losses only)."""
    # A class says what it is in `pairwise`; RL losses have no such attribute. Reading the registry
    # (not a list of strings) means a newly registered preference loss is accepted everywhere at once.
    kinds = (True, False) if pairwise is None else (pairwise,)
    return [n for n in names() if getattr(get_class(n), "pairwise", None) in kinds]


# --------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------


def _reward_vector(name: str, t: Tensor) -> Tensor:
    """A scalar-head output as (B,): accepts (B,) or (B, 1), the shape of a 1-label classifier head."""
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    return _vector(name, t)


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None,
                       center_coef: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Bradley-Terry pairwise reward-model loss (InstructGPT, arXiv 2203.02155; margin: Llama 2, 2307.09288).

    L = -mean logsig(r_w - r_l - m) + eta * mean((r_w + r_l)^2). `margin` m (B,) is the dataset's
    optional margin column; `center_coef` eta (TRL `center_rewards_coefficient`, recommended 0.01)
    pulls rewards towards zero mean, since the BT likelihood is blind to a shared offset.
    Rewards: the scalar head at the last token, (B,) or (B, 1). Metrics: loss, accuracy (r_w > r_l,
    ties count as wrong), margin = mean(r_w - r_l), rewards/chosen, rewards/rejected.
    """
    rw = _reward_vector("chosen_rewards", chosen_rewards)  # (B,)
    rl = _reward_vector("rejected_rewards", rejected_rewards)  # (B,)
    if rl.shape != rw.shape:
        raise ValueError(f"rejected_rewards has shape {tuple(rl.shape)}, chosen_rewards {tuple(rw.shape)}")
    diff = rw - rl  # (B,)
    if margin is not None:
        diff = diff - _vector("margin", margin, rw.shape[0]).to(rw.dtype)  # (B,)
    loss = -F.logsigmoid(diff).mean()
    if center_coef is not None:
        loss = loss + center_coef * ((rw + rl) ** 2).mean()
    gap = (rw - rl).detach()  # (B,)
    return loss, {
        "loss": loss.item(),
        "accuracy": (gap > 0).float().mean().item(),
        "margin": gap.mean().item(),
        "rewards/chosen": rw.detach().mean().item(),
        "rewards/rejected": rl.detach().mean().item(),
    }
