"""The offline preference stage: DPO (sigmoid, IPO, hinge, robust, cDPO), ORPO, SimPO and KTO on
preference data, with any fine-tuning method.

    align preference examples/preference.yaml algorithm.name=simpo
    align.preference.run(load_config(PreferenceConfig, "examples/preference.yaml"))

Data: pair rows in the shapes of `align.pairs` (`prompt` / `chosen` / `rejected` as strings or chat
messages, HH-RLHF whole transcripts, chat transcripts); KTO takes unpaired rows `prompt` /
`completion` / `label` (bool, True = desirable), or pair rows, which it unpairs as TRL does
(every chosen completion desirable, every rejected one undesirable).

What the loss sees (ALGORITHMS.md sections 6, 7, 9): for each sequence the completion
log-probability summed over completion tokens (the prompt is masked) and the completion length.
How they are computed, fastest first (all exact: the same numbers as one whole sequence at a time):
- shared prompt (`algorithm.share_prompt`, pairs): a pair's prompt goes through the model once and
  both completions attend to its key/value cache, gradients flowing back through the cache. On
  HH-RLHF pairs (prompt about 2/3 of a sequence) that is a third fewer tokens; not for
  prompt-learning adapters or gradient checkpointing, which fall back to whole sequences;
- no wasted padding: the micro-batch is cut into groups of similar length (`length_buckets`,
  `pair_buckets`), each padded to its own longest (padding all 16 sequences of a batch-8 step of
  HH-RLHF pairs at max_length 256 to the longest wastes 44 % of the tokens);
- logits only at completion positions: the LM head runs on the selected hidden states, never on
  the (B, T, V) block.

Reference log-probabilities (`algorithm.reference`, unused by reference-free ORPO / SimPO):
- `precompute` (default): one no-gradient pass over the train and eval data before training, with
  the initial model (a peft adapter disabled), in length-sorted batches. Saved as
  `reference-<hash>.safetensors` (hash of the model, dtype, autocast and token ids) in
  `algorithm.reference_cache` (default: the run directory) and reused on resume, on a second run
  and by the trials of a sweep.
- `adapter`: the same model with the peft adapter disabled, on the fly each step (TRL's default).
- `model`: a frozen copy of the initial model (full fine-tuning without precomputing).

KTO's reference point z0 is estimated on mismatched pairs, built as TRL's KTOTrainer builds them
when it processes the data: rows are taken in blocks of the combined batch (`train.batch_size` x
processes) in data order, and the completion of row i is paired with the prompt of row i+1 of its
block (cyclically). A row keeps its partner when the trainer shuffles, so the reference's KL
log-probabilities can be precomputed too. Under data parallelism z0 is the mean over the mismatched
pairs of all processes' slices (as TRL gathers them), so N processes compute the z0 of one process
with the combined batch.

Under torchrun (align/distributed.py) every process needs the reference log-probs of whatever
examples it is given: each computes every N-th row, a sum gathers them on all processes, and rank 0
alone reads and writes the cache file (so no process reads another node's disk).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

try:
    import fcntl  # POSIX file locks: parallel trials compute a shared reference cache once
except ImportError:  # Windows: no lock; concurrent trials may both compute (the rename stays atomic)
    fcntl = None

import torch
import torch.nn.functional as F

import algorithms
from align import data as D
from align import distributed
from align.config import (ConfigError, DataConfig, LogConfig, ModelConfig, PeftConfig, TrainConfig, from_dict,
                          save_config, to_dict)
from align.device import autocast as device_autocast
from align.device import to_device, to_host
from align.models import load_causal_lm, load_tokenizer, resolve_model, set_threads
from align.pairs import encode_pairs
from align.trainer import Trainer, TrainResult, place_model, plan_steps
from align.tuning import after_backward_hook, apply_tuning, count_parameters, is_peft, quantization_config, save_final

PREFERENCE_ALGORITHMS = ("dpo", "orpo", "simpo", "kto")  # registry names this stage runs
# A forward pass costs a fixed overhead (Python, kernel launches, small-matrix inefficiency) worth
# about this many tokens of compute on a CPU; `length_buckets` weighs it against padding.
BUCKET_OVERHEAD_TOKENS = 64
PRECOMPUTE_TOKENS = 4096  # padded tokens per no-gradient batch when precomputing reference log-probs
# Above this many logits (N x V) the LM head runs in tiles that are recomputed in backward, so
# memory stays O(tile) for long completions.
_HEAD_TILE_ELEMENTS = 64 * 2**20


# ----------------------------------------------------------------------------- config
@dataclass
class AlgorithmSection:
    """Which preference loss, its hyper-parameters, and where the reference log-probs come from."""

    name: Literal["dpo", "orpo", "simpo", "kto"] = "dpo"  # a registry name (algorithms/preference.py)
    params: dict[str, Any] = field(default_factory=dict)  # the algorithm's dataclass fields, e.g. beta, loss_type
    reference: Literal["precompute", "adapter", "model"] = "precompute"  # see the module docstring
    reference_cache: str | None = None  # directory for precomputed reference log-probs (None: the run directory)
    share_prompt: bool = True  # pairs: one forward over the shared prompt, both completions on its cache (exact)


@dataclass
class PreferenceDataConfig(DataConfig):
    """The data section, plus the KTO label column."""

    label_field: str = "label"  # KTO: column holding True (desirable) / False (undesirable)


@dataclass
class PreferenceConfig:
    """Offline preference tuning on pairs (DPO family, ORPO, SimPO) or labelled completions (KTO)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the policy (and reference) model
    peft: PeftConfig = field(default_factory=PeftConfig)  # the fine-tuning method
    data: PreferenceDataConfig = field(default_factory=lambda: PreferenceDataConfig(max_length=512))  # pairs
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/preference", lr=5e-5))  # the loop
    log: LogConfig = field(default_factory=LogConfig)  # metrics sinks
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)  # the loss and its reference


