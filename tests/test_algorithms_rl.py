"""Online-RL algorithm objects against hand computation (plain-Python loops, explicit numbers) and
against each other (micro-batches vs one batch, GSPO vs GSPO-token, vectorised vs loop GAE)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

import algorithms
from algorithms.core import (aggregate, clipped_policy_loss, gae, kl_estimate, log_ratio, masked_whiten,
                             normalizers)
from algorithms.grpo import GRPO
from align.types import Sample

torch.set_num_threads(1)
D = torch.float64


def t(x) -> torch.Tensor:
    """A float64 tensor from nested lists."""
    return torch.tensor(x, dtype=D)


def sample(group_id: int, reward: float | None, tag: str = "") -> Sample:
    """A one-token sample of prompt `group_id` with the given reward."""
    return Sample(prompt=f"p{group_id}", prompt_ids=[1], completion=tag, completion_ids=[2],
                  group_id=group_id, reward=reward)


def group(group_id: int, rewards: list[float | None]) -> list[Sample]:
    """A prompt's group with one sample per reward; completions tagged with the group id."""
    return [sample(group_id, r, f"g{group_id}s{k}") for k, r in enumerate(rewards)]


# ------------------------------------------------------------------------------------------------
# aggregate, masked statistics, KL estimators
# ------------------------------------------------------------------------------------------------

NAN = float("nan")
PER_TOKEN = [[1.0, 2.0, 3.0], [4.0, NAN, 1e30], [7.0, 7.0, 7.0]]  # padding holds garbage
MASK = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]  # the third row is empty


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (1 + 2 + 4) / 3),
    ("seq-mean-token-mean", ((1 + 2) / 2 + 4 / 1) / 2),  # the empty row is not a sequence
    ("seq-mean-token-sum", ((1 + 2) + 4) / 2),
    ("seq-mean-token-sum-norm", (1 + 2 + 4) / 3),  # C = T = 3, no 1/B (verl)
])
def test_aggregate_modes_by_hand(mode, expected):
    out = aggregate(t(PER_TOKEN), torch.tensor(MASK), mode)
    assert out.item() == pytest.approx(expected, abs=1e-12)


def test_aggregate_scale_factor_global_counts_and_errors():
    x, m = t(PER_TOKEN), torch.tensor(MASK)
    assert aggregate(x, m, "seq-mean-token-sum-norm", loss_scale_factor=10).item() == pytest.approx(0.7)
    assert aggregate(x, m, "token-mean", num_tokens=14).item() == pytest.approx(7 / 14)
    assert aggregate(x, m, "seq-mean-token-mean", num_seqs=5).item() == pytest.approx(5.5 / 5)
    assert normalizers(m) == {"num_tokens": 3, "num_seqs": 2}
    assert aggregate(x, torch.zeros(3, 3), "token-mean").item() == 0.0  # no tokens: 0, not NaN
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate(x, m, "sum")


