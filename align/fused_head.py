"""Token log-probabilities through a frozen LM head, in cache-sized chunks, differentiated in the forward.

For a frozen head W (V, H) and a hidden state h, lp = log_softmax(W h)[t] has the gradient
d lp / d h = W[t] - softmax(W h) @ W: H numbers per token that do not depend on the loss. Computed
chunk by chunk in the forward (Liger's fused linear cross-entropy does the same for a mean CE loss),
no (N, V) tensor is kept or recomputed, and the backward is one multiply per token. The chunks are
small enough for the (rows, V) passes (cast, exp, sums) to stay near the cache, where whole tiles
made each pass a trip over 250 MB (`examples/bench_update.py --compare head`, README).
The entropy and, for an entropy bonus, its gradient -(p * (log p + H)) @ W come from the same chunk.
Numbers are those of `log_softmax(head(h).float())` (tested against it, values and gradients).
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MB in float32 (170 rows of a 49k vocabulary)


def usable(head: torch.nn.Module) -> bool:
    """Whether `head` is a frozen, bias-free linear layer (LoRA, QLoRA, IA3, freeze runs): the
    case where the gradient with respect to the hidden states is all that is needed."""
    w = head.weight  # a quantised head (bitsandbytes packs integers) takes the plain path
    return getattr(head, "bias", None) is None and not w.requires_grad and w.dim() == 2 and w.is_floating_point()


def _weight(head: torch.nn.Module, dtype: torch.dtype) -> Tensor:
    """The head's weight in the dtype of its logits; right after `head(...)` ran under autocast, a
    `CastCachedLinear` holds that cast already (`align.frozen_cast`)."""
    cast = getattr(head, "_cast", None)
    if cast is not None and cast.dtype == dtype and getattr(head, "_cast_key", (None, None))[:2] == (
            head.weight._version, head.weight.data_ptr()):
        return cast
    return head.weight.detach().to(dtype)


class _HeadLogprobs(torch.autograd.Function):
    """(N,) log-probabilities and (N,) entropies of `targets` through a frozen `head`."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: torch.nn.Module, targets: Tensor, with_entropy: bool,
                entropy_grad: bool, chunk: int) -> tuple[Tensor, Tensor]:
        """Chunked forward; keeps (N, H) gradient rows when the hidden states need a gradient."""
        need = ctx.needs_input_grad[0]
        with_entropy = with_entropy or entropy_grad
        N = hidden.shape[0]
        lp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        ent = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        d_lp = torch.empty((N, hidden.shape[1]), dtype=torch.float32, device=hidden.device) if need else None
        d_ent = torch.empty_like(d_lp) if need and entropy_grad else None
        weight = None
        for i in range(0, N, chunk):
            z = head(hidden[i:i + chunk])  # (c, V): the autocast dtype, as the plain path's logits
            if weight is None and need:
                weight = _weight(head, z.dtype)
            logp = z.float()  # z itself when there is no autocast: a fresh tensor, changed in place below
            rows = torch.arange(z.shape[0], device=z.device)
            t = targets[i:i + chunk]
            logp -= torch.logsumexp(logp, -1, keepdim=True)  # (c, V) log-probs, in place
            lp[i:i + chunk] = logp[rows, t]
            if not (need or with_entropy):
                continue
            p = logp.exp()
            if with_entropy:
                ent[i:i + chunk] = h = -(p * logp).sum(-1)
            if d_ent is not None:  # dH/dz = -p (log p + H)
                d_ent[i:i + chunk] = -((p * (logp + h[:, None])).to(z.dtype) @ weight).float()
            if need:  # d lp / dz = onehot(t) - p
                p.neg_()
                p[rows, t] += 1.0
                d_lp[i:i + chunk] = (p.to(z.dtype) @ weight).float()
        ctx.save_for_backward(d_lp, d_ent)
        ctx.hidden_dtype = hidden.dtype
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp: Tensor, g_ent: Tensor | None):
        """Each token's gradient row scaled by the upstream gradient of its log-prob (and entropy)."""
        d_lp, d_ent = ctx.saved_tensors
        grad = g_lp[:, None] * d_lp
        if d_ent is not None and g_ent is not None:
            grad = grad + g_ent[:, None] * d_ent
        return grad.to(ctx.hidden_dtype), None, None, None, None, None


def head_logprobs_fused(head: torch.nn.Module, hidden: Tensor, targets: Tensor, with_entropy: bool = False,
                        entropy_grad: bool = False, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[Tensor, Tensor]:
    """(N,) log p(targets) and (N,) entropies (zeros unless `with_entropy`; differentiable with
    `entropy_grad`) of hidden states (N, H), already divided by the temperature, through a frozen
    bias-free `head` (`usable`)."""
    chunk = max(1, chunk_elements // head.weight.shape[0])
    return _HeadLogprobs.apply(hidden, head, targets, with_entropy, entropy_grad, chunk)
