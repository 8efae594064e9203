"""Per-token log-probabilities of a causal LM without the full-vocabulary logits of a whole batch.

A (B, T, V) logits block is the largest tensor of a learner's step (16 x 256 tokens x a 49k
vocabulary is 800 MB in float32, 600 MB more with Qwen's 150k). Here the LM head runs on the
hidden states of the wanted positions only: a frozen head through `align.fused_head` (chunks, the
gradient taken in the forward), a trainable one in tiles of at most `TILE_ELEMENTS` logits, each
recomputed in backward instead of kept, so memory stays one tile.
The numbers are those of `log_softmax(logits / T)` taken whole (tested).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from align import fused_head, prompt_replay
from align.types import Experience

TILE_ELEMENTS = 64 * 2**20  # logits per tile (N x V): 256 MB in float32


def fast_head(model: torch.nn.Module) -> bool:
    """Whether logits are exactly lm_head(last hidden state): not so for models that scale or
    soft-cap logits after the head (Gemma 2, Cohere, Granite); those take the plain path."""
    cfg = model.config
    return all(getattr(cfg, a, None) is None for a in ("final_logit_softcapping", "logit_scale", "logits_scaling",
                                                        "output_multiplier", "lm_head_multiplier"))


def _tile(head: torch.nn.Module, h: Tensor, t: Tensor, temperature: float, with_entropy: bool,
          entropy_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(n,) log p(t) and (n,) entropies (zeros unless asked; differentiated only with
    `entropy_grad`, for an entropy bonus in the loss) of one tile."""
    scaled = temperature not in (0.0, 1.0)
    if scaled and getattr(head, "bias", None) is None:  # logits / T = head(h / T): (n, H) divided, not (n, V)
        h, scaled = h / temperature, False
    logits = head(h).float()  # (n, V)
    if scaled:
        logits = logits / temperature
    logp = torch.log_softmax(logits, -1)  # (n, V): one pass serves the log-probs and the entropies
    lp = logp.gather(-1, t[:, None]).squeeze(-1)  # (n,)
    if not with_entropy:
        return lp, torch.zeros_like(lp).detach()
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = -(logp.exp() * logp).sum(-1)  # (n,)
    return lp, ent


def head_logprobs(head: torch.nn.Module, hidden: Tensor, targets: Tensor, temperature: float = 1.0,
                  with_entropy: bool = False, tile_elements: int = TILE_ELEMENTS,
                  entropy_grad: bool = False) -> tuple[Tensor, Tensor]:
    """(N,) log-probabilities of `targets` (N,) from hidden states (N, H) through `head`, and (N,)
    entropies (zeros unless `with_entropy`; differentiable with `entropy_grad`): through
    `align.fused_head` when the head is frozen, else in tiles recomputed in backward."""
    if fused_head.usable(head):  # a frozen head: chunked, its gradient taken in the forward
        if temperature not in (0.0, 1.0):
            hidden = hidden / temperature
        return fused_head.head_logprobs_fused(head, hidden, targets, with_entropy, entropy_grad)
    tile = max(1, tile_elements // head.weight.shape[0])
    if hidden.shape[0] <= tile:
        return _tile(head, hidden, targets, temperature, with_entropy, entropy_grad)
    from torch.utils.checkpoint import checkpoint

    lps, ents = [], []
    for i in range(0, hidden.shape[0], tile):
        args = (head, hidden[i:i + tile], targets[i:i + tile], temperature, with_entropy, entropy_grad)
        lp, ent = (checkpoint(_tile, *args, use_reentrant=False) if torch.is_grad_enabled() else _tile(*args))
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                   temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False
                   ) -> tuple[Tensor, Tensor | None]:
    """(B, T) log-probabilities of each token given the ones before it, at `temperature`, for the
    completion columns (prompt columns are 0), and optionally the (B, T) entropies there
    (differentiable with `entropy_grad`: an entropy bonus in the loss).

    Layout of `align.types.Experience`: prompts left-padded to `prompt_len` columns, so every
    completion starts there. Same definition as the rollout engines (`rollout/base.py`):
    `log_softmax(logits / T)` over the full vocabulary, so the ratio is 1 when weights agree.
    `model` may be a transformers model, a peft model or a DeepSpeed engine around one.
    """
    B, T = input_ids.shape
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does under left padding
    targets = input_ids[:, prompt_len:]  # (B, T - P)
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    # ZeRO-3 partitions the head's weight and gathers it only inside the model's own forward
    zero3 = hasattr(inner.get_output_embeddings().weight, "ds_id")
    if fast_head(inner) and not zero3:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, prompt_len - 1:-1]  # (B, T - P, H): the state before each token
        lp, ent = head_logprobs(inner.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]),
                                targets.reshape(-1), temperature, with_entropy, entropy_grad=entropy_grad)
        lp, ent = lp.view(B, -1), ent.view(B, -1)  # (B, T - P)
    else:  # logits scaled or capped after the head: the whole (B, T - P, V) block
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=T - prompt_len + 1)
        logits = out.logits[:, :-1].float()
        if temperature not in (0.0, 1.0):
            logits = logits / temperature
        logp = torch.log_softmax(logits, -1)  # (B, T - P, V)
        lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        ent = ent if entropy_grad else ent.detach()
    full = torch.zeros((B, T), dtype=lp.dtype, device=lp.device)
    full[:, prompt_len:] = lp
    if not with_entropy:
        return full, None
    ent_full = torch.zeros((B, T), dtype=ent.dtype, device=ent.device)
    ent_full[:, prompt_len:] = ent
    return full, ent_full