def test_masked_whiten_matches_statistics():
    x = t([[1.0, 5.0, 99.0], [2.0, 3.0, -99.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    vals = [1.0, 5.0, 2.0, 3.0]
    mu, var = statistics.mean(vals), statistics.variance(vals)  # unbiased
    out = masked_whiten(x, m)
    expected = [[(1 - mu) / math.sqrt(var + 1e-8), (5 - mu) / math.sqrt(var + 1e-8), 0.0],
                [(2 - mu) / math.sqrt(var + 1e-8), (3 - mu) / math.sqrt(var + 1e-8), 0.0]]
    assert torch.allclose(out, t(expected))


def test_kl_estimators_by_hand_and_k3_clamp():
    lp, ref = t([0.1, -0.5]), t([-0.2, 0.3])
    diffs = [0.1 - (-0.2), -0.5 - 0.3]
    assert torch.allclose(kl_estimate(lp, ref, "k1"), t(diffs))
    assert torch.allclose(kl_estimate(lp, ref, "k2"), t([0.5 * d * d for d in diffs]))
    assert torch.allclose(kl_estimate(lp, ref, "k3"), t([math.exp(-d) - 1 + d for d in diffs]))
    # verl low_var_kl: log-ratio clamped to +-20, value to +-10
    far = kl_estimate(t([50.0, -50.0, 0.0]), t([0.0, 0.0, 0.0]), "k3")
    assert far.tolist() == [10.0, 10.0, 0.0]
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(lp, ref, "k4")


# ------------------------------------------------------------------------------------------------
# GRPO advantages
# ------------------------------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    # group 0: varied; 1: equal (0.1 three times: the float mean is not exact); 2: one sample;
    # 3: a None reward (NaN, scored False) among two scored; 4: only unscored rows.
    rewards = t([1, 0, 0, 1, 0.1, 0.1, 0.1, 0.5, 2, NAN, 0, 7, 8])
    gids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 4])
    scored = torch.tensor([1] * 9 + [0, 1, 0, 0], dtype=torch.bool)
    eps = 1e-6
    s0 = statistics.stdev([1, 0, 0, 1])
    s3 = statistics.stdev([2, 0])
    expected = [0.5 / (s0 + eps), -0.5 / (s0 + eps), -0.5 / (s0 + eps), 0.5 / (s0 + eps),
                0.0, 0.0, 0.0,
                0.5 / (1 + eps),  # verl: a group of one has mean 0 and std 1
                1 / (s3 + eps), 0.0, -1 / (s3 + eps),
                0.0, 0.0]
    adv = algorithms.get("grpo").advantages(rewards=rewards, group_ids=gids, scored=scored)
    assert adv.shape == (13,)
    assert torch.allclose(adv, t(expected), atol=1e-12)
    assert adv[4:7].abs().max().item() == 0.0  # exactly 0, not 1e-11


def test_grpo_advantages_batch_and_none_scaling():
    rewards, gids = t([1, 0, 3, 3, 5]), torch.tensor([0, 0, 1, 1, 1])
    m0, m1 = 0.5, 11 / 3
    batch_std = statistics.stdev([1, 0, 3, 3, 5])
    none = algorithms.get("grpo", scale_rewards="none").advantages(rewards=rewards, group_ids=gids)
    assert torch.allclose(none, t([0.5, -0.5, 3 - m1, 3 - m1, 5 - m1]))  # Dr. GRPO: no std
    batch = algorithms.get("grpo", scale_rewards="batch").advantages(rewards=rewards, group_ids=gids)
    expected = [(r - m) / (batch_std + 1e-6) for r, m in [(1, m0), (0, m0), (3, m1), (3, m1), (5, m1)]]
    assert torch.allclose(batch, t(expected))
    lone = algorithms.get("grpo", scale_rewards="batch").advantages(rewards=t([3.0]), group_ids=torch.tensor([0]))
    assert lone.item() == pytest.approx(3 / (1 + 1e-6))  # one scored row: std 1, not 0


# ------------------------------------------------------------------------------------------------
# GRPO loss by hand, padding, micro-batches
# ------------------------------------------------------------------------------------------------

LP = [[-1.0, -0.5, -2.0], [-0.3, -0.9, 5.0], [-0.7, -1.1, -0.2]]
OLD = [[-1.2, -0.5, -1.0], [-0.1, -1.5, 0.0], [-0.6, -1.0, -0.4]]
REF = [[-0.9, -0.7, -1.5], [-0.2, -1.0, 3.0], [-0.7, -1.3, -0.1]]
LMASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
ADV = [1.5, -0.8, 0.0]  # the third row is a zero-variance group: A = 0, its tokens still count


def hand_grpo(mode: str, beta: float, lo: float, hi: float):
    """Loss and d loss / d lp by explicit loops over tokens."""
    rows = []  # per row: list of (loss term, gradient term) of its masked tokens
    for i in range(3):
        terms = []
        for j in range(3):
            if not LMASK[i][j]:
                continue
            a, lp, old, ref = ADV[i], LP[i][j], OLD[i][j], REF[i][j]
            rho = math.exp(lp - old)
            unclipped, clipped = -a * rho, -a * min(max(rho, 1 - lo), 1 + hi)
            pg = max(unclipped, clipped)
            g_pg = -a * rho if unclipped >= clipped else 0.0  # the clipped branch has no gradient
            kl = math.exp(ref - lp) - (ref - lp) - 1
            g_kl = 1 - math.exp(ref - lp)
            terms.append((pg + beta * kl, g_pg + beta * g_kl))
        rows.append(terms)
    grad = [[0.0] * 3 for _ in range(3)]
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        loss = sum(v for r in rows for v, _ in r) / n
        weights = [1 / n] * 3
    else:  # seq-mean-token-mean
        loss = sum(sum(v for v, _ in r) / len(r) for r in rows) / 3
        weights = [1 / (3 * len(r)) for r in rows]
    for i in range(3):
        cols = [j for j in range(3) if LMASK[i][j]]
        for j, (_, g) in zip(cols, rows[i]):
            grad[i][j] = g * weights[i]
    return loss, grad


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_grpo_loss_and_gradient_by_hand(mode):
    algo = algorithms.get("grpo", clip_low=0.2, clip_high=0.28, kl_coef=0.1, loss_agg=mode)
    lp = t(LP).requires_grad_()
    loss, metrics = algo.loss(logprobs=lp, old_logprobs=t(OLD), advantages=t(ADV),
                              action_mask=torch.tensor(LMASK), ref_logprobs=t(REF))
    loss.backward()
    want_loss, want_grad = hand_grpo(mode, 0.1, 0.2, 0.28)
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert torch.allclose(lp.grad, t(want_grad), atol=1e-12)
    # metrics by hand: rho of row 0 = [e^0.2, 1, e^-1] (A > 0): e^0.2 > 1.28? no. Row 1 (A < 0):
    # [e^-0.2 = 0.819, e^0.6] -> none below 0.8. So no clipping counted; 8 tokens.
    rhos = [math.exp(LP[i][j] - OLD[i][j]) for i in range(3) for j in range(3) if LMASK[i][j]]
    assert metrics["ratio_mean"] == pytest.approx(sum(rhos) / 8)
    assert metrics["clip_frac_low"] == 0.0 and metrics["clip_frac_high"] == 0.0
    kls = [math.exp(REF[i][j] - LP[i][j]) - (REF[i][j] - LP[i][j]) - 1
           for i in range(3) for j in range(3) if LMASK[i][j]]
    assert metrics["kl"] == pytest.approx(sum(kls) / 8)
    assert isinstance(metrics["pg_loss"], float)


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "ppo"])
def test_entropy_bonus_by_hand(name):
    """loss = pg - c * agg(H): with zero advantages the policy term is 0, so the loss is exactly
    -c * token-mean(H) and its gradient that of the entropy; the bonus makes idle rows train."""
    algo = algorithms.get(name, entropy_coef=0.1, kl_coef=0.0, loss_agg="token-mean")
    assert getattr(algo, "zero_advantage_trains", True)
    logits = torch.tensor([[[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], [[1.0, 3.0, -2.0], [0.3, 0.1, -0.4]]],
                          dtype=torch.float64, requires_grad=True)  # (B=2, T=2, V=3)
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1)  # (2, 2)
    lp = logp[..., 0]
    mask = torch.tensor([[1, 1], [1, 0]])
    fn = getattr(algo, "policy_loss", algo.loss)  # PPO's policy term (its `loss` adds the critic's)
    zero = torch.zeros(2, 2, dtype=torch.float64)
    loss, _ = fn(logprobs=lp, advantages=zero, action_mask=mask, entropy=ent)
    hand = [-(sum(math.exp(v) / sum(math.exp(u) for u in row) * math.log(math.exp(v) / sum(math.exp(u) for u in row))
                  for v in row)) for row in ([0.5, -1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 3.0, -2.0])]
    assert loss.item() == pytest.approx(-0.1 * sum(hand) / 3, abs=1e-12)
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (want,) = torch.autograd.grad(-0.1 * (ent * mask).sum() / 3, logits)
    assert torch.allclose(g, want) and g[1, 1].abs().max() == 0  # the padded token has no gradient
    with pytest.raises(ValueError, match="entropy_coef=0.1 needs the differentiable"):
        fn(logprobs=lp, advantages=zero, action_mask=mask)
    with pytest.raises(ValueError, match="entropy_coef"):
        algorithms.get(name, entropy_coef=-1.0)


