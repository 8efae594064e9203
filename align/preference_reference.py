"""Precomputed reference log-probabilities (`algorithm.reference=precompute`, the default).

One no-gradient pass over the train and eval data before training, with the initial model (a peft
adapter disabled), in length-sorted batches chunked as in training. Saved as
`reference-<hash>.safetensors` (hash of the model, dtype, autocast and token ids) in
`algorithm.reference_cache` (default: the run directory) and reused on resume, on a second run and
by the trials of a sweep; a file lock makes parallel trials compute a shared file once.

Under torchrun (align/distributed.py) every process needs the reference log-probs of whatever
examples it is given: each computes every N-th row, a sum gathers them on all processes, and rank 0
alone reads and writes the cache file (so no process reads another node's disk).
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

try:
    import fcntl  # POSIX file locks: parallel trials compute a shared reference cache once
except ImportError:  # Windows: no lock; concurrent trials may both compute (the rename stays atomic)
    fcntl = None

import torch

from align import distributed
from align.device import autocast as device_autocast
from align.device import to_device, to_host
from align.preference_data import PrefExample, make_chunks, make_pair_chunks
from align.preference_logps import sequence_logps
from align.tuning import is_peft

PRECOMPUTE_TOKENS = 4096  # padded tokens per no-gradient batch when precomputing reference log-probs


def reference_context(model: torch.nn.Module):
    """What turns the trained model into its reference: the adapter disabled, or nothing (a model
    that has not been updated yet, or a separate frozen copy)."""
    return model.disable_adapter() if is_peft(model) else nullcontext()


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


def _batches_by_length(examples: list[PrefExample], max_tokens: int) -> list[list[int]]:
    """Indices of `examples`, longest first, in batches of about `max_tokens` real tokens."""
    size = [sum(len(p) + len(c) for p, c in ex.seqs) for ex in examples]
    batches, cur, tokens = [], [], 0
    for i in sorted(range(len(examples)), key=lambda i: -size[i]):
        if cur and tokens + size[i] > max_tokens:
            batches.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += size[i]
    batches.append(cur)
    return batches


@torch.no_grad()
def compute_reference(model: torch.nn.Module, examples: list[PrefExample], pad_id: int, autocast: str = "none",
                      share_prompt: bool = False, max_tokens: int = PRECOMPUTE_TOKENS) -> torch.Tensor:
    """(n, k) reference log-probs of every sequence of `examples`: examples sorted by length, in
    batches of about `max_tokens` real tokens, chunked as in training, on the model's device with
    the trainer's autocast (so reference log-probs are computed as the policy's are)."""
    k, device = len(examples[0].seqs), next(model.parameters()).device
    out = torch.zeros(len(examples), k)
    was_training = model.training
    model.eval()
    with reference_context(model), device_autocast(device, autocast):
        for idx in _batches_by_length(examples, max_tokens):
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
