"""Preference pairs: rows in the common shapes -> (prompt, chosen, rejected) token ids.

Shapes accepted:
- `prompt` / `chosen` / `rejected`, each a string or a list of chat messages;
- whole transcripts `chosen` / `rejected` with the prompt as their shared prefix (HH-RLHF: the
  prefix is cut back to the end of the last "Assistant:" turn marker both share);
- chat-message transcripts `chosen` / `rejected` whose messages agree up to the last one.
An optional `margin` column feeds the reward model's Bradley-Terry margin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from align.config import DataConfig
from align.data import DataError, _as_messages, missing_fields, row_origin


@dataclass
class Pair:
    """One tokenised preference pair; the prompt is shared, completions differ."""

    prompt_ids: list[int]  # (P,)
    chosen_ids: list[int]  # (C,) chosen completion
    rejected_ids: list[int]  # (R,) rejected completion
    margin: float = 0.0  # Bradley-Terry margin for this pair (reward model only)


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) from two transcripts with a shared prefix."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    marker = prefix.rfind("Assistant:")
    if marker >= 0:
        cut = marker + len("Assistant:")
    else:  # no turn marker: cut at the last whitespace so no word is split between the halves
        cut = max(prefix.rfind(" "), prefix.rfind("\n")) + 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _texts(row: dict, cfg: DataConfig, tokenizer, where: str) -> tuple[str, str, str, bool]:
    """The row's (prompt, chosen, rejected) texts, chat template applied where it applies, and
    whether it was (templated completions already end with the end-of-turn token)."""
    missing = missing_fields(row, (cfg.chosen_field, cfg.rejected_field))
    if missing:
        raise DataError(f"{where}: missing or empty field(s) {missing}; preference rows look like "
                        f"{{'{cfg.prompt_field}': ..., '{cfg.chosen_field}': ..., '{cfg.rejected_field}': ...}} "
                        f"(text or chat messages), or whole transcripts {{'{cfg.chosen_field}': ..., "
                        f"'{cfg.rejected_field}': ...}} that share the prompt (this row has: {sorted(row)}; "
                        "data.prompt_field / chosen_field / rejected_field name the columns)")
    chosen, rejected = row[cfg.chosen_field], row[cfg.rejected_field]
    prompt = row.get(cfg.prompt_field)
    use_chat = cfg.template == "chat" or (cfg.template == "auto" and bool(tokenizer.chat_template))
    c_msgs, r_msgs = _as_messages(chosen), _as_messages(rejected)
    if prompt is None and c_msgs is not None and r_msgs is not None:
        if c_msgs[:-1] != r_msgs[:-1]:
            raise DataError(f"{where}: chosen and rejected conversations differ before their last message")
        prompt, chosen, rejected = c_msgs[:-1], c_msgs[-1:], r_msgs[-1:]
    elif prompt is None:
        prompt, chosen, rejected = split_transcripts(str(chosen), str(rejected))
        return prompt, chosen, rejected, False  # raw transcripts keep their own format
    p_msgs = _as_messages(prompt)
    if use_chat:
        p_msgs = p_msgs or [{"role": "user", "content": str(prompt)}]
        prefix = tokenizer.apply_chat_template(p_msgs, add_generation_prompt=True, tokenize=False)

        def completion(c: Any) -> str:
            msgs = _as_messages(c) or [{"role": "assistant", "content": str(c)}]
            return tokenizer.apply_chat_template(p_msgs + msgs, tokenize=False)[len(prefix):]

        return prefix, completion(chosen), completion(rejected), True
    return str(prompt), str(chosen), str(rejected), False


def encode_pairs(rows: list[dict], cfg: DataConfig, tokenizer, source: str = "data") -> tuple[list[Pair], dict]:
    """Tokenise pair rows; over-long pairs lose prompt tokens from the left, then completion tokens
    from the right (or are skipped with overlong=skip). Returns the pairs and counts."""
    pairs, stats = [], {"total": 0, "truncated": 0, "skipped": 0}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i, row in enumerate(rows):
        stats["total"] += 1
        p, c, r, templated = _texts(row, cfg, tokenizer, row_origin(row, i, source))
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"]
        if not templated:  # raw text: end each completion with EOS so the model learns to stop
            c_ids, r_ids = c_ids + eos, r_ids + eos
        longest = len(p_ids) + max(len(c_ids), len(r_ids))
        if longest > cfg.max_length:
            if cfg.overlong == "skip":
                stats["skipped"] += 1
                continue
            stats["truncated"] += 1
            keep_prompt = max(cfg.max_length // 2, cfg.max_length - max(len(c_ids), len(r_ids)))
            p_ids = p_ids[-keep_prompt:] if keep_prompt > 0 else []
            room = cfg.max_length - len(p_ids)
            c_ids, r_ids = c_ids[:room], r_ids[:room]
        if not c_ids or not r_ids:
            stats["skipped"] += 1
            continue
        margin = float(row.get(cfg.margin_field, 0.0) or 0.0)
        pairs.append(Pair(p_ids, c_ids, r_ids, margin))
    if not pairs:
        raise DataError(f"{source}: no usable preference pair ({stats})")
    return pairs, stats


def collate_side(pairs: list[Pair], side: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + `side` completion: input_ids, attention_mask and loss_mask (B, T)."""
    seqs = [(p.prompt_ids, getattr(p, f"{side}_ids")) for p in pairs]
    T = max(len(a) + len(b) for a, b in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    loss = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (a, b) in enumerate(seqs):
        n = len(a) + len(b)
        ids[i, :n] = torch.tensor(a + b)
        attn[i, :n] = 1
        loss[i, len(a):n] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