def test_clip_fractions_by_hand():
    # A > 0 with rho = 1.5 > 1.28: high clip; A < 0 with rho = 0.5 < 0.8: low clip; two others not.
    log_rho = t([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.5)]])
    adv = t([[1.0, -1.0, 1.0, 1.0]])
    loss, m = clipped_policy_loss(log_rho, adv, torch.ones(1, 4), 0.2, 0.28)
    assert loss[0].tolist() == pytest.approx([-1.28, 0.8, -1.1, -0.5])
    assert m["clip_frac_high"].item() == 0.25 and m["clip_frac_low"].item() == 0.25


def test_padding_of_truncated_samples_is_not_counted():
    algo = algorithms.get("grpo", kl_coef=0.1, loss_agg="token-mean")
    mask = torch.tensor(LMASK)

    def run(pad_value):
        lp = t(LP)
        lp[1, 2] = pad_value  # the padded position of the shorter (truncated) row
        lp.requires_grad_()
        old, ref = t(OLD), t(REF)
        old[1, 2], ref[1, 2] = -pad_value, 3 * pad_value
        loss, _ = algo.loss(logprobs=lp, old_logprobs=old, advantages=t(ADV), action_mask=mask,
                            ref_logprobs=ref)
        loss.backward()
        return loss.item(), lp.grad

    l1, g1 = run(5.0)
    l2, g2 = run(-40.0)
    assert l1 == pytest.approx(l2, abs=1e-12)
    assert torch.allclose(g1, g2) and g1[1, 2].item() == 0.0 and g2[1, 2].item() == 0.0
    assert l1 == pytest.approx(hand_grpo("token-mean", 0.1, 0.2, 0.2)[0], abs=1e-12)


SPLITS = (slice(0, 1), slice(1, 4), slice(4, 6))  # uneven micro-batches


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_microbatch_accumulation_equals_one_batch(mode):
    g = torch.Generator().manual_seed(0)
    b, n = 6, 5
    lp0 = -torch.rand(b, n, generator=g, dtype=D) * 2
    old = lp0 + 0.3 * torch.randn(b, n, generator=g, dtype=D)
    ref = lp0 + 0.3 * torch.randn(b, n, generator=g, dtype=D)
    adv = torch.randn(b, generator=g, dtype=D)
    lengths = [5, 1, 3, 4, 2, 5]
    mask = torch.tensor([[1] * k + [0] * (n - k) for k in lengths])
    algo = algorithms.get("grpo", kl_coef=0.05, loss_agg=mode, clip_high=0.28)

    full = lp0.clone().requires_grad_()
    loss, _ = algo.loss(logprobs=full, old_logprobs=old, advantages=adv, action_mask=mask, ref_logprobs=ref)
    loss.backward()

    micro = lp0.clone().requires_grad_()
    counts = normalizers(mask)
    total = 0.0
    for s in SPLITS:
        part, _ = algo.loss(logprobs=micro[s], old_logprobs=old[s], advantages=adv[s], action_mask=mask[s],
                            ref_logprobs=ref[s], **counts)
        part.backward()  # summed, not averaged
        total += part.item()
    assert total == pytest.approx(loss.item(), abs=1e-12)
    assert torch.allclose(micro.grad, full.grad, atol=1e-12)
    if mode != "seq-mean-token-sum-norm":  # local normalizers, averaged, would not match
        local = sum(algo.loss(logprobs=lp0[s], old_logprobs=old[s], advantages=adv[s], action_mask=mask[s],
                              ref_logprobs=ref[s])[0].item() for s in SPLITS)
        assert abs(local / 3 - loss.item()) > 1e-6


def test_kl_coef_without_reference_is_an_error():
    algo = algorithms.get("grpo", kl_coef=0.04)
    assert algo.needs.ref_logprobs and not algo.needs.values
    with pytest.raises(ValueError, match="ref_logprobs"):
        algo.loss(logprobs=t(LP), old_logprobs=t(OLD), advantages=t(ADV), action_mask=torch.tensor(LMASK))


# ------------------------------------------------------------------------------------------------
# GSPO
# ------------------------------------------------------------------------------------------------


