"""Preference losses (DPO family, ORPO, SimPO, KTO, Bradley-Terry) against hand computation.

Every expected value is written out with Python's `math` on explicit small numbers, independently of
the torch code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

import algorithms
from algorithms.preference import DPO, KTO, ORPO, SimPO, bradley_terry_loss, log1mexp, preference_names

torch.set_num_threads(1)


def logsig(x: float) -> float:
    """log(sigmoid(x)) in plain Python."""
    return math.log(1.0 / (1.0 + math.exp(-x)))


def sig(x: float) -> float:
    """sigmoid(x) in plain Python."""
    return 1.0 / (1.0 + math.exp(-x))


def t(*xs: float) -> torch.Tensor:
    """A float64 (B,) tensor."""
    return torch.tensor(xs, dtype=torch.float64)


# Two pairs of summed completion log-probs, shared by the DPO tests.
PC, PR, RC, RR = [-10.0, -20.0], [-14.0, -18.0], [-12.0, -19.0], [-13.0, -19.5]
H = [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)]  # [3.0, -2.5]


def dpo_inputs(**extra):
    """Keyword inputs for DPO.loss built from the shared numbers."""
    return dict(policy_chosen_logps=t(*PC), policy_rejected_logps=t(*PR),
                ref_chosen_logps=t(*RC), ref_rejected_logps=t(*RR), **extra)


# ---------------------------------------------------------------------------------------------- DPO


def test_dpo_sigmoid_matches_hand_value_and_metrics():
    beta = 0.1
    loss, m = algorithms.get("dpo", beta=beta).loss(**dpo_inputs())
    expected = sum(-logsig(beta * h) for h in H) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    rw = [beta * (PC[i] - RC[i]) for i in range(2)]  # [0.2, 0.0]
    rl = [beta * (PR[i] - RR[i]) for i in range(2)]  # [-0.1, 0.15]
    assert m["loss"] == pytest.approx(expected)
    assert m["rewards/chosen"] == pytest.approx(sum(rw) / 2)
    assert m["rewards/rejected"] == pytest.approx(sum(rl) / 2)
    assert m["rewards/margins"] == pytest.approx((rw[0] - rl[0] + rw[1] - rl[1]) / 2)
    assert m["rewards/accuracy"] == pytest.approx(0.5)  # row 0 right, row 1 wrong
    assert m["logps/chosen"] == pytest.approx(-15.0)
    assert m["logps/rejected"] == pytest.approx(-16.0)
    assert all(isinstance(v, float) for v in m.values())


def test_dpo_at_init_is_log2():
    """Policy == reference: h = 0, the loss is log 2 whatever beta."""
    x = t(-3.0, -7.0)
    loss, _ = DPO(beta=0.5).loss(policy_chosen_logps=x, policy_rejected_logps=x + 1,
                                 ref_chosen_logps=x, ref_rejected_logps=x + 1)
    assert loss.item() == pytest.approx(math.log(2.0))


def test_cdpo_label_smoothing():
    beta, eps = 0.1, 0.2
    loss, _ = DPO(beta=beta, label_smoothing=eps).loss(**dpo_inputs())
    expected = sum(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h) for h in H) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    plain, _ = DPO(beta=beta).loss(**dpo_inputs())
    assert loss.item() != pytest.approx(plain.item())


def test_robust_dpo():
    beta, eps = 0.5, 0.1
    loss, _ = DPO(beta=beta, loss_type="robust", label_smoothing=eps).loss(**dpo_inputs())
    expected = sum((-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps) for h in H) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO(loss_type="robust", label_smoothing=0.5)


def test_hinge_dpo_zero_past_margin():
    beta = 0.5  # beta*h = [1.5, -1.25]: row 0 is past the hinge, row 1 is not
    loss, _ = DPO(beta=beta, loss_type="hinge").loss(**dpo_inputs())
    assert loss.item() == pytest.approx((0.0 + (1 - beta * H[1])) / 2)


def test_ipo_length_normalised_and_summed():
    beta = 0.25
    lc, lr = [4.0, 5.0], [2.0, 8.0]
    inputs = dpo_inputs(chosen_lengths=torch.tensor([4, 5]), rejected_lengths=torch.tensor([2, 8]))
    loss, m = DPO(beta=beta, loss_type="ipo").loss(**inputs)
    hbar = [(PC[i] / lc[i] - RC[i] / lc[i]) - (PR[i] / lr[i] - RR[i] / lr[i]) for i in range(2)]
    assert loss.item() == pytest.approx(sum((h - 1 / (2 * beta)) ** 2 for h in hbar) / 2, rel=1e-12)
    # rewards come from the same per-token log-probs (TRL)
    assert m["rewards/chosen"] == pytest.approx(sum(beta * (PC[i] - RC[i]) / lc[i] for i in range(2)) / 2)
    summed, _ = DPO(beta=beta, loss_type="ipo", ipo_length_normalize=False).loss(**inputs)
    assert summed.item() == pytest.approx(sum((h - 1 / (2 * beta)) ** 2 for h in H) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="chosen_lengths"):
        DPO(loss_type="ipo").loss(**dpo_inputs())


def test_reference_free_dpo_ignores_reference():
    beta = 0.1
    algo = DPO(beta=beta, reference_free=True)
    assert algo.needs_reference is False and DPO().needs_reference is True
    loss, m = algo.loss(policy_chosen_logps=t(*PC), policy_rejected_logps=t(*PR))
    expected = sum(-logsig(beta * (PC[i] - PR[i])) for i in range(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert m["rewards/chosen"] == pytest.approx(beta * sum(PC) / 2)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        DPO().loss(policy_chosen_logps=t(*PC), policy_rejected_logps=t(*PR))


def test_rpo_alpha_adds_chosen_nll():
    base, _ = DPO().loss(**dpo_inputs())
    loss, _ = DPO(rpo_alpha=0.5).loss(**dpo_inputs(chosen_nll=torch.tensor(2.0, dtype=torch.float64)))
    assert loss.item() == pytest.approx(base.item() + 1.0)


def test_dpo_gradient_direction_and_value():
    beta = 0.1
    pc = t(*PC).requires_grad_()
    loss, _ = DPO(beta=beta).loss(**{**dpo_inputs(), "policy_chosen_logps": pc})
    loss.backward()
    # dL/d lp_w = -beta * sigmoid(-beta h) / B
    for i in range(2):
        assert pc.grad[i].item() == pytest.approx(-beta * sig(-beta * H[i]) / 2, rel=1e-12)
    higher, _ = DPO(beta=beta).loss(**{**dpo_inputs(), "policy_chosen_logps": t(*PC) + 1.0})
    assert higher.item() < loss.item()


def test_dpo_upcasts_bf16_and_refuses_column_vectors():
    loss16, _ = DPO().loss(**{k: v.to(torch.bfloat16) for k, v in dpo_inputs().items()})
    assert loss16.dtype == torch.float32
    bad = dpo_inputs()
    bad["ref_chosen_logps"] = bad["ref_chosen_logps"][:, None]  # (B, 1) would broadcast to (B, B)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        DPO().loss(**bad)


def test_unknown_loss_type_names_the_valid_ones():
    with pytest.raises(ValueError) as err:
        algorithms.get("dpo", loss_type="sigmoidd")
    for name in ("sigmoid", "ipo", "hinge", "robust", "sigmoidd"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPO(loss_type="ipo", label_smoothing=0.1)


def test_registry_names_and_defaults():
    for name in ("dpo", "orpo", "simpo", "kto"):
        assert name in algorithms.names()
    assert isinstance(algorithms.get("dpo"), DPO) and algorithms.get("dpo").beta == 0.1
    assert algorithms.get("orpo").beta == 0.1 and algorithms.get("orpo").needs_reference is False
    simpo = algorithms.get("simpo")
    assert (simpo.beta, simpo.gamma, simpo.needs_reference) == (2.0, 1.0, False)
    kto = algorithms.get("kto", desirable_weight=1.2)
    assert (kto.beta, kto.desirable_weight, kto.needs_reference) == (0.1, 1.2, True)


# --------------------------------------------------------------------------------------------- ORPO


def test_log1mexp_matches_math_and_is_stable():
    xs = [-1e-6, -1e-7, -0.3, -0.6931, -0.7, -2.0, -30.0]
    got = log1mexp(t(*xs))
    for g, x in zip(got.tolist(), xs):
        assert g == pytest.approx(math.log(-math.expm1(x)), rel=1e-9)
    # far below 0, log(1 - e^x) = -e^x - e^(2x)/2 - ...; the naive log(-expm1(x)) rounds to 0 there
    assert log1mexp(t(-40.0)).item() == pytest.approx(-math.exp(-40.0), rel=1e-12, abs=0)
    # just below 0, 1 - exp(x) cancels catastrophically; -expm1(x) = -x - x^2/2 does not
    assert log1mexp(t(-1e-7)).item() == pytest.approx(math.log(1e-7 - 0.5e-14), rel=1e-12, abs=0)
    for dtype in (torch.float32, torch.bfloat16):  # x = 0 (a certain sequence) is clamped, stays finite
        x = torch.tensor([0.0, -1e-12, -1e-7, -80.0], dtype=dtype, requires_grad=True)
        y = log1mexp(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_orpo_log_odds_on_known_probabilities():
    # mean token probabilities 0.8 (chosen, 4 tokens) and 0.4 (rejected, 3 tokens), and 0.5 / 0.5
    beta = 0.1
    pc = t(4 * math.log(0.8), 2 * math.log(0.5))
    pr = t(3 * math.log(0.4), 6 * math.log(0.5))
    lengths = dict(chosen_lengths=torch.tensor([4, 2]), rejected_lengths=torch.tensor([3, 6]))
    loss, m = ORPO(beta=beta).loss(policy_chosen_logps=pc, policy_rejected_logps=pr, **lengths)
    log_odds = [math.log(0.8 / 0.2) - math.log(0.4 / 0.6), 0.0]  # [log 6, 0]
    ratio = [math.log(6 / 7), math.log(0.5)]  # logsig(log 6) = log(6/7)
    assert [logsig(x) for x in log_odds] == pytest.approx(ratio)
    nll = -(4 * math.log(0.8) + 2 * math.log(0.5)) / 6  # token-mean over the chosen completions
    assert loss.item() == pytest.approx(nll - beta * sum(ratio) / 2, rel=1e-10)
    assert m["log_odds_chosen"] == pytest.approx(sum(log_odds) / 2, rel=1e-10)
    assert m["log_odds_ratio"] == pytest.approx(sum(ratio) / 2, rel=1e-10)
    assert m["nll_loss"] == pytest.approx(nll)
    assert m["rewards/chosen"] == pytest.approx(beta * (math.log(0.8) + math.log(0.5)) / 2)
    # a caller-supplied NLL (e.g. over prompt + chosen, TRL's choice) replaces the default
    given, m2 = ORPO(beta=beta).loss(policy_chosen_logps=pc, policy_rejected_logps=pr,
                                     chosen_nll=torch.tensor(1.5, dtype=torch.float64), **lengths)
    assert given.item() == pytest.approx(1.5 - beta * sum(ratio) / 2, rel=1e-10)
    assert m2["nll_loss"] == pytest.approx(1.5)


def test_orpo_needs_lengths_and_ignores_reference():
    args = dict(policy_chosen_logps=t(-2.0), policy_rejected_logps=t(-3.0))
    with pytest.raises(ValueError, match="chosen_lengths"):
        ORPO().loss(**args)
    lengths = dict(chosen_lengths=t(2.0), rejected_lengths=t(2.0))
    a, _ = ORPO().loss(**args, **lengths)
    b, _ = ORPO().loss(**args, **lengths, ref_chosen_logps=t(-9.0), ref_rejected_logps=t(-1.0))
    assert a.item() == b.item()


# -------------------------------------------------------------------------------------------- SimPO


def test_simpo_hand_value_margin_and_length_normalisation():
    beta, gamma = 2.0, 0.5
    pc, pr, lc, lr = [-6.0, -3.0], [-10.0, -2.0], [3.0, 3.0], [4.0, 1.0]
    lengths = dict(chosen_lengths=torch.tensor([3, 3]), rejected_lengths=torch.tensor([4, 1]))
    loss, m = SimPO(beta=beta, gamma=gamma).loss(policy_chosen_logps=t(*pc), policy_rejected_logps=t(*pr),
                                                 **lengths)
    z = [beta * pc[i] / lc[i] - beta * pr[i] / lr[i] - gamma for i in range(2)]  # [0.5, 1.5]
    assert loss.item() == pytest.approx(sum(-logsig(x) for x in z) / 2, rel=1e-12)
    assert m["rewards/chosen"] == pytest.approx(beta * (-2.0 - 1.0) / 2)
    assert m["rewards/accuracy"] == pytest.approx(1.0)  # rewards chosen [-4, -2] > rejected [-5, -4]
    # doubling a completion's length and its summed log-prob leaves the loss unchanged
    loss2, _ = SimPO(beta=beta, gamma=gamma).loss(
        policy_chosen_logps=t(-12.0, -3.0), policy_rejected_logps=t(*pr),
        chosen_lengths=torch.tensor([6, 3]), rejected_lengths=torch.tensor([4, 1]))
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    # the margin: a larger gamma raises the loss
    bigger, _ = SimPO(beta=beta, gamma=gamma + 1).loss(policy_chosen_logps=t(*pc),
                                                        policy_rejected_logps=t(*pr), **lengths)
    assert bigger.item() == pytest.approx(sum(-logsig(x - 1) for x in z) / 2, rel=1e-12)


def test_simpo_label_smoothing():
    beta, gamma, eps = 2.0, 1.0, 0.1
    loss, _ = SimPO(beta=beta, gamma=gamma, label_smoothing=eps).loss(
        policy_chosen_logps=t(-2.0), policy_rejected_logps=t(-6.0),
        chosen_lengths=t(2.0), rejected_lengths=t(3.0))
    z = beta * (-1.0) - beta * (-2.0) - gamma  # 1.0
    assert loss.item() == pytest.approx(-(1 - eps) * logsig(z) - eps * logsig(-z), rel=1e-12)


# ---------------------------------------------------------------------------------------------- KTO


LP, REF, LAB = [-5.0, -8.0, -4.0, -9.0], [-6.0, -7.0, -4.5, -8.0], [True, False, True, False]


def kto_hand(beta, z0, wd=1.0, wu=1.0):
    """Mean KTO loss over LP/REF/LAB written out in plain Python."""
    total = 0.0
    for lp, ref, good in zip(LP, REF, LAB):
        r = lp - ref
        total += wd * (1 - sig(beta * (r - z0))) if good else wu * (1 - sig(beta * (z0 - r)))
    return total / len(LP)


def test_kto_without_kl_uses_zero_reference_point():
    beta = 0.1
    loss, m = KTO(beta=beta).loss(policy_logps=t(*LP), ref_logps=t(*REF), labels=torch.tensor(LAB))
    assert loss.item() == pytest.approx(kto_hand(beta, 0.0), rel=1e-12)
    assert m["kl"] == 0.0
    assert m["rewards/chosen"] == pytest.approx(beta * ((-5 + 6) + (-4 + 4.5)) / 2)
    assert m["rewards/rejected"] == pytest.approx(beta * ((-8 + 7) + (-9 + 8)) / 2)
    assert m["count/desirable"] == 2


def test_kto_with_kl_and_weights():
    beta, wd, wu = 0.5, 1.5, 0.75
    kl_lp, kl_ref = t(-3.0, -5.0, -2.0), t(-4.0, -5.5, -2.0)  # mean diff = (1 + 0.5 + 0) / 3 = 0.5
    kl_lp.requires_grad_()
    lp = t(*LP).requires_grad_()
    loss, m = KTO(beta=beta, desirable_weight=wd, undesirable_weight=wu).loss(
        policy_logps=lp, ref_logps=t(*REF), labels=torch.tensor(LAB), kl_logps=kl_lp, ref_kl_logps=kl_ref)
    assert m["kl"] == pytest.approx(0.5)
    assert loss.item() == pytest.approx(kto_hand(beta, 0.5, wd, wu), rel=1e-12)
    loss.backward()
    assert kl_lp.grad is None  # z0 is detached
    assert lp.grad[0].item() < 0 and lp.grad[1].item() > 0  # push desirable up, undesirable down
    # a negative KL estimate is clamped to 0
    neg, m = KTO(beta=beta).loss(policy_logps=t(*LP), ref_logps=t(*REF), labels=torch.tensor(LAB),
                                 kl_logps=t(-6.0), ref_kl_logps=t(-5.0))
    assert m["kl"] == 0.0 and neg.item() == pytest.approx(kto_hand(beta, 0.0), rel=1e-12)


def test_kto_one_sided_batch_and_bad_kl_inputs():
    loss, m = KTO().loss(policy_logps=t(-1.0, -2.0), ref_logps=t(-1.0, -2.0),
                         labels=torch.tensor([True, True]))
    assert loss.item() == pytest.approx(0.5)  # r = 0: 1 - sigmoid(0)
    assert "rewards/rejected" not in m and "rewards/margins" not in m
    with pytest.raises(ValueError, match="both"):
        KTO().loss(policy_logps=t(-1.0), ref_logps=t(-1.0), labels=torch.tensor([True]), kl_logps=t(-1.0))


# ------------------------------------------------------------------------------------ Bradley-Terry


def test_bradley_terry_plain_margin_and_centering():
    rw, rl = [1.0, 0.5, -0.2], [0.0, 0.5, 0.3]
    loss, m = bradley_terry_loss(t(*rw), t(*rl))
    assert loss.item() == pytest.approx(sum(-logsig(a - b) for a, b in zip(rw, rl)) / 3, rel=1e-12)
    assert m["accuracy"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert m["margin"] == pytest.approx((1.0 + 0.0 - 0.5) / 3)
    mg = [0.5, 1.0, 0.0]
    loss, _ = bradley_terry_loss(t(*rw), t(*rl), margin=t(*mg), center_coef=0.01)
    expected = sum(-logsig(a - b - c) for a, b, c in zip(rw, rl, mg)) / 3
    expected += 0.01 * sum((a + b) ** 2 for a, b in zip(rw, rl)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_bradley_terry_accepts_head_shape_and_grads():
    rw = torch.tensor([[0.2], [0.1]], dtype=torch.float64, requires_grad=True)  # (B, 1) scalar head
    loss, _ = bradley_terry_loss(rw, t(0.0, 0.3), margin=t(0.0, 0.0))
    loss.backward()
    assert rw.grad[0, 0].item() == pytest.approx(-sig(-0.2) / 2, rel=1e-12)
    with pytest.raises(ValueError):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))


def test_online_pairs_select_best_and_worst_and_match_dpo():
    """Online pairs: best/worst of each group; loss = DPO on summed completion logprobs; two
    micro-batches (one pair each) add up to the loss of the whole minibatch."""
    import torch

    from algorithms.online_pairs import OnlinePairs
    from align.types import Sample

    def s(r, g):
        return Sample(prompt="p", prompt_ids=[1], completion="c", completion_ids=[2], group_id=g, reward=r)

    algo = OnlinePairs(algorithms.get("dpo", beta=0.5))
    groups = [[s(0.0, 0), s(1.0, 0), s(0.5, 0)], [s(1.0, 1), s(1.0, 1)], [s(None, 2), s(0.2, 2), s(0.1, 2)]]
    sel = algo.select(groups, 3)
    assert [[x.reward for x in g] for g in sel.groups] == [[1.0, 0.0], [0.2, 0.1]]
    assert sel.metrics["pair_frac"] == 2 / 3
    lp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -3.0, 0.0], [0.0, -0.5, -0.5], [0.0, -2.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5, -1.5], [0.0, -2.0, 0.0], [0.0, -1.0, -1.0], [0.0, -1.0, -1.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]])
    gid = torch.tensor([0, 0, 1, 1])
    loss, _ = algo.loss(logprobs=lp, action_mask=mask, group_ids=gid, ref_logprobs=ref, num_seqs=4)
    h = torch.tensor([(-3.0 + 3.0) - (-3.0 + 2.0), (-1.0 + 2.0) - (-3.0 + 2.0)])  # chosen - rejected margins
    want = -torch.nn.functional.logsigmoid(0.5 * h).mean()
    assert torch.allclose(loss, want)
    parts = sum(algo.loss(logprobs=lp[i:i + 2], action_mask=mask[i:i + 2], group_ids=gid[i:i + 2],
                          ref_logprobs=ref[i:i + 2], num_seqs=4)[0] for i in (0, 2))
    assert torch.allclose(parts, want)


def test_preference_names_come_from_the_registry():
    """One list of preference algorithms: the registered classes that say whether they are pairwise."""
    assert preference_names() == ["dpo", "kto", "orpo", "simpo"]
    assert preference_names(pairwise=True) == ["dpo", "orpo", "simpo"]  # what online pairs can train
    assert preference_names(pairwise=False) == ["kto"]
    assert all(algorithms.get_class(n).pairwise == (n != "kto") for n in preference_names())
    assert not set(preference_names()) & {"grpo", "ppo", "dapo", "rloo"}
