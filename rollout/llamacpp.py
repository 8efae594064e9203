"""Rollouts on llama.cpp (through `llama-cpp-python`): the CPU engine, batched, prefix-shared.

llama.cpp runs the forward passes; everything else stays the learner's: prompts arrive as the
caller's token ids, completions are decoded with the Hugging Face tokenizer, and sampling happens
here in torch from the raw logits, so the logprob convention is exactly `rollout.base`'s
(log_softmax(logits / T) at the sampled token, before top-k / top-p).

Weights: the checkpoint is written once as a GGUF file in `outtype`: f32 matches the learner's
numerics best and is what `rollout.dtype: auto` serves; bf16 decoded 1.5x faster than f32 on an
AVX512-BF16 CPU, f16 and q8_0 in between, but a LoRA update merged into bf16 weights is mostly
lost to rounding (README). A LoRA update is folded into the model file's weights in place and the
file reloaded (`lora="merge"`), or served as a llama.cpp adapter file beside the base weights
(`lora="adapter"`: hot swap, slower decode); full weight updates rewrite and reload the model file. A group's samples share one KV
copy of their prompt: llama.cpp's unified KV cache lets a cell belong to several sequences, so a
prompt is prefilled once however many samples it has. Llama-architecture checkpoints only (the
exporter's limit, `align.gguf_export`).
"""
from __future__ import annotations

import copy
import ctypes
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from align.gguf_export import _permute_rope
from align.types import Sample
from rollout.base import SamplingParams, StopStrings, check_columns, finish_sample
from rollout.lora import parse_lora, scaled_adapter

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # the GGUF weight types the engine can serve


def claim_workdir(parent: str | None) -> tuple[Path, int]:
    """A fresh directory for an engine's GGUF files under `parent` (None: the temp dir), locked
    (flock) while its engine lives; directories whose engine died without closing (a killed run or
    actor: 0.5-1 GB each, in RAM under /dev/shm) are removed first. Returns (path, lock fd)."""
    for old in Path(parent or tempfile.gettempdir()).glob("align-llamacpp-*"):
        _remove_if_abandoned(old)
    path = Path(tempfile.mkdtemp(prefix="align-llamacpp-", dir=parent))
    fd = os.open(path / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, fd


def _remove_if_abandoned(path: Path) -> None:
    """Remove an engine directory whose lock no process holds (the kernel drops a dead one's)."""
    try:
        fd = os.open(path / ".lock", os.O_RDWR)
    except OSError:  # no lock: being created right now, or not ours
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # its engine is alive
        os.close(fd)
        return
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)