def test_gspo_sequence_ratio_is_exp_mean_token_log_ratio():
    mask = torch.tensor(LMASK)
    lr = log_ratio(t(LP), t(OLD), mask, "sequence")
    for i in range(3):
        toks = [LP[i][j] - OLD[i][j] for j in range(3) if LMASK[i][j]]
        assert lr[i].tolist() == pytest.approx([sum(toks) / len(toks)] * 3)
    gspo = algorithms.get("gspo")
    assert (gspo.clip_low, gspo.clip_high, gspo.ratio_level, gspo.loss_agg) == (
        3e-4, 4e-4, "sequence", "seq-mean-token-mean")
    _, m = gspo.loss(logprobs=t(LP), old_logprobs=t(OLD), advantages=t(ADV), action_mask=mask)
    seq_rhos = [math.exp(lr[i, 0].item()) for i in range(3)]
    assert m["ratio_mean"] == pytest.approx((3 * seq_rhos[0] + 2 * seq_rhos[1] + 3 * seq_rhos[2]) / 8)


def test_gspo_token_equals_gspo_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    b, n = 8, 6
    lp0 = -torch.rand(b, n, generator=g, dtype=D) * 2
    old = lp0 + 0.15 * torch.randn(b, n, generator=g, dtype=D)
    mask = torch.tensor([[1] * k + [0] * (n - k) for k in [6, 2, 4, 5, 1, 3, 6, 4]])
    adv = t([1.5, -1.4, 0.7, -0.3, 1.0, -0.2, 1.3, -0.8])  # signs that clip rows 1 and 6 only
    seq = algorithms.get("gspo", clip_low=0.02, clip_high=0.02)
    tok = algorithms.get("gspo", clip_low=0.02, clip_high=0.02, ratio_level="sequence-token")

    a = lp0.clone().requires_grad_()
    la, ma = seq.loss(logprobs=a, old_logprobs=old, advantages=adv, action_mask=mask)
    la.backward()
    b_ = lp0.clone().requires_grad_()
    adv_tok = adv.unsqueeze(-1).expand(b, n)  # per-token advantages equal to the sequence's
    lb, _ = tok.loss(logprobs=b_, old_logprobs=old, advantages=adv_tok, action_mask=mask)
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), abs=1e-12)
    assert torch.allclose(a.grad, b_.grad, atol=1e-12)
    # the test is not vacuous: some sequences are clipped (no gradient), some are not
    rows_with_grad = (a.grad.abs().sum(-1) > 0).sum().item()
    assert rows_with_grad == b - 2 and ma["clip_frac_low"] > 0 and ma["clip_frac_high"] > 0


# ------------------------------------------------------------------------------------------------
# DAPO dynamic sampling, DUPO duplicate-fill
# ------------------------------------------------------------------------------------------------


def rewards_of(groups):
    return [[s.reward for s in g] for g in groups]


