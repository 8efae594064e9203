"""Frozen weights cast to bf16 once, not at every call.

Under `torch.autocast` a linear layer's float32 weight is cast to bf16 each time it is used: in
every micro-batch (and again wherever a forward is recomputed). Autocast caches the cast only for weights
that require gradients, so the frozen base of a LoRA / IA3 / freeze run (nearly all the weights)
pays a full read-and-write pass over itself per use (`examples/profile_step.py` shows it as
`aten::copy_`; the README has the figures). Here each frozen `nn.Linear` keeps one cast copy and
reuses it while the weight is unchanged. The numbers are autocast's own: the same
rounding of the same weight (tested), and float32 state dicts, checkpoints and syncs as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CastCachedLinear(nn.Linear):
    """An `nn.Linear` that, under autocast, reuses one autocast-dtype copy of its frozen weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`nn.Linear.forward`, with the cached cast while autocast is on and the weight is frozen."""
        kind = x.device.type
        if not torch.is_autocast_enabled(kind) or self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        dtype = torch.get_autocast_dtype(kind)
        # the version counter moves with every in-place change (load_state_dict, optimizer, merge)
        key = (self.weight._version, self.weight.data_ptr(), dtype)
        if getattr(self, "_cast_key", None) != key:
            self._cast = self.weight.detach().to(dtype)
            self._cast_key = key
        return F.linear(x, self._cast, self.bias)  # autocast casts x and the bias as it would have


def cache_frozen_casts(model: nn.Module) -> int:
    """Make every plain float32 `nn.Linear` of `model` a `CastCachedLinear` (the state dict, the
    parameters and `isinstance` checks are unchanged); returns how many. Quantised layers
    (bitsandbytes subclasses of nn.Linear) keep their class; trainable ones (LoRA's A and B) are
    converted too but take autocast's own path, which caches their cast already."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32:
            module.__class__ = CastCachedLinear
            n += 1
    return n