def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log callback: drop its load-time chatter (errors still reach us as return codes)."""


class LlamaCppEngine:
    """`RolloutEngine` on llama.cpp (CPU)."""

    _log_cb = None  # the ctypes callback must outlive every model (kept on the class)

    def __init__(self, model: str | Path | Any, tokenizer: Any = None, num_threads: int | None = None,
                 max_batch_size: int = 64, outtype: str = "f32", lora: str = "merge",
                 workdir: str | None = None) -> None:
        """`model`: a Llama checkpoint directory or a plain causal LM in memory (then `tokenizer`
        too); `num_threads`: llama.cpp's threads (None = all cores); `max_batch_size`: most
        sequences decoded together; `outtype`: the GGUF weight type; `lora`: "merge" (fold each
        adapter into the weights of the model file, rewritten in place) or "adapter" (a llama.cpp
        adapter file applied beside the weights: a faster sync, a slower decode); `workdir`: where
        the GGUF files go (default: a fresh directory in /dev/shm where it exists, removed by `close`)."""
        try:
            import llama_cpp
        except ImportError as e:
            raise ImportError("rollout.backend=llamacpp needs llama-cpp-python "
                              "(pip install 'align[llamacpp]')") from e
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if outtype not in OUTTYPES:
            raise ValueError(f"llama.cpp engine outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
        if lora not in ("merge", "adapter"):
            raise ValueError(f"llama.cpp engine lora={lora!r}: 'merge' or 'adapter'")
        self.ll = llama_cpp
        if LlamaCppEngine._log_cb is None:
            LlamaCppEngine._log_cb = llama_cpp.llama_log_callback(_quiet)
            llama_cpp.llama_log_set(LlamaCppEngine._log_cb, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
        if isinstance(model, (str, Path)):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
            model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        elif hasattr(model, "peft_config"):
            raise TypeError("LlamaCppEngine takes the base model; push adapters with update_lora")
        elif tokenizer is None:
            raise ValueError("LlamaCppEngine(model_object) needs its tokenizer too")
        else:
            model = copy.deepcopy(model)  # weight updates must never touch the caller's (learner's) model
        # the base weights, on the host in float32: updates land here and are rewritten into the GGUF file
        self.model = model.to("cpu", torch.float32).eval().requires_grad_(False)
        self.tokenizer, self.outtype, self.lora_mode = tokenizer, outtype, lora
        self.threads = num_threads or os.cpu_count() or 1
        self.max_batch_size = max_batch_size
        self.before_decode: Any = None  # called before each decode step (a worker's core-loan check)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = eos
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._own_dir, self._lock = workdir is None, None
        if workdir is None:
            self.workdir, self._lock = claim_workdir(shm)
        else:
            self.workdir = Path(workdir)
        self._model = self._ctx = self._adapter = None
        self._ctx_size = (0, 0)  # (n_ctx, n_seq_max) of the current context
        self._lora: dict[str, Tensor] = {}  # adapter mode: the adapter served now (scale folded into B)
        self._merged: dict[str, Tensor] = {}  # merge mode: scale * B @ A by base parameter name
        self._export()

    # ------------------------------------------------------------------ model files
    def _export(self) -> None:
        """Write the base weights as a GGUF file once and load it; later weight changes rewrite
        the tensors of that file in place (`_rewrite`), whose layout is noted here."""
        from align.gguf_export import _tensors, export_gguf

        self.path = export_gguf(self.model, self.workdir, self.outtype, tokenizer=self.tokenizer, name="base")
        # GGUFWriter puts the tensor data last, in the order given, each padded to 32 bytes
        arrays = [(g, a) for g, a, _ in _tensors(self.model, self.outtype)]
        pad = [-(-a.nbytes // 32) * 32 for _, a in arrays]
        offset = self.path.stat().st_size - sum(pad)
        self._layout: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        for (g, a), size in zip(arrays, pad):
            self._layout[g] = (offset, a.shape, a.dtype)
            offset += size
        g, a = arrays[-1]
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._layout[g][0]
        if not np.array_equal(mm[start:start + a.nbytes], a.reshape(-1).view(np.uint8)):
            raise RuntimeError(f"unexpected GGUF layout in {self.path}: in-place weight updates would corrupt it")
        del mm
        self._gguf_names = _gguf_names(self.model)
        self._load_model()

    def _rewrite(self, names: list[str]) -> None:
        """Rewrite these base parameters (HF names) in the model file, each with its merged LoRA
        delta on top, and reload it (a reload of a file in /dev/shm takes a fraction of a second)."""
        from align.gguf_export import _encode

        self._free(model=True)
        params = self.model.state_dict()
        mm = np.memmap(self.path, dtype=np.uint8, mode="r+")
        for name in names:
            gname, perm = self._gguf_names.get(name, (None, 0))
            if gname is None:  # tied lm_head: llama.cpp reads token_embd for both
                continue
            w = params[name].float()
            if name in self._merged:
                w = w + self._merged[name]
            if perm:
                w = _permute_rope(w, perm)
            data = _encode(w.numpy(), self.outtype)[0]
            offset, shape, dtype = self._layout[gname]
            assert data.shape == shape and data.dtype == dtype, (name, data.shape, shape)
            mm[offset:offset + data.nbytes] = data.reshape(-1).view(np.uint8)
        mm.flush()
        del mm
        self._load_model()

    def _load_model(self) -> None:
        """(Re)load the model file; the served adapter file is re-applied (adapter mode)."""
        self._free(model=True)
        params = self.ll.llama_model_default_params()
        self._model = self.ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self.n_vocab = self.ll.llama_vocab_n_tokens(self.ll.llama_model_get_vocab(self._model))
        if self._lora:
            self._set_adapter(self._lora)

    def _context(self, n_ctx: int, n_seq: int) -> Any:
        """A context with room for `n_ctx` KV cells shared by `n_seq` sequences (kept while big enough)."""
        if self._ctx is not None and self._ctx_size[0] >= n_ctx and self._ctx_size[1] >= n_seq:
            return self._ctx
        self._free(model=False)
        cp = self.ll.llama_context_default_params()
        n_ctx = max(n_ctx, self._ctx_size[0], 512)
        n_seq = max(n_seq, self._ctx_size[1])
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = n_ctx, n_seq, True  # unified: prompt cells shared across sequences
        cp.n_batch = cp.n_ubatch = min(n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = self.threads
        self._ctx = self.ll.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} cells for {n_seq} sequences")
        self._ctx_size = (n_ctx, n_seq)
        self._batch = self.ll.llama_batch_init(cp.n_batch, 0, n_seq)
        self._batch_cap = cp.n_batch
        if self._adapter is not None:
            self._apply_adapter()
        return self._ctx

    def set_threads(self, n: int) -> None:
        """Decode with `n` threads from the next step on (the context keeps its other settings)."""
        self.threads = n
        if self._ctx is not None:
            self.ll.llama_set_n_threads(self._ctx, n, n)

    def _free(self, model: bool) -> None:
        """Free the context (and the model with its adapter when `model`)."""
        if self._ctx is not None:
            self.ll.llama_batch_free(self._batch)
            self.ll.llama_free(self._ctx)
            self._ctx, self._ctx_size = None, (0, 0)
        if model and self._model is not None:
            if self._adapter is not None:
                self.ll.llama_adapter_lora_free(self._adapter)
                self._adapter = None
            self.ll.llama_model_free(self._model)
            self._model = None

    def close(self) -> None:
        """Free llama.cpp's memory and remove the GGUF files this engine wrote."""
        self._free(model=True)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the module globals may already be gone
            pass

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[str], sampling: SamplingParams, group_offset: int = 0,
                 columns: list[dict[str, Any]] | None = None,
                 prompt_ids: list[list[int]] | None = None) -> list[Sample]:
        """`sampling.n` samples per prompt, prompt-major (see `RolloutEngine.generate`)."""
        columns = check_columns(prompts, columns)
        if prompt_ids is None:
            prompt_ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        rows = [i for i in range(len(prompts)) for _ in range(sampling.n)]
        gen = torch.Generator()
        if sampling.seed is not None:
            gen.manual_seed(sampling.seed)
        else:
            gen.seed()
        samples = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            outs = self._generate_batch([prompt_ids[i] for i in chunk], sampling, gen)
            for i, (ids, lps) in zip(chunk, outs):
                samples.append(finish_sample(self.tokenizer, self.eos_ids, prompts[i], prompt_ids[i], ids, lps,
                                             sampling, group_offset + i, columns[i]))
        return samples

    def _add(self, token: int, pos: int, seqs: list[int], logits: bool) -> None:
        """Append one token to the batch, at `pos` in every sequence of `seqs`."""
        b, i = self._batch, self._batch.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, len(seqs), logits
        for j, s in enumerate(seqs):
            b.seq_id[i][j] = s
        b.n_tokens = i + 1

    def _decode(self) -> None:
        """Run the batch through the model; raises on llama.cpp's error codes."""
        rc = self.ll.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} (KV cache full or bad batch)")
        self._batch.n_tokens = 0

    def _generate_batch(self, prompt_ids: list[list[int]], sampling: SamplingParams, gen: torch.Generator
                        ) -> list[tuple[list[int], list[float] | None]]:
        """Generated ids and their logprobs, one pair per row (rows cut at EOS later)."""
        B, C = len(prompt_ids), sampling.max_new_tokens
        groups: dict[tuple[int, ...], list[int]] = {}  # distinct prompt -> its rows (= sequence ids)
        for row, p in enumerate(prompt_ids):
            groups.setdefault(tuple(p), []).append(row)
        self._context(sum(len(p) for p in groups) + B * (C + 1), B)
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self._ctx), True)
        for p, seqs in groups.items():  # prefill all but each prompt's last token, once per prompt
            for pos, tok in enumerate(p[:-1]):
                if self._batch.n_tokens == self._batch_cap:
                    self._decode()
                self._add(tok, pos, seqs, False)
        if self._batch.n_tokens:
            self._decode()
        last = [(p[-1], len(p) - 1) for p in prompt_ids]  # the token each row feeds next, at its position
        out: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        alive = list(range(B))
        stop = StopStrings(self.tokenizer, sampling.stop, 0) if sampling.stop else None
        for _ in range(C):
            for s in alive:
                self._add(*last[s], [s], True)
            if self.before_decode is not None:
                self.before_decode()
            self._decode()
            logits = torch.from_numpy(np.ctypeslib.as_array(  # (A, V), llama.cpp's buffer: copied by the ops below
                self.ll.llama_get_logits(self._ctx), shape=(len(alive), self.n_vocab)))
            tokens, logp = _sample_tokens(logits, sampling, gen)  # (A,), (A,)
            for r, s in enumerate(alive):
                out[s].append(int(tokens[r]))
                lps[s].append(float(logp[r]))
                last[s] = (int(tokens[r]), last[s][1] + 1)
            done = [out[s][-1] in self.eos_ids for s in alive]
            if stop is not None:  # decode only the tail that can hold a stop string (StopStrings.window)
                texts = self.tokenizer.batch_decode([out[s][-stop.window:] for s in alive], skip_special_tokens=True)
                done = [d or any(x in t for x in stop.stop) for d, t in zip(done, texts)]
            alive = [s for s, d in zip(alive, done) if not d]
            if not alive:
                break
        return [(out[b], lps[b] if sampling.logprobs else None) for b in range(B)]

    # ------------------------------------------------------------------ weight sync
    @torch.no_grad()
    def update_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Copy full or partial base weights in (HF names); a served adapter stays on top."""
        params = dict(self.model.state_dict(keep_vars=True))
        unknown = [k for k in state_dict if k not in params]
        if unknown:
            raise KeyError(f"update_weights: {len(unknown)} names are not parameters of the model, "
                           f"e.g. {unknown[:3]}")
        for name, tensor in state_dict.items():
            params[name].copy_(tensor)
        self._rewrite(list(state_dict))

    @torch.no_grad()
    def update_lora(self, lora_tensors: dict[str, Tensor], peft_config: dict[str, Any]) -> None:
        """Serve base + this adapter, replacing any before it (empty `lora_tensors` = the base model):
        merged into the model file's weights, or as an adapter file (`lora="adapter"`)."""
        deltas = parse_lora(lora_tensors, peft_config)
        if any(d.fan_in_fan_out for d in deltas):
            raise NotImplementedError("fan_in_fan_out adapters (GPT-2 Conv1D) are not Llama layers")
        if self.lora_mode == "adapter":
            self._lora = scaled_adapter(deltas)
            self._set_adapter(self._lora)
            return
        params = self.model.state_dict()
        for d in deltas:
            if d.module + ".weight" not in params:
                raise KeyError(f"update_lora: the model has no layer {d.module!r}")
        before = set(self._merged)
        self._merged = {d.module + ".weight": d.delta() for d in deltas}
        self._rewrite(sorted(before | set(self._merged)))  # layers adapted before and not now go back to W0

    def _set_adapter(self, tensors: dict[str, Tensor]) -> None:
        """Write `tensors` (peft names, scale folded into B) as a llama.cpp LoRA GGUF and apply it."""
        if self._adapter is not None:
            if self._ctx is not None:
                self.ll.llama_set_adapters_lora(self._ctx, None, 0, None)
            self.ll.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if not tensors:
            return
        path = write_lora_gguf(tensors, self.model.config, self.workdir / "adapter.gguf")
        self._adapter = self.ll.llama_adapter_lora_init(self._model, str(path).encode())
        if not self._adapter:
            raise RuntimeError(f"llama.cpp rejected the adapter file {path}")
        if self._ctx is not None:
            self._apply_adapter()

    def _apply_adapter(self) -> None:
        """Attach the loaded adapter to the context at scale 1 (the scale is already in B)."""
        adapters = (self.ll.llama_adapter_lora_p_ctypes * 1)(self._adapter)
        scales = (ctypes.c_float * 1)(1.0)
        if self.ll.llama_set_adapters_lora(self._ctx, adapters, 1, scales) != 0:
            raise RuntimeError("llama.cpp could not attach the LoRA adapter")

    def sleep(self) -> None:
        """Nothing to free between rollouts on a CPU."""

    def wake(self) -> None:
        """Nothing to restore."""