def test_dapo_dynamic_sampling_asks_for_whole_batches_until_full():
    dapo = algorithms.get("dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.kl_coef, dapo.loss_agg) == (0.2, 0.28, 0.0, "token-mean")
    full = [group(0, [1, 0]), group(1, [0, 1]), group(2, [1]), group(3, [1, None, 0])]  # all informative
    sel = dapo.select(full, batch_groups=4, round=1)
    assert sel.need == 0 and rewards_of(sel.groups) == rewards_of(full)

    round1 = [group(0, [1, 0]), group(1, [1, 1]), group(2, [0, 0]), group(3, [1, None])]
    sel = dapo.select(round1, batch_groups=4, round=1)
    assert sel.need == 4 and sel.metrics["zero_std_frac"] == 0.75  # a whole fresh batch (verl), not 3
    round2 = round1 + [group(10, [0, 1]), group(11, [1, 1]), group(12, [0.5, 0]), group(13, [1, 0])]
    sel = dapo.select(round2, batch_groups=4, round=2)
    assert sel.need == 0
    assert rewards_of(sel.groups) == [[1, 0], [0, 1], [0.5, 0], [1, 0]]  # in order, surplus cut
    assert sel.metrics["surplus_groups"] == 0.0 and sel.metrics["gen_rounds"] == 2.0
    assert [s.group_id for g in sel.groups for s in g] == [0, 0, 1, 1, 2, 2, 3, 3]  # renumbered
    round2b = round2 + [group(20, [3, 4])]
    assert dapo.select(round2b, batch_groups=4, round=3).metrics["surplus_groups"] == 1.0


def test_dapo_at_its_cap_trains_on_what_it_has_or_raises_when_strict():
    dapo = algorithms.get("dapo", max_gen_rounds=2)
    flat = [group(k, [1, 1]) for k in range(4)]
    assert dapo.select(flat, batch_groups=4, round=1).need == 4
    sel = dapo.select(flat + [group(8, [0, 1]), group(9, [0, 0])], batch_groups=4, round=2)
    assert sel.need == 0 and rewards_of(sel.groups) == [[0, 1]]  # the one informative group
    assert sel.metrics["gen_rounds_exhausted"] == 1.0
    sel = dapo.select(flat + [group(9, [0, 0])], batch_groups=4, round=2)  # nothing varies: the last batch, A = 0
    assert sel.need == 0 and len(sel.groups) == 4
    strict = algorithms.get("dapo", max_gen_rounds=2, strict_gen_rounds=True)
    with pytest.raises(RuntimeError, match=r"after 2 generation round\(s\) \(max_gen_rounds=2\) only 0 of the 4"):
        strict.select(flat + [group(9, [0, 0])], batch_groups=4, round=2)
    unlimited = algorithms.get("dapo", max_gen_rounds=0)
    assert unlimited.select(flat, batch_groups=4, round=100).need == 4


def test_dupo_keeps_batch_size_and_drops_zero_variance_groups():
    dupo = algorithms.get("dupo", seed=3)
    assert (dupo.selection, dupo.loss_agg, dupo.clip_high) == ("duplicate", "token-mean", 0.28)
    batch = [group(0, [1, 0, 0]), group(1, [1, 1, 1]), group(2, [0, 0, 0]), group(3, [0, 1, 1]),
             group(4, [0, 0, 0]), group(5, [2, 0, 1]), group(6, [1, 1, 1]), group(7, [0, 0, 0])]
    sel = dupo.select(batch, batch_groups=8)
    assert len(sel.groups) == 8 and sel.need == 0
    kept = [[1, 0, 0], [0, 1, 1], [2, 0, 1]]
    assert rewards_of(sel.groups)[:3] == kept
    assert all(len(set(r)) > 1 for r in rewards_of(sel.groups))  # no zero-variance group left
    for g in sel.groups[3:]:  # whole-group copies of kept groups
        assert [s.completion for s in g] in [[s.completion for s in k] for k in (batch[0], batch[3], batch[5])]
    assert sel.metrics["duplicated_frac"] == 5 / 8 and sel.metrics["zero_std_frac"] == 5 / 8
    ids = [g[0].group_id for g in sel.groups]
    assert ids == list(range(8))  # a copy is its own group: its statistics equal the original's
    assert rewards_of(algorithms.get("dupo", seed=3).select(batch, 8).groups) == rewards_of(sel.groups)

    flat = [s for g in sel.groups for s in g]
    adv = dupo.advantages(rewards=t([s.reward for s in flat]), group_ids=torch.tensor([s.group_id for s in flat]))
    by_completion = {}
    for s, a in zip(flat, adv.tolist()):
        by_completion.setdefault(s.completion, set()).add(round(a, 12))
    assert all(len(v) == 1 for v in by_completion.values())  # a duplicate's advantages equal the original's


def test_dupo_with_no_informative_group_keeps_the_batch_at_zero_advantage():
    batch = [group(0, [1, 1]), group(1, [0, 0])]
    sel = algorithms.get("dupo").select(batch, batch_groups=2)
    assert rewards_of(sel.groups) == [[1, 1], [0, 0]] and sel.metrics["all_zero_std"] == 1.0
    adv = algorithms.get("dupo").advantages(rewards=t([1, 1, 0, 0]), group_ids=torch.tensor([0, 0, 1, 1]))
    assert adv.abs().max().item() == 0.0


def scored(group_id: int, acc: list[float], total: list[float]) -> list[Sample]:
    """A group whose samples carry an accuracy component beside their combined reward."""
    g = group(group_id, total)
    for s, a in zip(g, acc):
        s.reward_components = {"acc": a}
    return g


def test_ranked_selection_keeps_the_groups_whose_accuracy_varies_most_in_order():
    grpo = algorithms.get("grpo", selection="ranked", filter_metric="acc")
    over = [scored(0, [0, 0, 0, 0], [0.1, 0.5, 0.2, 0.9]),   # accuracy flat; reward std 0.3112
            scored(1, [1, 0, 0, 0], [1.2, 0.2, 0.2, 0.2]),   # accuracy std sqrt(3)/4 = 0.4330
            scored(2, [1, 1, 0, 0], [1.2, 1.2, 0.2, 0.2]),   # 0.5: half right, the most informative
            scored(3, [1, 1, 1, 1], [1.2, 1.2, 1.2, 1.2]),   # nothing to learn
            scored(4, [0, 0, 0, 0], [0.1, 0.1, 0.2, 0.1]),   # accuracy flat; reward std 0.0433
            scored(5, [1, 1, 1, 0], [1.2, 1.2, 1.2, 0.2])]   # 0.4330, ties with group 1
    sel = grpo.select(over, batch_groups=4)
    # by accuracy spread: 2 (0.5), then 1 and 5 (0.433, generation order), then by reward spread 0 over 4 and 3
    assert sel.need == 0 and rewards_of(sel.groups) == rewards_of([over[0], over[1], over[2], over[5]])
    assert [g[0].group_id for g in sel.groups] == [0, 1, 2, 3]  # renumbered in generation order
    assert sel.metrics["kept_varied_frac"] == 3 / 4 and sel.metrics["dropped_varied_frac"] == 0.0
    assert sel.metrics["zero_std_frac"] == 1 / 6  # group 3 only: the combined reward varies elsewhere
    # the combined reward as the metric (the default): 2 (0.5), then 1 and 5 tie (0.433) and 1 came first
    by_reward = algorithms.get("grpo", selection="ranked").select(over, batch_groups=2)
    assert rewards_of(by_reward.groups) == rewards_of([over[1], over[2]])
    short = grpo.select(over[:3], batch_groups=4)  # fewer groups than the batch: ask for the rest
    assert short.need == 1 and len(short.groups) == 3


def test_dapo_filter_metric_drops_groups_whose_accuracy_is_flat():
    over = [scored(0, [0, 0], [0.1, 0.5]), scored(1, [1, 0], [1.2, 0.2]), scored(2, [1, 1], [1.2, 1.0])]
    assert len(algorithms.get("dapo").select(over, batch_groups=3).groups) == 3  # every combined reward varies
    sel = algorithms.get("dapo", filter_metric="acc").select(over, batch_groups=3, round=1)
    assert rewards_of(sel.groups) == [[1.2, 0.2]] and sel.need == 3 and sel.metrics["zero_std_frac"] == 2 / 3


def test_grpo_select_is_identity():
    batch = [group(0, [1, 1]), group(5, [0, 1])]
    sel = algorithms.get("grpo").select(batch)
    assert sel.groups == batch and sel.need == 0 and sel.metrics["zero_std_frac"] == 0.5


# ------------------------------------------------------------------------------------------------
# PPO: GAE, KL in the reward, dual clip, value clipping, adaptive KL
# ------------------------------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam):
    """Plain-Python GAE over the masked-in tokens of each row."""
    adv = [[0.0] * len(r) for r in rewards]
    ret = [[0.0] * len(r) for r in rewards]
    for i in range(len(rewards)):
        next_v, next_a = 0.0, 0.0
        for j in reversed([j for j in range(len(rewards[i])) if mask[i][j]]):
            delta = rewards[i][j] + gamma * next_v - values[i][j]
            a = delta + gamma * lam * next_a
            adv[i][j], ret[i][j] = a, a + values[i][j]
            next_v, next_a = values[i][j], a
    return adv, ret


def test_gae_matches_python_loop_with_masked_holes():
    r = [[0.0, 0.1, -0.2, 0.0, 1.0, 0.0], [0.3, 0.0, 0.5, 0.0, 0.0, 0.0]]
    v = [[0.5, 0.4, NAN, 0.2, 0.9, 3.0], [0.1, 0.7, 0.2, 0.3, NAN, NAN]]
    m = [[0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0]]  # row 0: prompt token, a masked tool token, padding
    adv, ret = gae(t(r), t(v), torch.tensor(m), 0.9, 0.8)
    want_adv, want_ret = gae_loop(r, v, m, 0.9, 0.8)
    assert torch.allclose(adv, t(want_adv), atol=1e-12) and torch.allclose(ret, t(want_ret), atol=1e-12)


def test_ppo_advantages_kl_in_reward_gae_and_whitening_by_hand():
    ppo = algorithms.get("ppo", kl_coef=0.1, gamma=1.0, lam=0.95)
    assert ppo.needs.values and ppo.needs.ref_logprobs
    scores = [1.0, -0.5]
    old = [[-1.0, -0.5, -2.0], [-0.3, -0.9, 0.0]]
    ref = [[-1.2, -0.4, -1.0], [-0.2, -1.1, 0.0]]
    values = [[0.2, 0.3, 0.1], [0.0, -0.1, 0.0]]
    m = [[1, 1, 1], [1, 1, 0]]
    tok_r = [[-0.1 * (old[i][j] - ref[i][j]) if m[i][j] else 0.0 for j in range(3)] for i in range(2)]
    tok_r[0][2] += scores[0]
    tok_r[1][1] += scores[1]
    want_adv, want_ret = gae_loop(tok_r, values, m, 1.0, 0.95)
    flat = [want_adv[i][j] for i in range(2) for j in range(3) if m[i][j]]
    mu, var = statistics.mean(flat), statistics.variance(flat)
    white = [[(want_adv[i][j] - mu) / math.sqrt(var + 1e-8) if m[i][j] else 0.0 for j in range(3)]
             for i in range(2)]
    out = ppo.advantages(rewards=t(scores), values=t(values), action_mask=torch.tensor(m),
                         old_logprobs=t(old), ref_logprobs=t(ref))
    assert torch.allclose(out.returns, t(want_ret), atol=1e-12)  # before whitening
    assert torch.allclose(out.advantages, t(white), atol=1e-12)
    kl_rows = [sum(old[i][j] - ref[i][j] for j in range(3) if m[i][j]) / sum(m[i]) for i in range(2)]
    assert out.metrics["kl_in_reward"] == pytest.approx(sum(kl_rows) / 2)
    assert ppo.kl_coef == 0.1  # fixed controller: unchanged


def test_ppo_dual_clip_by_hand():
    # A = -1, rho = 5: max(5, 1.2) = 5 -> dual-clipped to 3. A = +1, rho = 5: -1.2, no dual clip.
    # A = -1, rho = 2: max(2, 1.2) = 2 < 3: unchanged.
    ppo = algorithms.get("ppo", kl_coef=0.0, dual_clip=3.0, loss_agg="token-mean")
    lp = t([[math.log(5), math.log(5), math.log(2)]]).requires_grad_()
    loss, m = ppo.policy_loss(logprobs=lp, old_logprobs=t([[0.0, 0.0, 0.0]]), advantages=t([[-1.0, 1.0, -1.0]]),
                              action_mask=torch.ones(1, 3))
    assert loss.item() == pytest.approx((3 - 1.2 + 2) / 3)
    assert m["dual_clip_frac"] == pytest.approx(1 / 3)
    loss.backward()  # only the last token is unclipped: d(-A rho)/d lp = rho = 2, over 3 tokens
    assert lp.grad[0].tolist() == pytest.approx([0.0, 0.0, 2 / 3])
    no_dual = algorithms.get("ppo", kl_coef=0.0, loss_agg="token-mean")
    loss2, _ = no_dual.policy_loss(logprobs=lp, old_logprobs=t([[0.0, 0.0, 0.0]]),
                                   advantages=t([[-1.0, 1.0, -1.0]]), action_mask=torch.ones(1, 3))
    assert loss2.item() == pytest.approx((5 - 1.2 + 2) / 3)


def test_ppo_value_clipping_and_explained_variance_by_hand():
    ppo = algorithms.get("ppo", value_clip=0.5, loss_agg="token-mean")
    new_v = t([[2.0, 1.2, 0.0, 9.0]]).requires_grad_()
    old_v, ret, mask = t([[1.0, 1.0, 1.0, 0.0]]), t([[1.5, 3.0, -1.0, 0.0]]), torch.tensor([[1, 1, 1, 0]])
    # token 0: max(0.25, (1.5-1.5)^2) = 0.25; token 1: 1.8^2 = 3.24 (inside the clip);
    # token 2: max(1, (0.5 - -1)^2) = 2.25 (clipped branch, no gradient); token 3: padding
    loss, m = ppo.value_loss(new_values=new_v, values=old_v, returns=ret, action_mask=mask)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 3.24 + 2.25) / 3)
    assert m["vf_clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    assert new_v.grad[0].tolist() == pytest.approx([0.5 * 2 * 0.5 / 3, 0.5 * 2 * -1.8 / 3, 0.0, 0.0])
    rets, vals = [1.5, 3.0, -1.0], [2.0, 1.2, 0.0]
    ev = 1 - statistics.variance([r - v for r, v in zip(rets, vals)]) / statistics.variance(rets)
    assert m["explained_variance"] == pytest.approx(ev)
    # loss() = policy + vf_coef * value when the critic's current values are given
    total, tm = ppo.loss(logprobs=t([[-1.0, -1.0, -1.0, 0.0]]), old_logprobs=t([[-1.0, -1.0, -1.0, 0.0]]),
                         advantages=t([[1.0, -1.0, 0.5, 0.0]]), action_mask=mask, new_values=new_v.detach(),
                         values=old_v, returns=ret)
    assert total.item() == pytest.approx(-(1 - 1 + 0.5) / 3 + 0.1 * loss.item())
    assert tm["value_loss"] == pytest.approx(loss.item())


def test_adaptive_kl_controller_by_hand():
    import dataclasses

    ppo = algorithms.get("ppo", adaptive_kl=True, kl_coef=0.1, target_kl=0.1, kl_horizon=10000)
    beta = ppo.next_kl_coef(0.2, 64)
    assert beta == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))  # error clipped at +0.2
    assert ppo.kl_coef == 0.1  # no side effect: the caller applies the new beta
    ppo = dataclasses.replace(ppo, kl_coef=beta)
    assert ppo.next_kl_coef(0.09, 100) == pytest.approx(beta * (1 - 0.1 * 100 / 10000))
    assert ppo.next_kl_coef(0.0, 50) == pytest.approx(beta * (1 - 0.2 * 50 / 10000))  # clipped at -0.2
    fixed = algorithms.get("ppo", kl_coef=0.1)
    assert fixed.next_kl_coef(5.0, 64) == 0.1
    # advantages() applies the current beta and returns the controller's next one (verl apply_kl_penalty)
    ppo = algorithms.get("ppo", adaptive_kl=True, kl_coef=0.1, target_kl=0.1, kl_horizon=100)
    out = ppo.advantages(rewards=t([1.0, 0.0]), values=t([[0.0, 0.0], [0.0, 0.0]]),
                         action_mask=torch.tensor([[1, 1], [1, 0]]), old_logprobs=t([[-1.0, -1.0], [-1.0, 0.0]]),
                         ref_logprobs=t([[-1.1, -1.08], [-1.09, 0.0]]))
    observed = ((0.1 + 0.08) / 2 + 0.09) / 2  # 0.09: error -0.1, inside the +-0.2 clip
    assert out.metrics["kl_in_reward"] == pytest.approx(observed)
    assert out.updates["kl_coef"] == pytest.approx(0.1 * (1 + (observed / 0.1 - 1) * 2 / 100))
    assert ppo.kl_coef == 0.1


