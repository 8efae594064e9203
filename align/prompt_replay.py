"""A minibatch's prompts run once per update; their gradient is replayed after the micro-batches.

`share_prompt` alone computes a group's prompt once per micro-batch, so a micro-batch holds whole
groups and every row is padded to the longest completion of its groups: with RL's long-tailed
lengths (most replies short, a few cut at the token limit) much of what is computed is padding.
Here the unique prompts of the whole minibatch run once, with gradients, and their KV cache is
handed to the micro-batches as detached leaves; micro-batches are cut from the rows sorted by
completion length (`plan_rows`), whatever their group; each micro-batch's backward leaves its
share of the prompts' gradient on the leaves, and `PromptCache.backward` sends the sum through
the prompt forward once, at the end. Loss, gradients and log-probs equal the padded path's
(tested). Not under DeepSpeed (its engine owns each backward) nor gradient checkpointing (no cache).
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

from align.types import Experience

# a micro-batch's fixed cost in tokens (per-layer dispatch, the loss): keeps `plan_rows` from
# cutting a batch into many tiny micro-batches to save a few padding tokens
MICRO_BATCH_OVERHEAD = 64


def can_replay(model: torch.nn.Module, prompt_len: int) -> bool:
    """Whether `model`'s prompts can run once with their cache handed on: a prompt of at least 2
    columns, a plain head (`align.logprobs.fast_head`), not ZeRO-3's partitioned head, and no
    gradient checkpointing (which turns the cache off)."""
    from align.logprobs import fast_head

    inner = getattr(model, "module", model)
    return (prompt_len >= 2 and fast_head(inner) and not hasattr(inner.get_output_embeddings().weight, "ds_id")
            and not getattr(inner, "is_gradient_checkpointing", False))


def row_micro_batches(exp: Experience, max_tokens: int) -> list[tuple[Tensor, Experience]]:
    """(row indices, micro-batch trimmed of trailing padding) pairs planned by `plan_rows`; every
    micro-batch keeps all prompt columns, which the `PromptCache` covers."""
    from align.logprobs import trim

    P = exp.prompt_len
    out = []
    for plan in plan_rows(exp.attention_mask[:, P:].sum(1).tolist(), max_tokens):
        idx = torch.tensor(plan, dtype=torch.long)
        out.append((idx, trim(exp.index(idx))))
    return out


def plan_rows(completion_lens: list[int], max_tokens: int, overhead: int = MICRO_BATCH_OVERHEAD) -> list[list[int]]:
    """Row indices of each micro-batch: rows longest completion first, cut where the padded tokens
    (rows x (longest completion + 1)) plus `overhead` per micro-batch are fewest in all, no
    micro-batch above `max_tokens` unless it is one row (dynamic programming over the cuts)."""
    order = sorted(range(len(completion_lens)), key=lambda i: -completion_lens[i])
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # the segment order[i:j]; its longest row is order[i]
            tokens = (j - i) * (completion_lens[order[i]] + 1)
            if tokens > max_tokens and j - i > 1:
                break  # longer segments only grow
            if best[i] + tokens + overhead < best[j]:
                best[j], cut[j] = best[i] + tokens + overhead, i
    plans, j = [], n
    while j > 0:
        plans.append(order[cut[j]:j])
        j = cut[j]
    return plans[::-1]


class PromptCache:
    """The unique prompts of `exp` (left-padded to `prompt_len`), all but their last column, run
    once through the bare model; `cache(rows)` gives those rows' KV cache, `backward()` replays."""

    def __init__(self, model: torch.nn.Module, exp: Experience, grad: bool) -> None:
        """Run the prompts (with gradients when `grad`), under the caller's autocast."""
        from align.logprobs import unique_prompts

        inner = getattr(model, "module", model)
        P = exp.prompt_len
        ids, mask = exp.input_ids[:, :P - 1], exp.attention_mask[:, :P - 1]
        first, self.rows = unique_prompts(exp.input_ids, exp.attention_mask, P)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does under left padding
        with torch.set_grad_enabled(grad):
            out = inner(input_ids=ids[first], attention_mask=mask[first], position_ids=position_ids[first],
                        use_cache=True, logits_to_keep=1)
        self.config = inner.config
        self.kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        # a layer below every adapter (peft.adapter_layers) has no gradient to pass back: no leaf grad
        self.leaves = [tuple(t.detach().requires_grad_(grad and t.requires_grad) for t in kv) for kv in self.kv]

    def cache(self, idx: Tensor) -> DynamicCache:
        """The KV cache of rows `idx` (gathered from the leaves: gradients collect there)."""
        r = self.rows[idx.to(self.rows.device)]
        return DynamicCache(ddp_cache_data=[(k.index_select(0, r), v.index_select(0, r)) for k, v in self.leaves],
                            config=self.config)

    def backward(self) -> None:
        """Send the gradients gathered on the leaves through the prompt forward (once)."""
        pairs = [(t, leaf.grad) for kv, lv in zip(self.kv, self.leaves) for t, leaf in zip(kv, lv)
                 if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self.kv = self.leaves = []  # the prompt graph is freed