def packed_token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                          temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False
                          ) -> tuple[Tensor, Tensor | None]:
    """`token_logprobs` with no padding computed: the rows' real tokens run as one sequence whose
    position ids restart at each row, which transformers turns into varlen attention
    (flash_attention_2) or a block-diagonal mask (sdpa, eager). Same (B, T) layout and numbers.
    Models whose head is not plain (`fast_head`) and ZeRO-3 take the padded path."""
    inner = getattr(model, "module", model)
    if not fast_head(inner) or hasattr(inner.get_output_embeddings().weight, "ds_id"):
        return token_logprobs(model, input_ids, attention_mask, prompt_len, temperature, with_entropy, entropy_grad)
    B, T = input_ids.shape
    real = attention_mask.bool()  # (B, T): each row's real tokens are one contiguous run
    lengths = real.sum(1)  # (B,)
    starts = real.int().argmax(1)  # (B,) first real column of each row
    offsets = lengths.cumsum(0) - lengths  # (B,) where each row begins in the packed sequence
    position_ids = torch.cat([torch.arange(int(n), device=input_ids.device) for n in lengths])  # (N,)
    wanted = real.clone()
    wanted[:, :prompt_len] = False  # completion tokens only
    rows, cols = wanted.nonzero(as_tuple=True)  # (M,) each
    before = offsets[rows] + cols - starts[rows] - 1  # (M,) packed index of the token before each target
    out = model(input_ids=input_ids[real][None], position_ids=position_ids[None], use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][0, before]  # (M, H)
    lp, ent = head_logprobs(inner.get_output_embeddings(), hidden, input_ids[rows, cols], temperature, with_entropy,
                            entropy_grad=entropy_grad)
    full = torch.zeros((B, T), dtype=lp.dtype, device=lp.device).index_put((rows, cols), lp)
    if not with_entropy:
        return full, None
    return full, torch.zeros((B, T), dtype=ent.dtype, device=ent.device).index_put((rows, cols), ent)