# ------------------------------------------------------------------------------------------------
# RLOO, REINFORCE++
# ------------------------------------------------------------------------------------------------


def test_rloo_advantages_by_hand():
    rewards = [1.0, 0.0, 0.5, 2.0, 4.0, 3.0, 9.0]
    gids = [0, 0, 0, 1, 1, 2, 1]
    scored = [True] * 6 + [False]
    old = [[-1.0, -0.5], [-0.2, -0.3], [-1.0, 0.0], [-0.4, -0.4], [-0.1, -0.9], [-0.5, -0.5], [0.0, 0.0]]
    ref = [[-1.1, -0.3], [-0.2, -0.5], [-0.7, 0.0], [-0.4, -0.6], [-0.3, -0.6], [-0.5, -0.4], [0.0, 0.0]]
    m = [[1, 1], [1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 1]]
    beta = 0.05
    shaped = [rewards[i] - beta * sum(old[i][j] - ref[i][j] for j in range(2) if m[i][j]) for i in range(7)]
    want = []
    for i in range(7):
        if not scored[i]:
            want.append(0.0)
            continue
        others = [shaped[j] for j in range(7) if gids[j] == gids[i] and j != i and scored[j]]
        want.append(shaped[i] - sum(others) / len(others) if others else shaped[i])
    rloo = algorithms.get("rloo")
    adv = rloo.advantages(rewards=t(rewards), group_ids=torch.tensor(gids), scored=torch.tensor(scored),
                          action_mask=torch.tensor(m), old_logprobs=t(old), ref_logprobs=t(ref))
    assert torch.allclose(adv, t(want), atol=1e-12)