def build_algorithm(section: AlgorithmSection) -> Any:
    """The loss object for `section`; an unknown or invalid hyper-parameter stops with its name."""
    if section.name not in PREFERENCE_ALGORITHMS:
        raise ConfigError(f"algorithm.name={section.name!r}: the preference stage runs "
                          f"{', '.join(PREFERENCE_ALGORITHMS)}")
    cls = algorithms.get_class(section.name)
    try:  # from_dict names an unknown key with its closest valid one, and checks types
        return from_dict(cls, section.params, "algorithm.params")
    except (ValueError, TypeError) as exc:  # __post_init__ range checks (beta <= 0, bad loss_type)
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{exc} [{section.name}]") from None
        raise ConfigError(f"algorithm.params ({section.name}): {exc}") from None


# ----------------------------------------------------------------------------- data
Seq = tuple[list[int], list[int]]  # (prompt ids (P,), completion ids (C,))


@dataclass
class PrefExample:
    """One training row: its sequences and, once precomputed, their reference log-probabilities."""

    seqs: list[Seq]  # pairs: [chosen, rejected]; KTO: [completion, mismatched KL pair]
    label: bool = True  # KTO: True = desirable (pairs: unused)
    ref: list[float] | None = None  # summed reference log-probs, one per sequence


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


def encode_kto(rows: list[dict], cfg: PreferenceDataConfig, tokenizer, block: int,
               source: str = "data") -> tuple[list[PrefExample], dict]:
    """KTO examples from unpaired rows (`prompt` / `completion` / `label`) or from pair rows (unpaired:
    all chosen completions, then all rejected ones), each with its mismatched KL partner."""
    paired = bool(rows) and cfg.completion_field not in rows[0] and cfg.chosen_field in rows[0]
    if paired:
        pairs, stats = encode_pairs(rows, cfg, tokenizer, source)
        items = ([(p.prompt_ids, p.chosen_ids, True) for p in pairs]
                 + [(p.prompt_ids, p.rejected_ids, False) for p in pairs])
    else:
        as_pairs = []
        for i, row in enumerate(rows):
            missing = [f for f in (cfg.prompt_field, cfg.completion_field, cfg.label_field) if f not in row]
            if missing:
                raise D.DataError(f"{source} row {i}: missing field(s) {missing}; KTO rows need '{cfg.prompt_field}', "
                                  f"'{cfg.completion_field}' and '{cfg.label_field}' (or chosen/rejected pairs) "
                                  f"(have: {sorted(row)})")
            c = row[cfg.completion_field]
            as_pairs.append({cfg.prompt_field: row[cfg.prompt_field], cfg.chosen_field: c, cfg.rejected_field: c})
        labels = [_label(r[cfg.label_field], f"{source} row {i}") for i, r in enumerate(rows)]
        pairs, stats = encode_pairs(as_pairs, cfg, tokenizer, source)  # same templating and truncation
        if len(pairs) != len(rows):  # a skipped row would shift every later label
            raise D.DataError(f"{source}: {stats['skipped']} KTO rows had no completion tokens left; "
                              "raise data.max_length or drop them")
        items = [(p.prompt_ids, p.chosen_ids, lab) for p, lab in zip(pairs, labels)]
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