def _sample_tokens(logits: Tensor, sampling: SamplingParams, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(A,) sampled tokens and their logprobs under log_softmax(logits / T), before top-k / top-p.
    Sampling inverts each row's CDF at one uniform draw: 32 random numbers a step instead of the
    32 x V that torch.multinomial or Gumbel noise draw (those cost ~80 ms a step at V = 49k)."""
    if sampling.greedy:
        tokens = logits.argmax(-1)
        return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    z = logits / sampling.temperature  # (A, V)
    kept = z
    if 0 < sampling.top_k < kept.shape[-1]:
        kth = kept.topk(sampling.top_k, dim=-1).values[:, -1:]  # (A, 1)
        kept = kept.masked_fill(kept < kth, float("-inf"))
    if sampling.top_p < 1.0:  # smallest set of most likely tokens whose mass reaches top_p
        sorted_z, order = kept.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop = torch.zeros_like(kept, dtype=torch.bool).scatter(-1, order, before >= sampling.top_p)
        kept = kept.masked_fill(drop, float("-inf"))
    cdf = kept.softmax(-1).double().cumsum(-1)  # (A, V); float64: no drift over 49k+ terms
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]  # (A, 1)
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # zero-mass tokens never hit
    return tokens, z.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


def _gguf_names(model: Any) -> dict[str, tuple[str | None, int]]:
    """HF parameter name -> (GGUF tensor name, heads whose rope rows it permutes, else 0); a tied
    lm_head maps to None (llama.cpp uses token_embd for the output)."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    out: dict[str, tuple[str | None, int]] = {}
    for hf in model.state_dict():
        if hf == "lm_head.weight" and config.tie_word_embeddings:
            out[hf] = (None, 0)
            continue
        perm = n_head if hf.endswith(("q_proj.weight", "q_proj.bias")) else \
            n_kv if hf.endswith(("k_proj.weight", "k_proj.bias")) else 0
        out[hf] = (names.get_name(hf, try_suffixes=(".weight", ".bias")), perm)
    return out


def write_lora_gguf(tensors: dict[str, Tensor], config: Any, path: Path) -> Path:
    """A llama.cpp LoRA adapter file: A as `<tensor>.lora_a` (r, in), scale * B as `.lora_b`
    (out, r), q/k rows in GGML's rope order, adapter alpha 0 (= the scale given at attach time)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 0.0)
    for name, t in sorted(tensors.items()):
        module, ab = name.removeprefix("base_model.model.").rsplit(".lora_", 1)
        gname = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise ValueError(f"llama.cpp has no tensor for adapted module {module!r} (LoRA on the "
                             "attention and MLP projections is served; use rollout.backend=hf otherwise)")
        data = t.detach().float().cpu()
        if ab.startswith("B") and module.endswith(("q_proj", "k_proj")):
            data = _permute_rope(data, n_head if module.endswith("q_proj") else n_kv)  # rows = output features
        w.add_tensor(f"{gname}.lora_{'a' if ab.startswith('A') else 'b'}", data.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path