def test_reinforce_pp_advantages_by_hand():
    scores, gids = [1.0, 0.0, 0.5], [0, 0, 1]
    old = [[-1.0, -0.5, -0.2], [-0.3, -0.9, 0.0], [-0.6, -0.1, -0.8]]
    ref = [[-1.2, -0.4, -0.2], [-0.2, -1.1, 0.0], [-0.9, -0.1, -0.5]]
    m = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    gamma, beta = 0.9, 0.1

    def expected(base_scores):
        rtg = [[0.0] * 3 for _ in range(3)]
        for i in range(3):
            cols = [j for j in range(3) if m[i][j]]
            running = 0.0
            for j in reversed(cols):
                r = -beta * (old[i][j] - ref[i][j]) + (base_scores[i] if j == cols[-1] else 0.0)
                running = r + gamma * running
                rtg[i][j] = running
        flat = [rtg[i][j] for i in range(3) for j in range(3) if m[i][j]]
        mu, var = statistics.mean(flat), statistics.variance(flat)
        return [[(rtg[i][j] - mu) / math.sqrt(var + 1e-8) if m[i][j] else 0.0 for j in range(3)]
                for i in range(3)]

    kwargs = dict(rewards=t(scores), action_mask=torch.tensor(m), group_ids=torch.tensor(gids),
                  old_logprobs=t(old), ref_logprobs=t(ref))
    adv = algorithms.get("reinforce_pp", kl_coef=beta, gamma=gamma).advantages(**kwargs)
    assert torch.allclose(adv, t(expected(scores)), atol=1e-12)
    adv_b = algorithms.get("reinforce_pp", kl_coef=beta, gamma=gamma, baseline=True).advantages(**kwargs)
    assert torch.allclose(adv_b, t(expected([0.5, -0.5, 0.5])), atol=1e-12)  # group of one keeps R


