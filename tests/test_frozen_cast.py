"""Frozen weights cast once under autocast (align.frozen_cast): the same numbers as autocast's own
per-call cast, the cast redone when a weight changes in place, nothing changed outside autocast."""
import copy

import torch

from align.config import PeftConfig
from align.frozen_cast import CastCachedLinear, cache_frozen_casts
from align.tiny import tiny_model
from align.tuning import apply_tuning


def _lora_pair():
    """Two identical LoRA models on the tiny model (B non-zero), the second with cached casts."""
    model, _ = tiny_model(0)
    plain = apply_tuning(model, PeftConfig(method="lora", r=4, alpha=8))
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    cached = copy.deepcopy(plain)
    return plain, cached, cache_frozen_casts(cached)


def _loss_and_grads(model, ids):
    """A loss over all logits under bf16 autocast, and the trainable parameters' gradients."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()
    loss = torch.log_softmax(logits, -1)[..., 3].mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_casts_give_autocasts_numbers_and_follow_weight_changes():
    plain, cached, n = _lora_pair()
    linears = [m for m in plain.modules() if type(m) is torch.nn.Linear]
    assert n == len(linears)  # LoRA's A / B are converted too, but trainable weights take autocast's path
    assert any(not m.weight.requires_grad for m in linears) and any(m.weight.requires_grad for m in linears)
    assert sum(isinstance(m, CastCachedLinear) for m in cached.modules()) == n
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second pass reuses the cached copies
        (la, ga), (lb, gb) = _loss_and_grads(plain, ids), _loss_and_grads(cached, ids)
        assert torch.equal(la, lb)
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    # a frozen weight changed in place (a merge, a reload): the next call casts it again
    sd = {k: v + 0.05 for k, v in plain.state_dict().items() if "base_layer.weight" in k}
    plain.load_state_dict(sd, strict=False)
    cached.load_state_dict(sd, strict=False)
    (la2, _), (lb2, _) = _loss_and_grads(plain, ids), _loss_and_grads(cached, ids)
    assert torch.equal(la2, lb2) and not torch.equal(la2, la)
    # outside autocast: float32 throughout, as a plain nn.Linear
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, cached(input_ids=ids).logits)
    # the state dict is unchanged: same keys, float32 weights (checkpoints and syncs as before)
    assert {k: v.dtype for k, v in cached.state_dict().items()} == {k: v.dtype for k, v in plain.state_dict().items()}
