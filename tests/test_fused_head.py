"""The frozen head's chunked log-probs with their gradient taken in the forward (align.fused_head):
the same values, entropies and gradients as `log_softmax(head(h))` taken whole, in fp32 and under
bf16 autocast, with the entropy bonus's gradient, and nothing kept for a no-grad pass."""
import pytest
import torch

from align.frozen_cast import cache_frozen_casts
from align.fused_head import head_logprobs_fused, usable
from align.logprobs import head_logprobs


def _plain(head, hidden, targets, T):
    """The reference: whole logits, float32 log-softmax, autograd through everything."""
    logp = torch.log_softmax(head(hidden).float() / T, -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("amp", [False, True])
def test_fused_head_equals_the_whole_logits(amp):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=False).requires_grad_(False)
    cache_frozen_casts(head)  # as the learners do: the cast weight the fused backward reuses
    assert usable(head)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 37, (9,))
    g_lp, g_ent = torch.randn(9), torch.randn(9)
    results = []
    for fn in ("plain", "fused"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if fn == "plain":
                lp, ent = _plain(head, hidden, targets, 0.7)
            else:  # chunks of 2 rows (74 logits): the last chunk is a single row
                lp, ent = head_logprobs(head, hidden, targets, 0.7, with_entropy=True, entropy_grad=True)
                lp2, _ = head_logprobs_fused(head, hidden / 0.7, targets, chunk_elements=74)
                assert torch.allclose(lp, lp2, atol=1e-6)  # chunking changes only the BLAS blocking
        grad, = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), hidden)
        results.append((lp.detach(), ent.detach(), grad))
    tol = 2e-2 if amp else 1e-5  # bf16: the gradient rows are rounded where the plain path rounds (onehot - p) * g
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=tol, rtol=tol)
    assert results[0][2].abs().sum() > 0


def test_fused_head_without_gradients_keeps_nothing_and_skips_the_entropy():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 11, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 11, (5,))
    with torch.no_grad():
        lp, ent = head_logprobs_fused(head, hidden, targets)
    ref, _ = _plain(head, hidden, targets, 1.0)
    assert torch.allclose(lp, ref, atol=1e-6) and not ent.any() and not lp.requires_grad


def test_trainable_or_biased_heads_take_the_tiled_path():
    head = torch.nn.Linear(8, 11, bias=False)
    assert not usable(head)  # full fine-tuning: the head's own gradient is needed
    assert not usable(torch.nn.Linear(8, 11).requires_grad_(False))