def test_baselines_loss_is_the_shared_clipped_surrogate():
    mask = torch.tensor(LMASK)
    rloo = algorithms.get("rloo", clip_high=0.28)
    grpo = algorithms.get("grpo", clip_high=0.28, loss_agg="token-mean")
    args = dict(logprobs=t(LP), old_logprobs=t(OLD), advantages=t(ADV), action_mask=mask, ref_logprobs=t(REF))
    assert rloo.loss(**args)[0].item() == pytest.approx(grpo.loss(**args)[0].item(), abs=1e-12)
    rpp = algorithms.get("reinforce_pp", kl_mode="loss", kl_estimator="k3", kl_coef=0.1, loss_agg="seq-mean-token-mean")
    assert rpp.loss(**args)[0].item() == pytest.approx(hand_grpo("seq-mean-token-mean", 0.1, 0.2, 0.2)[0])


def test_baselines_need_old_logprobs_only_for_a_kl_in_the_reward():
    # the KL in the reward is taken at the behaviour policy; as a loss term at the current one, so an
    # on-policy run with kl_mode="loss" pays no extra forward pass for old log-probs
    for name in ["rloo", "reinforce_pp"]:
        assert algorithms.get(name, kl_coef=0.05).needs.old_logprobs
        needs = algorithms.get(name, kl_coef=0.05, kl_mode="loss").needs
        assert needs.ref_logprobs and not needs.old_logprobs
        assert not algorithms.get(name, kl_coef=0.0).needs.ref_logprobs


# ------------------------------------------------------------------------------------------------
# Registry and validation
# ------------------------------------------------------------------------------------------------


def test_registry_lists_valid_names_and_variants_are_fields():
    for name in ["ppo", "grpo", "dapo", "gspo", "dupo", "rloo", "reinforce_pp"]:
        assert name in algorithms.names()
    with pytest.raises(KeyError, match="valid names: .*dapo.*grpo.*ppo"):
        algorithms.get("grpoo")
    for name in ["dapo", "gspo", "dupo"]:
        assert isinstance(algorithms.get(name), GRPO)
    combo = algorithms.get("gspo", selection="duplicate")  # GSPO + DUPO by fields
    assert combo.ratio_level == "sequence" and combo.selection == "duplicate"
    with pytest.raises(ValueError, match="scale_rewards='std' is not valid; choose one of: group, batch, none"):
        algorithms.get("grpo", scale_rewards="std")
    with pytest.raises(ValueError, match="dual_clip"):
        algorithms.get("dapo", dual_clip=0.5)


# ------------------------------------------------------------------------------------------------
# Rollout correction: engine vs learner log-probs (TIS / MIS)
# ------------------------------------------------------------------------------------------------


def test_rollout_correction_weights_the_loss_as_the_formula_says():
    from algorithms.core import rollout_weights

    lp = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])  # learner (behaviour) log-probs
    eng = t([[-1.5, -1.0, -0.5], [-0.2, -1.1, 0.0]])  # the engine's
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = t([1.0, -1.0])
    r = [[math.exp(0.5), math.exp(-1.0), 1.0], [math.exp(-0.8), math.exp(0.1), 1.0]]  # pi_old / mu per token
    want = {
        "token-truncate": [[min(x, 1.5) for x in row] for row in r],
        "token-mask": [[x if x <= 1.5 else 0.0 for x in row] for row in r],
        "sequence-truncate": [[min(math.exp(-0.5), 1.5)] * 3, [min(math.exp(-0.7), 1.5)] * 3],
    }
    for mode, w in want.items():
        got, m = rollout_weights(lp, eng, mask, mode, cap=1.5)
        assert torch.allclose(got[mask], t(w)[mask]), mode
        # on-policy the surrogate's per-token value is -A; the correction multiplies it by w
        loss, lm = algorithms.get("grpo", loss_agg="token-mean").loss(
            logprobs=lp, advantages=adv, action_mask=mask, engine_logprobs=eng, rollout_correction=mode,
            correction_cap=1.5)
        per_token = -adv[:, None] * t(w)
        assert loss.item() == pytest.approx(float(per_token[mask].sum() / mask.sum())), mode
        assert lm["rollout/logprob_diff_abs"] == pytest.approx((0.5 + 1.0 + 0 + 0.8 + 0.1) / 5)
    sm, _ = rollout_weights(lp, eng, mask, "sequence-mask", cap=0.55)  # row 0: e^-0.5 = 0.61 > 0.55 -> dropped
    assert sm[0].tolist() == [0.0, 0.0, 0.0] and sm[1, 0].item() == pytest.approx(math.exp(-0.7))
    off, m = rollout_weights(lp, eng, mask, "off", cap=2.0)
    assert bool((off == 1).all())
    # KL(mu || pi_old) estimated with k3 from the engine's samples
    k3 = [math.exp(d) - 1 - d for d in (0.5, -1.0, 0.0, -0.8, 0.1)]
    assert m["rollout/kl_engine_learner"].item() == pytest.approx(sum(k3) / 5, rel=1e-5)
