"""Preference data for the offline stage: rows -> examples, and examples -> padded micro-batches.

Rows: pairs in the shapes of `align.pairs` (`prompt` / `chosen` / `rejected` as strings or chat
messages, HH-RLHF whole transcripts, chat transcripts); for KTO, unpaired rows `prompt` /
`completion` / `label` (bool, True = desirable), or pair rows, which it unpairs as TRL does (every
chosen completion desirable, every rejected one undesirable).

KTO's reference point z0 is estimated on mismatched pairs, built as TRL's KTOTrainer builds them
when it processes the data: rows are taken in blocks of the combined batch (`train.batch_size` x
processes) in data order, and the completion of row i is paired with the prompt of row i+1 of its
block (cyclically). A row keeps its partner when the trainer shuffles, so the reference's KL
log-probabilities can be precomputed too.

Batches waste no padding: a micro-batch is cut into groups of similar length (`length_buckets`,
`pair_buckets`), each padded to its own longest (padding all 16 sequences of a batch-8 step of
HH-RLHF pairs at max_length 256 to the longest wastes 44 % of the tokens). Pairs can share their
prompt (`PairChunk`: the prompt once, both completions after it; align/preference_logps.py).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from align import data as D
from align.config import DataConfig
from align.pairs import encode_pairs

# A forward pass costs a fixed overhead (Python, kernel launches, small-matrix inefficiency) worth
# about this many tokens of compute on a CPU; `length_buckets` weighs it against padding.
BUCKET_OVERHEAD_TOKENS = 64

Seq = tuple[list[int], list[int]]  # (prompt ids (P,), completion ids (C,))


@dataclass
class PreferenceDataConfig(DataConfig):
    """The data section, plus the KTO label column."""

    label_field: str = "label"  # KTO: column holding True (desirable) / False (undesirable)


@dataclass
class PrefExample:
    """One training row: its sequences and, once precomputed, their reference log-probabilities."""

    seqs: list[Seq]  # pairs: [chosen, rejected]; KTO: [completion, mismatched KL pair]
    label: bool = True  # KTO: True = desirable (pairs: unused)
    ref: list[float] | None = None  # summed reference log-probs, one per sequence


# ----------------------------------------------------------------------------- rows -> examples
def _fit(prompt: list[int], completion: list[int], max_length: int) -> Seq:
    """Cut a prompt from the left (and then the completion from the right) to fit max_length,
    keeping at least half of it for the prompt, as `align.pairs.encode_pairs` does."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    keep = max(max_length // 2, max_length - len(completion))
    prompt = prompt[-keep:] if keep > 0 else []
    return prompt, completion[:max_length - len(prompt)]


