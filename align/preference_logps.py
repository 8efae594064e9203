"""What a preference loss sees: each sequence's completion log-probability summed over its completion
tokens (the prompt is masked), and the completion length (ALGORITHMS.md sections 6, 7, 9).

Computed from the chunks of align/preference_data.py, fastest first, all exact (the same numbers
as one whole sequence at a time, tested):
- shared prompt (`PairChunk`): a pair's prompt goes through the model once and both completions
  attend to its key/value cache, gradients flowing back through the cache. On HH-RLHF pairs (prompt
  about 2/3 of a sequence) that is a third fewer tokens; not for prompt-learning adapters or
  gradient checkpointing (`can_share_prompt`), which fall back to whole sequences;
- logits only at completion positions: the LM head runs on the selected hidden states, never on
  the (B, T, V) block, through the RL learners' tiled head (`align.logprobs.head_logprobs`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from align.logprobs import fast_head, head_logprobs
from align.preference_data import Chunk, PairChunk


def can_share_prompt(model: torch.nn.Module) -> bool:
    """Whether the shared-prompt forward applies: not for prompt-learning adapters (they own the
    cache or the input embeddings), gradient checkpointing (it turns the cache off), or models
    whose logits are not lm_head(last hidden state)."""
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    return not prompt_learning and not getattr(model, "is_gradient_checkpointing", False) and fast_head(model)


def _head_logps(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) log p(target) from (N, H) hidden states through the model's LM head (temperature 1)."""
    return head_logprobs(model.get_output_embeddings(), hidden, targets)[0]


def _row_sums(tok: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums (b,) of per-token values `tok` (N,) laid out where `sel` (b, T) is True, and counts."""
    rows = sel.nonzero()[:, 0]  # (N,) the row of each selected token
    return torch.zeros(sel.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok), sel.sum(1)


def pair_chunk_logps(model: torch.nn.Module, ch: PairChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (2b,) and lengths (2b,): the prompts' forward once, then both
    completions of each pair on its key/value cache (exact: the same numbers as whole sequences)."""
    pos = (ch.prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (b, P) positions under left padding
    out = model(input_ids=ch.prompt_ids, attention_mask=ch.prompt_mask, position_ids=pos, use_cache=True,
                output_hidden_states=True, logits_to_keep=1)
    first = out.hidden_states[-1][:, -1].repeat_interleave(2, 0)  # (2b, H): predicts each first completion token
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)  # (2b, heads, P, d) per layer: row 2i, 2i + 1 share prompt i
    C = ch.completion_ids.shape[1]
    start = ch.prompt_mask.sum(1).repeat_interleave(2)  # (2b,) prompt lengths
    attn = torch.cat([ch.prompt_mask.repeat_interleave(2, 0), ch.completion_mask], 1)  # (2b, P + C)
    pos = start[:, None] + torch.arange(C, device=start.device)  # (2b, C) positions after each prompt
    out = model(input_ids=ch.completion_ids, attention_mask=attn, position_ids=pos,
                past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    hidden = torch.cat([first[:, None], out.hidden_states[-1][:, :-1]], 1)  # (2b, C, H): state before each token
    sel = ch.completion_mask.bool()  # (2b, C)
    return _row_sums(_head_logps(model, hidden[sel], ch.completion_ids[sel]), sel)  # tokens (N,) -> rows


def chunk_logps(model: torch.nn.Module, chunk: Chunk | PairChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (b,) and completion lengths (b,) of one chunk."""
    if isinstance(chunk, PairChunk):
        return pair_chunk_logps(model, chunk)
    ids, T = chunk.input_ids, chunk.input_ids.shape[1]
    sel = chunk.loss_mask[:, 1:].bool()  # (b, T-1): position t predicts completion token t + 1
    targets = ids[:, 1:][sel]  # (N,)
    if fast_head(model):
        out = model(input_ids=ids, attention_mask=chunk.attention_mask, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (b, V + T, H): prompt-learning methods prepend V virtual tokens
        tok = _head_logps(model, hidden[:, hidden.shape[1] - T:-1][sel], targets)  # (N,) from (N, H)
    else:  # logits scaled or capped after the head: the whole block
        logits = model(input_ids=ids, attention_mask=chunk.attention_mask, use_cache=False).logits  # (b, V + T, V)
        tok = -F.cross_entropy(logits[:, logits.shape[1] - T:-1][sel].float(), targets, reduction="none")  # (N,)
    return _row_sums(tok, sel)


def sequence_logps(model: torch.nn.Module, chunks: list[Chunk | PairChunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths of every sequence, in the batch's order (S,)."""
    parts = [chunk_logps(model, ch) for ch in chunks]
    order = torch.argsort(torch.cat([ch.index for ch in chunks]))  # (S,) chunk order -> batch order
    return torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order]