def unique_prompts(input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> tuple[Tensor, Tensor]:
    """(U,) one row holding each distinct prompt (all but its last column, left-padded to
    `prompt_len`) and (B,) each row's prompt among those U."""
    P = prompt_len
    prefix = torch.cat([input_ids[:, :P - 1] * attention_mask[:, :P - 1], attention_mask[:, :P - 1]], 1)
    uniq, rows = torch.unique(prefix, dim=0, return_inverse=True)  # (U, 2P - 2), (B,)
    B = input_ids.shape[0]
    first = torch.zeros(uniq.shape[0], dtype=torch.long, device=rows.device).scatter_(
        0, rows.flip(0), torch.arange(B - 1, -1, -1, device=rows.device))
    return first, rows


def shared_prompt_token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                                 prompt_len: int, temperature: float = 1.0, with_entropy: bool = False,
                                 entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """`token_logprobs` with each distinct prompt computed once: the rows' prompts (a GRPO group's
    samples share theirs) run without their last token as U unique rows whose KV cache is then
    copied to the B rows (gradients flow back through the copy and sum), and only the last prompt
    token and the completions run per row. Same layout, positions and numbers as the padded path;
    falls back to it where nothing repeats, under gradient checkpointing (no cache), for models
    whose head is not plain and under ZeRO-3."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed wrap the model
    P = prompt_len
    if not prompt_replay.can_replay(model, P):  # the same conditions: a prefix, a plain head, a cache
        return token_logprobs(model, input_ids, attention_mask, prompt_len, temperature, with_entropy, entropy_grad)
    first, rows = unique_prompts(input_ids, attention_mask, P)
    if len(first) == input_ids.shape[0]:
        return token_logprobs(model, input_ids, attention_mask, prompt_len, temperature, with_entropy, entropy_grad)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as the padded path
    # the prompts through the bare model: under DDP only the second call may go through the wrapper
    # (one forward per backward for its reducer); the gradient hooks see both uses either way
    pre = inner(input_ids=input_ids[first, :P - 1], attention_mask=attention_mask[first, :P - 1],
                position_ids=position_ids[first, :P - 1], use_cache=True, logits_to_keep=1)
    cache = pre.past_key_values
    cache.reorder_cache(rows)  # (U, ...) -> (B, ...): index_select, differentiable
    return completion_logprobs(model, input_ids, attention_mask, P, cache, temperature, with_entropy, entropy_grad)


def completion_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                        cache: Any, temperature: float = 1.0, with_entropy: bool = False,
                        entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """`token_logprobs` given the KV `cache` of every row's prompt but its last column: only the last
    prompt token and the completions run (`shared_prompt_token_logprobs`, `align.prompt_replay`)."""
    inner = getattr(model, "module", model)
    B, T = input_ids.shape
    P = prompt_len
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as the padded path
    out = model(input_ids=input_ids[:, P - 1:], attention_mask=attention_mask, position_ids=position_ids[:, P - 1:],
                past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]  # (B, T - P, H): the state before each completion token
    lp, ent = head_logprobs(inner.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]),
                            input_ids[:, P:].reshape(-1), temperature, with_entropy, entropy_grad=entropy_grad)
    full = torch.zeros((B, T), dtype=lp.dtype, device=lp.device)
    full[:, P:] = lp.view(B, -1)
    if not with_entropy:
        return full, None
    ent_full = torch.zeros((B, T), dtype=ent.dtype, device=ent.device)
    ent_full[:, P:] = ent.view(B, -1)
    return full, ent_full


def plan_micro_batches(lengths: list[int], max_rows: int, max_tokens: int = 0, packed: bool = False) -> list[list[int]]:
    """Row indices of each micro-batch. Without a token budget: consecutive runs of `max_rows`.
    With one (`max_tokens` > 0): rows longest first, cut so that each micro-batch computes at most
    `max_tokens` tokens (real ones when `packed`, rows x longest row when padded), so that similar
    lengths share a micro-batch and little padding is computed; a row longer than the budget goes alone."""
    n = len(lengths)
    if max_tokens <= 0:
        return [list(range(i, min(i + max_rows, n))) for i in range(0, n, max_rows)]
    plans: list[list[int]] = []
    cur: list[int] = []
    longest = total = 0
    for i in sorted(range(n), key=lambda k: -lengths[k]):
        cost = total + lengths[i] if packed else max(longest, lengths[i]) * (len(cur) + 1)
        if cur and cost > max_tokens:
            plans.append(cur)
            cur, longest, total = [], 0, 0
        cur.append(i)
        longest, total = max(longest, lengths[i]), total + lengths[i]
    return plans + [cur] if cur else plans


def plan_shared_micro_batches(prompt_lens: list[int], completion_lens: list[int], groups: list[int],
                              max_tokens: int) -> list[list[int]]:
    """Row indices of each micro-batch when prompts are computed once per group
    (`shared_prompt_token_logprobs`): whole groups, longest completions first, cut so that each
    micro-batch computes at most `max_tokens` tokens (one padded prompt per group plus every row's
    padded completion); a group over the budget goes alone."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = sorted(members.values(), key=lambda rows: -max(completion_lens[i] for i in rows))
    plans: list[list[int]] = []
    cur: list[int] = []
    n_groups = long_p = long_c = 0
    for rows in order:
        p = max(long_p, max(prompt_lens[i] for i in rows))
        c = max(long_c, max(completion_lens[i] for i in rows))
        if cur and (n_groups + 1) * p + (len(cur) + len(rows)) * (c + 1) > max_tokens:
            plans.append(cur)
            cur, n_groups = [], 0
            p = max(prompt_lens[i] for i in rows)
            c = max(completion_lens[i] for i in rows)
        cur += rows
        n_groups, long_p, long_c = n_groups + 1, p, c
    return plans + [cur] if cur else plans


def trim(exp: Experience, left: bool = False) -> Experience:
    """Drop trailing columns that are padding in every row (a micro-batch of short completions)
    and, with `left`, leading ones too (short prompts; `prompt_len` moves with them)."""
    used = exp.attention_mask.any(0).nonzero()
    last = int(used[-1]) + 1 if len(used) else exp.prompt_len + 1
    first = min(int(used[0]), exp.prompt_len - 1) if left and len(used) else 0
    if last >= exp.input_ids.shape[1] and first == 0:
        return exp
    return Experience(**{k: (v[:, first:last] if v.dim() == 2 else v) for k, v in exp.tensors().items()},
                      prompt_len=exp.prompt_len - first)


def micro_batches(exp: Experience, rows: int, tokens: int = 0, packed: bool = False,
                  shared: bool = False) -> list[tuple[Tensor, Experience]]:
    """(row indices, micro-batch trimmed of all-padding columns) pairs that cover `exp`, planned by
    `plan_micro_batches`: `rows` rows each, or a budget of `tokens` tokens (real ones when `packed`;
    whole groups with their prompt counted once when `shared`: `plan_shared_micro_batches`)."""
    if shared and tokens > 0 and not packed:
        P = exp.prompt_len
        plans = plan_shared_micro_batches(exp.attention_mask[:, :P].sum(1).tolist(),
                                          exp.attention_mask[:, P:].sum(1).tolist(), exp.group_ids.tolist(), tokens)
    else:
        plans = plan_micro_batches(exp.attention_mask.sum(1).tolist(), rows, tokens, packed)
    out = []
    for plan in plans:
        idx = torch.tensor(plan, dtype=torch.long)
        out.append((idx, trim(exp.index(idx), left=True)))
    return out


def sequence_logprobs(model: torch.nn.Module, mb: Experience, temperature: float, packed: bool,
                      with_entropy: bool = False, shared: bool = False, entropy_grad: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
    """`token_logprobs` of a micro-batch: packed (`packed_token_logprobs`), prompts computed once
    (`shared_prompt_token_logprobs`) or padded; entropies differentiable with `entropy_grad`."""
    fn = packed_token_logprobs if packed else shared_prompt_token_logprobs if shared else token_logprobs
    return fn(model, mb.input_ids, mb.attention_mask, mb.prompt_len, temperature, with_entropy, entropy_grad)


def pad_to(x: Tensor, T: int) -> Tensor:
    """Right-pad a (B, t) tensor with zeros to (B, T)."""
    return F.pad(x, (0, T - x.shape[1])) if x.shape[1] < T else x


def logprobs_in_chunks(model: torch.nn.Module, exp: Experience, micro: int, temperature: float,
                       tokens: int = 0, packed: bool = False, shared: bool = False) -> Tensor:
    """(B, T) token logprobs of `exp` without gradients, in micro-batches of `micro` rows (or a
    budget of `tokens` tokens, packed, padded or prompt-shared: `micro_batches`; prompt-shared with a
    budget, every prompt once and rows cut by length: `align.prompt_replay`), on `exp`'s device."""
    out = torch.zeros(exp.input_ids.shape, dtype=torch.float32, device=exp.input_ids.device)
    with torch.no_grad():
        if shared and tokens > 0 and not packed and prompt_replay.can_replay(model, exp.prompt_len):
            prompts = prompt_replay.PromptCache(model, exp, grad=False)  # every prompt once, then rows by length
            for idx, mb in prompt_replay.row_micro_batches(exp, tokens):
                lp, _ = completion_logprobs(model, mb.input_ids, mb.attention_mask, mb.prompt_len, prompts.cache(idx),
                                            temperature)
                out[idx.to(out.device), :lp.shape[1]] = lp.float()
            return out
        for idx, mb in micro_batches(exp, micro, tokens, packed, shared):
            lp, _ = sequence_logprobs(model, mb, temperature, packed, shared=shared)
            left = exp.prompt_len - mb.prompt_len  # columns trimmed on the left
            out[idx.to(out.device), left:left + lp.shape[1]] = lp.float()
    return out