def _label(value: Any, where: str) -> bool:
    """A KTO label as bool (True/False, 1/0, "true"/"false")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise D.DataError(f"{where}: label must be a boolean (True = desirable), got {value!r}")


def _kto_items(rows: list[dict], cfg: PreferenceDataConfig, tokenizer,
               source: str) -> tuple[list[tuple[list[int], list[int], bool]], dict]:
    """(prompt ids, completion ids, label) of every KTO row, and the encoding stats."""
    if rows and cfg.completion_field not in rows[0] and cfg.chosen_field in rows[0]:  # pair rows: unpair
        pairs, stats = encode_pairs(rows, cfg, tokenizer, source)
        return ([(p.prompt_ids, p.chosen_ids, True) for p in pairs]
                + [(p.prompt_ids, p.rejected_ids, False) for p in pairs]), stats
    as_pairs = []
    for i, row in enumerate(rows):
        missing = D.missing_fields(row, (cfg.prompt_field, cfg.completion_field, cfg.label_field))
        if missing:
            raise D.DataError(f"{D.row_origin(row, i, source)}: missing field(s) {missing}; KTO rows need "
                              f"'{cfg.prompt_field}', '{cfg.completion_field}' and '{cfg.label_field}' (or "
                              f"chosen/rejected pairs) (have: {sorted(row)})")
        c = row[cfg.completion_field]
        as_pairs.append(D.Row({cfg.prompt_field: row[cfg.prompt_field], cfg.chosen_field: c, cfg.rejected_field: c},
                              D.row_origin(row, i, source)))  # errors in encode_pairs keep the file and line
    labels = [_label(r[cfg.label_field], D.row_origin(r, i, source)) for i, r in enumerate(rows)]
    pairs, stats = encode_pairs(as_pairs, cfg, tokenizer, source)  # same templating and truncation
    if len(pairs) != len(rows):  # a skipped row would shift every later label
        raise D.DataError(f"{source}: {stats['skipped']} KTO rows had no completion tokens left; "
                          "raise data.max_length or drop them")
    return [(p.prompt_ids, p.chosen_ids, lab) for p, lab in zip(pairs, labels)], stats


def encode_kto(rows: list[dict], cfg: PreferenceDataConfig, tokenizer, block: int,
               source: str = "data") -> tuple[list[PrefExample], dict]:
    """KTO examples from unpaired or pair rows, each with its mismatched KL partner (see above)."""
    items, stats = _kto_items(rows, cfg, tokenizer, source)
    out = []
    for start in range(0, len(items), block):
        members = items[start:start + block]
        for j, (prompt, completion, label) in enumerate(members):
            partner = members[(j + 1) % len(members)][0]  # the next row's prompt, within the block
            out.append(PrefExample([(prompt, completion), _fit(partner, completion, cfg.max_length)], label))
    return out, stats


def encode_examples(rows: list[dict], cfg: PreferenceDataConfig, tokenizer, kto: bool, block: int,
                    source: str = "data") -> tuple[list[PrefExample], dict]:
    """Rows -> examples for a pairwise loss (chosen, rejected) or for KTO (completion, KL partner)."""
    if kto:
        return encode_kto(rows, cfg, tokenizer, block, source)
    pairs, stats = encode_pairs(rows, cfg, tokenizer, source)
    return [PrefExample([(p.prompt_ids, p.chosen_ids), (p.prompt_ids, p.rejected_ids)]) for p in pairs], stats


# ----------------------------------------------------------------------------- length buckets
def _cut(n: int, cost: Callable[[int, int], float]) -> list[tuple[int, int]]:
    """Contiguous groups [i, j) of n sorted items minimising the summed `cost(i, j)` (dynamic
    programming over the cut points, O(n^2) cost calls)."""
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + cost(i, j)
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]


def length_buckets(lengths: Sequence[int], overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in groups that minimise padded tokens + `overhead` per group.

    The groups are contiguous runs of the lengths sorted longest first (an optimal grouping has
    that form): a group [i, j) costs (j - i) * L[i] + overhead.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    L = [lengths[i] for i in order]
    return [order[i:j] for i, j in _cut(len(L), lambda i, j: (j - i) * L[i] + overhead)]


def pair_buckets(prompt_lens: Sequence[int], completion_lens: Sequence[int],
                 overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Pairs grouped for shared-prompt forwards: sorted by prompt length, a group costs its padded
    prompts once, its padded completions twice (chosen and rejected), and two forward overheads."""
    order = sorted(range(len(prompt_lens)), key=lambda i: (-prompt_lens[i], -completion_lens[i]))
    P, C = [prompt_lens[i] for i in order], [completion_lens[i] for i in order]
    return [order[i:j] for i, j in _cut(len(P), lambda i, j: (j - i) * (P[i] + 2 * max(C[i:j])) + 2 * overhead)]