# ----------------------------------------------------------------------------- batching
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
    for group in groups:
        ks = [rest[g] for g in group]
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
        chunks.append(PairChunk(pid, pmask, cid, cmask, index))
    return chunks


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


# ----------------------------------------------------------------------------- log-probabilities
def _fast_head(model: torch.nn.Module) -> bool:
    """Whether logits are exactly lm_head(last hidden state): not so for models that scale or
    soft-cap logits after the head (Gemma 2, Cohere, Granite); those take the plain path."""
    cfg = model.config
    return all(getattr(cfg, a, None) is None for a in ("final_logit_softcapping", "logit_scale", "logits_scaling",
                                                        "output_multiplier", "lm_head_multiplier"))


def can_share_prompt(model: torch.nn.Module) -> bool:
    """Whether the shared-prompt forward applies: not for prompt-learning adapters (they own the
    cache or the input embeddings), gradient checkpointing (it turns the cache off), or models
    whose logits are not lm_head(last hidden state)."""
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    return not prompt_learning and not getattr(model, "is_gradient_checkpointing", False) and _fast_head(model)


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) log p(target) from (N, H) hidden states; tiles recomputed in backward when N x V is large."""
    vocab = head.weight.shape[0]

    def part(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(head(h).float(), t, reduction="none")  # (n,) from (n, V) logits

    tile = max(1, _HEAD_TILE_ELEMENTS // vocab)
    if hidden.shape[0] <= tile:
        return part(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    use_ckpt = torch.is_grad_enabled()
    return torch.cat([checkpoint(part, hidden[i:i + tile], targets[i:i + tile], use_reentrant=False) if use_ckpt
                      else part(hidden[i:i + tile], targets[i:i + tile]) for i in range(0, hidden.shape[0], tile)])


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
    tok = _token_logps(model.get_output_embeddings(), hidden[sel], ch.completion_ids[sel])  # (N,)
    return _row_sums(tok, sel)


def chunk_logps(model: torch.nn.Module, chunk: Chunk | PairChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (b,) and completion lengths (b,) of one chunk."""
    if isinstance(chunk, PairChunk):
        return pair_chunk_logps(model, chunk)
    ids, T = chunk.input_ids, chunk.input_ids.shape[1]
    sel = chunk.loss_mask[:, 1:].bool()  # (b, T-1): position t predicts completion token t + 1
    targets = ids[:, 1:][sel]  # (N,)
    if _fast_head(model):
        out = model(input_ids=ids, attention_mask=chunk.attention_mask, use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # (b, V + T, H): prompt-learning methods prepend V virtual tokens
        hidden = hidden[:, hidden.shape[1] - T:-1][sel]  # (N, H)
        tok = _token_logps(model.get_output_embeddings(), hidden, targets)  # (N,)
    else:
        logits = model(input_ids=ids, attention_mask=chunk.attention_mask, use_cache=False).logits  # (b, V + T, V)
        tok = -F.cross_entropy(logits[:, logits.shape[1] - T:-1][sel].float(), targets, reduction="none")  # (N,)
    return _row_sums(tok, sel)


def sequence_logps(model: torch.nn.Module, chunks: list[Chunk | PairChunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths of every sequence, in the batch's order (S,)."""
    parts = [chunk_logps(model, ch) for ch in chunks]
    order = torch.argsort(torch.cat([ch.index for ch in chunks]))  # (S,) chunk order -> batch order
    return torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order]


def reference_context(model: torch.nn.Module):
    """What turns the trained model into its reference: the adapter disabled, or nothing (a model
    that has not been updated yet, or a separate frozen copy)."""
    return model.disable_adapter() if is_peft(model) else nullcontext()


# ----------------------------------------------------------------------------- precomputed reference
def model_fingerprint(model: torch.nn.Module, name: str, dtype: str, autocast: str) -> str:
    """A short hash of what the reference log-probs depend on besides the data: the model's name,
    config, dtype, autocast, and a strided sample of every weight (so two different random models
    with one config never share a cache file)."""
    h = hashlib.sha256(json.dumps([name, dtype, autocast, model.config.to_json_string()]).encode())
    with torch.no_grad():
        for n, p in sorted(model.state_dict().items()):
            h.update(n.encode())
            if p.is_floating_point():
                h.update(p.detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _data_hash(examples: list[PrefExample], model_key: str) -> str:
    """Hash of the model key and every sequence's token ids."""
    h = hashlib.sha256(model_key.encode())
    for ex in examples:
        for p, c in ex.seqs:
            h.update(json.dumps([p, c]).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_reference(model: torch.nn.Module, examples: list[PrefExample], pad_id: int, autocast: str = "none",
                      share_prompt: bool = False, max_tokens: int = PRECOMPUTE_TOKENS) -> torch.Tensor:
    """(n, k) reference log-probs of every sequence of `examples`: examples sorted by length, in
    batches of about `max_tokens` real tokens, chunked as in training, on the model's device with
    the trainer's autocast (so reference log-probs are computed as the policy's are)."""
    k, device = len(examples[0].seqs), next(model.parameters()).device
    size = [sum(len(p) + len(c) for p, c in ex.seqs) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: -size[i])
    batches, cur, tokens = [], [], 0
    for i in order:
        if cur and tokens + size[i] > max_tokens:
            batches.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += size[i]
    batches.append(cur)
    out = torch.zeros(len(examples), k)
    was_training = model.training
    model.eval()
    with reference_context(model), device_autocast(device, autocast):
        for idx in batches:
            exs = [examples[i] for i in idx]
            chunks = (make_pair_chunks(exs, pad_id) if share_prompt
                      else make_chunks([ex.seqs[s] for s in range(k) for ex in exs], pad_id))
            lp, _ = sequence_logps(model, to_device(chunks, device))  # (k * b,): slot 0 of every example, then slot 1
            out[torch.tensor(idx)] = to_host(lp.float()).view(k, len(idx)).T
    model.train(was_training)
    return out


def attach_reference(model: torch.nn.Module, examples: list[PrefExample], pad_id: int, cache_dir: Path,
                     model_key: str, autocast: str = "none", share_prompt: bool = False, what: str = "train") -> bool:
    """Set `ex.ref` on every example, from the cache file when it exists (True) or computed and
    cached (False). The file is written atomically (temp file + rename). Under data parallelism
    every process calls this: rank 0 reads or writes the file, the rows are computed by all."""
    from safetensors.torch import load_file, save_file

    if not examples:
        return True
    path = cache_dir / f"reference-{_data_hash(examples, model_key)}.safetensors"
    main, device = distributed.is_main(), next(model.parameters()).device
    if main:
        cache_dir.mkdir(parents=True, exist_ok=True)
    # One process computes, the others (parallel sweep trials on the same data) wait and load.
    with _file_lock(path.with_suffix(".lock")) if main else nullcontext():
        cached = distributed.broadcast_object(main and path.is_file())
        ref = torch.zeros(len(examples), len(examples[0].seqs))  # (n, k)
        if cached and main:
            ref = load_file(str(path))["logps"]
        elif not cached:  # every world-th row here; zero elsewhere, so the sum below gathers the rows exactly
            mine = list(range(distributed.rank(), len(examples), distributed.world_size()))
            if mine:
                ref[mine] = compute_reference(model, [examples[i] for i in mine], pad_id, autocast, share_prompt)
        ref = distributed.all_reduce_sum(ref, device)  # (n, k) on every process
        if main and not cached:
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            save_file({"logps": ref.contiguous()}, str(tmp))
            tmp.rename(path)
    for ex, row in zip(examples, ref.tolist()):
        ex.ref = row
    if main:
        print(f"[align] reference log-probs for {len(examples)} {what} rows: "
              f"{'loaded from' if cached else 'computed and saved to'} {path}", flush=True)
    return cached


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` while the block runs (no lock where fcntl is missing)."""
    with open(path, "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------- loss
def _kto_metrics(metrics: dict[str, float], logps: torch.Tensor, ref: torch.Tensor,
                 labels: torch.Tensor, n: int) -> dict[str, float]:
    """KTO's metrics summed over rows for the trainer. Accuracy is per row: the implicit reward
    log-ratio lies on its label's side of the reference point z0 (ties count as wrong, as in DPO).
    rewards/logps of one kind are batch means times n (a mean over micro-batches that hold that kind)."""
    r = (logps - ref).detach()  # (n,)
    z0 = metrics["kl"]
    right = torch.where(labels, r > z0, r < z0).float().sum().item()
    out = {"rewards/accuracy": right, "kl": metrics["kl"] * n}
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        if key in metrics:
            out[key] = metrics[key] * n
    return out


def _global_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO's z0 is a mean over the mismatched pairs of the whole micro-batch: under data parallelism
    their summed log-ratios and count are summed over the processes and handed to the loss as one
    pair holding the global mean (TRL gathers them across ranks too). (A process that holds only a
    zero-weight placeholder, see align/trainer.py, adds its one pair.)"""
    if distributed.world_size() == 1:
        return kl_logps, ref_kl_logps
    diff = kl_logps - ref_kl_logps.to(kl_logps.dtype)  # (n,)
    total = distributed.all_reduce_sum(torch.stack([diff.sum(), diff.new_tensor(float(diff.numel()))]), diff.device)
    return (total[0] / total[1]).view(1), diff.new_zeros(1)  # (1,), (1,)


def preference_loss(model: torch.nn.Module, batch: dict[str, Any], algo: Any, reference: str,
                    ref_model: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The algorithm's loss on a micro-batch, as a sum over its rows (the trainer normalises)."""
    n, kto = batch["n"], "labels" in batch
    logps, lengths = sequence_logps(model, batch["chunks"])  # (S,), S = 2n pairs / n KTO
    needs_ref = getattr(algo, "needs_reference", False)
    ref = batch.get("ref")  # (2, n) precomputed
    if needs_ref and ref is None:
        if reference == "precompute":
            raise RuntimeError("algorithm.reference=precompute but the batch carries no reference log-probs")
        ref_net = ref_model if reference == "model" else model
        ctx = nullcontext() if reference == "model" else reference_context(model)
        with torch.no_grad(), ctx:
            r, _ = sequence_logps(ref_net, batch["chunks"])  # (S,)
            rk = sequence_logps(ref_net, batch["kl_chunks"])[0] if kto else r[n:]  # (n,)
        ref = torch.stack([r[:n], rk])  # (2, n)
    if kto:
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, batch["kl_chunks"])  # (n,) z0 is detached in the loss
        kl, ref_kl = _global_kl(kl_logps, ref[1])
        loss, metrics = algo.loss(policy_logps=logps, ref_logps=ref[0], labels=batch["labels"],
                                  kl_logps=kl, ref_kl_logps=ref_kl)
        return loss * n, _kto_metrics(metrics, logps, ref[0], batch["labels"], n)
    pc, pr = logps[:n], logps[n:]  # (n,) chosen, rejected
    lc, lr = lengths[:n].float(), lengths[n:].float()  # (n,)
    refs = dict(ref_chosen_logps=ref[0], ref_rejected_logps=ref[1]) if needs_ref else {}
    chosen_nll = -pc.sum() / lc.sum().clamp(min=1)  # token-mean NLL of the chosen completions (ORPO, RPO)
    loss, metrics = algo.loss(policy_chosen_logps=pc, policy_rejected_logps=pr, chosen_lengths=lc,
                              rejected_lengths=lr, chosen_nll=chosen_nll, **refs)
    return loss * n, {k: v * n for k, v in metrics.items() if k != "loss"}


# ----------------------------------------------------------------------------- the stage
@dataclass
class PreferenceRun:
    """What `run` returns."""

    model: torch.nn.Module  # the trained (possibly peft-wrapped) policy
    tokenizer: Any  # its tokenizer
    result: TrainResult  # history and evals (loss, rewards/*, logps/*)
    run_dir: Path  # the run directory; the model is in final/
    reference_cached: bool = False  # True when the precomputed reference log-probs came from the cache


def _read_data(cfg: PreferenceConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) as the data section says."""
    rows = D.read_rows(cfg.data.path, cfg.data.split, cfg.data.max_examples)
    if cfg.data.eval_path:
        return rows, D.read_rows(cfg.data.eval_path, cfg.data.split)
    return D.split_rows(rows, cfg.data.eval_fraction, cfg.train.seed)


def run(cfg: PreferenceConfig, model=None, tokenizer=None,
        callbacks: Sequence[Callable[[int, dict], None]] = ()) -> PreferenceRun:
    """Preference-tune as `cfg` says (a tiny `model` / `tokenizer` may be passed in)."""
    algo = build_algorithm(cfg.algorithm)  # config errors before any loading
    kto = cfg.algorithm.name == "kto"
    needs_ref = getattr(algo, "needs_reference", False)
    set_threads(cfg.train.num_threads)
    device = distributed.init_from_env(cfg.train.device)  # joins torchrun's processes, if any
    world, main = distributed.world_size(), distributed.is_main()
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    rows, eval_rows = _read_data(cfg)
    block = cfg.train.batch_size * world  # KTO's mismatched pairs stay within the combined batch
    train, stats = encode_examples(rows, cfg.data, tokenizer, kto, block, cfg.data.path)
    evals = encode_examples(eval_rows, cfg.data, tokenizer, kto, block, "eval split")[0] if eval_rows else []
    passed_in = model is not None
    if model is None:
        model = load_causal_lm(cfg.model, quantization_config(cfg.peft, cfg.model), device=cfg.train.device)
    model = place_model(model, device)  # before the reference copy and the precomputed log-probs
    ref_model, cached = None, False
    if needs_ref and cfg.algorithm.reference == "model":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the initial weights, frozen
    model_key = model_fingerprint(model, cfg.model.name, cfg.model.dtype, cfg.train.autocast) if needs_ref else ""
    total = plan_steps(len(train), cfg.train, world)[1]
    tok_path = resolve_model(cfg.model.name) if cfg.peft.prompt_init_text and not passed_in else None
    model = place_model(apply_tuning(model, cfg.peft, total_steps=total, tokenizer_path=tok_path), device)
    if needs_ref and cfg.algorithm.reference == "adapter" and not is_peft(model):
        raise ConfigError(f"algorithm.reference=adapter needs a peft adapter, but peft.method={cfg.peft.method}; "
                          "use algorithm.reference=precompute or model")
    n_train, n_all = count_parameters(model)
    if main:
        print(f"[align] preference ({cfg.algorithm.name}), peft.method={cfg.peft.method}: {n_train:,} trainable / "
              f"{n_all:,} parameters; {len(train)} train rows, {len(evals)} eval rows, {stats['truncated']} "
              f"truncated, {stats['skipped']} skipped; {world} process(es) on {device}", flush=True)
        save_config(cfg, run_dir / "config.yaml")
    share = cfg.algorithm.share_prompt and not kto and can_share_prompt(model)
    if needs_ref and cfg.algorithm.reference == "precompute":  # before resume: the initial model
        cache, pad = Path(cfg.algorithm.reference_cache or run_dir), tokenizer.pad_token_id
        cached = attach_reference(model, train, pad, cache, model_key, cfg.train.autocast, share)
        attach_reference(model, evals, pad, cache, model_key, cfg.train.autocast, share, "eval")
    collate_fn = functools.partial(collate, pad_id=tokenizer.pad_token_id, kto=kto, share_prompt=share)
    loss_fn = functools.partial(preference_loss, algo=algo, reference=cfg.algorithm.reference, ref_model=ref_model)
    trainer = Trainer(model, train, collate_fn, loss_fn, cfg.train, cfg.log, run_dir, to_dict(cfg), eval_examples=evals,
                      after_backward=after_backward_hook(model, cfg.peft), callbacks=callbacks, desc=cfg.algorithm.name)
    if cfg.train.resume and trainer.resume() and main:
        print(f"[align] resumed from step {trainer.step}", flush=True)
    result = trainer.train()
    if main:
        if cfg.log.plot:
            from align.tracking import plot_metrics

            plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots",
                         {"rewards_accuracy": ["rewards/accuracy", "eval/rewards/accuracy"],
                          "rewards_margins": ["rewards/margins", "eval/rewards/margins"],
                          "logps": ["logps/chosen", "logps/rejected"]})
        save_final(model, tokenizer, run_dir / "final", merged=cfg.train.save_merged)
    distributed.barrier()  # final/ is complete when run() returns on any process
    return PreferenceRun(model, tokenizer, result, run_dir, cached)