# ----------------------------------------------------------------------------- chunks
class _Tensors:
    """`tensors()` and `to(device)` for a chunk dataclass: `align.device.to_device` moves objects
    that have both (as it moves an Experience), so chunks travel with the batch to the device."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field by name (all are tensors)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to(self, device: torch.device | str):
        """A copy with every tensor on `device`."""
        return dataclasses.replace(self, **{k: v.to(device, non_blocking=True) for k, v in self.tensors().items()})


@dataclass
class Chunk(_Tensors):
    """Whole sequences (prompt + completion) padded together for one forward pass."""

    input_ids: torch.Tensor  # (b, T) right-padded prompt + completion
    attention_mask: torch.Tensor  # (b, T)
    loss_mask: torch.Tensor  # (b, T) 1 on completion tokens
    index: torch.Tensor  # (b,) each row's position in the batch's list of sequences


@dataclass
class PairChunk(_Tensors):
    """Pairs whose shared prompt goes through the model once; both completions attend to its
    key/value cache (gradients flow back through the cache into the prompt's forward)."""

    prompt_ids: torch.Tensor  # (b, P) left-padded, so every prompt ends at column P - 1
    prompt_mask: torch.Tensor  # (b, P)
    completion_ids: torch.Tensor  # (2b, C) right-padded; rows 2i, 2i + 1: chosen, rejected of pair i
    completion_mask: torch.Tensor  # (2b, C)
    index: torch.Tensor  # (2b,) each completion row's position in the batch's list of sequences


def make_chunks(seqs: Sequence[Seq], pad_id: int, overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[Chunk]:
    """Length-bucketed, right-padded chunks holding every sequence of `seqs` once."""
    chunks = []
    for group in length_buckets([len(p) + len(c) for p, c in seqs], overhead):
        T = max(len(seqs[i][0]) + len(seqs[i][1]) for i in group)
        ids = torch.full((len(group), T), pad_id, dtype=torch.long)  # (b, T)
        attn = torch.zeros((len(group), T), dtype=torch.long)  # (b, T)
        loss = torch.zeros((len(group), T), dtype=torch.long)  # (b, T)
        for r, i in enumerate(group):
            p, c = seqs[i]
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            attn[r, :len(p) + len(c)] = 1
            loss[r, len(p):len(p) + len(c)] = 1
        chunks.append(Chunk(ids, attn, loss, torch.tensor(group)))
    return chunks


def _pair_chunk(examples: Sequence[PrefExample], ks: list[int], pad_id: int) -> PairChunk:
    """One shared-prompt chunk of the pairs `ks` of `examples` (n pairs in all)."""
    n = len(examples)
    P = max(len(examples[k].seqs[0][0]) for k in ks)
    C = max(len(examples[k].seqs[s][1]) for k in ks for s in (0, 1))
    pid = torch.full((len(ks), P), pad_id, dtype=torch.long)  # (b, P)
    pmask = torch.zeros((len(ks), P), dtype=torch.long)  # (b, P)
    cid = torch.full((2 * len(ks), C), pad_id, dtype=torch.long)  # (2b, C)
    cmask = torch.zeros((2 * len(ks), C), dtype=torch.long)  # (2b, C)
    for r, k in enumerate(ks):
        prompt = examples[k].seqs[0][0]
        pid[r, P - len(prompt):], pmask[r, P - len(prompt):] = torch.tensor(prompt), 1
        for s in (0, 1):
            comp = examples[k].seqs[s][1]
            cid[2 * r + s, :len(comp)], cmask[2 * r + s, :len(comp)] = torch.tensor(comp), 1
    index = torch.tensor([k + s * n for k in ks for s in (0, 1)])  # (2b,)
    return PairChunk(pid, pmask, cid, cmask, index)


def make_pair_chunks(examples: Sequence[PrefExample], pad_id: int,
                     overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[Chunk | PairChunk]:
    """Shared-prompt chunks for pairs; sequence i < n is chosen of pair i, n + i its rejected.
    Pairs with an empty prompt (nothing to share) go into a plain chunk."""
    n = len(examples)
    empty = [k for k, ex in enumerate(examples) if not ex.seqs[0][0]]
    chunks: list[Chunk | PairChunk] = []
    if empty:
        plain = make_chunks([examples[k].seqs[s] for s in (0, 1) for k in empty], pad_id, overhead)
        ids = torch.tensor([k + s * n for s in (0, 1) for k in empty])
        chunks += [dataclasses.replace(ch, index=ids[ch.index]) for ch in plain]
    rest = [k for k in range(n) if examples[k].seqs[0][0]]
    groups = pair_buckets([len(examples[k].seqs[0][0]) for k in rest],
                          [max(len(examples[k].seqs[0][1]), len(examples[k].seqs[1][1])) for k in rest], overhead)
    return chunks + [_pair_chunk(examples, [rest[g] for g in group], pad_id) for group in groups]


def _real_tokens(chunks: list[Chunk | PairChunk]) -> torch.Tensor:
    """Every real token the chunks feed the model, once (the shared prompt once per pair), (N,)."""
    out = []
    for ch in chunks:
        if isinstance(ch, PairChunk):
            out += [ch.prompt_ids[ch.prompt_mask.bool()], ch.completion_ids[ch.completion_mask.bool()]]
        else:
            out.append(ch.input_ids[ch.attention_mask.bool()])
    return torch.cat(out)


def collate(examples: list[PrefExample], pad_id: int, kto: bool, share_prompt: bool = False) -> dict[str, Any]:
    """A micro-batch: the sequences that get gradients (pairs: n chosen then n rejected; KTO: n
    completions), KTO's KL partners (no gradient), labels and any precomputed reference log-probs."""
    n = len(examples)
    if kto or not share_prompt:
        chunks = make_chunks([ex.seqs[0] for ex in examples] + ([] if kto else [ex.seqs[1] for ex in examples]), pad_id)
    else:
        chunks = make_pair_chunks(examples, pad_id)
    # `input_ids`: every real token once, (num_tokens,); the trainer reads its size for tokens/s
    ids = _real_tokens(chunks)
    batch = {"chunks": chunks, "input_ids": ids, "n": n, "num_targets": n, "num_tokens": ids.numel()}
    if kto:
        batch["kl_chunks"] = make_chunks([ex.seqs[1] for ex in examples], pad_id)
        batch["labels"] = torch.tensor([ex.label for ex in examples])  # (n,) bool
    if all(ex.ref is not None for ex in examples):
        batch["ref"] = torch.tensor([ex.ref for ex in examples], dtype=torch.float32).T  # (2, n)
    return batch
