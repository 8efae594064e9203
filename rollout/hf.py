"""Rollouts with Hugging Face `generate`: batched, KV-cached, left-padded; runs wherever torch runs.

The engine holds its own plain copy of the base model. LoRA updates are merged into that copy
(W0 + s * B @ A, computed from the original W0 kept aside, so updates never accumulate), so
generation pays no adapter cost: the "merged inference copy" of DESIGN.md. Logprobs follow the
convention of `rollout.base`: log_softmax(raw logits / T) at the sampled token, before top-k/top-p.
The device comes from `align.device.worker_device`; on a GPU, `sleep` parks the copy in host
memory while a colocated learner trains, and the next `generate` / `update_*` brings it back.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.device import HOST, empty_cache, worker_device
from align.types import Sample
from rollout.base import SamplingParams, StopStrings, check_columns, finish_sample
from rollout.lora import LoraDelta, merged_weight, parse_lora


def _dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """"auto" stays a string (the checkpoint's dtype); "bfloat16" etc. become torch dtypes."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    return getattr(torch, dtype)


def _left_padded(prompt_ids: list[list[int]], P: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """(B, P) token ids and attention mask, left-padded: every row's last prompt token at P - 1."""
    input_ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, P - len(ids):] = torch.tensor(ids)
        attention_mask[row, P - len(ids):] = 1
    return input_ids, attention_mask


class HFEngine:
    """`RolloutEngine` on transformers `generate` (CPU or GPU)."""

    def __init__(self, model: str | Path | Any, tokenizer: Any = None,
                 dtype: str | torch.dtype = "auto", num_threads: int | None = None,
                 device: str | torch.device = "auto", max_batch_size: int = 64,
                 share_prefix: bool = True) -> None:
        """`model`: a checkpoint directory or a plain (not peft-wrapped) causal LM, which is copied;
        `num_threads`: torch intra-op threads for this process (set deliberately: ENVIRONMENT.md);
        `device`: what `align.device.worker_device` takes (a torch.device, or one of
        `align.device.DEVICES`; "auto" = this process's GPU if it has one, else the host);
        `max_batch_size`: most sequences (prompts x n) per `generate` call; `share_prefix`: a
        prompt's samples share one prefill of it (its KV cache copied per sample)."""
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if isinstance(model, (str, Path)):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
            model = AutoModelForCausalLM.from_pretrained(str(model), dtype=_dtype(dtype))
        else:
            if hasattr(model, "peft_config"):
                raise TypeError("HFEngine takes the base model; push adapters with update_lora")
            if tokenizer is None:
                raise ValueError("HFEngine(model_object) needs its tokenizer too")
            model = copy.deepcopy(model)  # merging LoRA must never touch the learner's weights
            if dtype != "auto":
                model = model.to(_dtype(dtype))
        self.device = worker_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._asleep = False
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.share_prefix = share_prefix
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        # A checkpoint's generation_config may carry repetition penalties, top_k=50 and the like;
        # sampling must be exactly what SamplingParams says, so the engine starts from a blank one.
        self.model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=self.pad_id)
        # state_dict names, not named_parameters: tied weights (lm_head = embed_tokens, as in
        # SmolLM2) appear under both names in the learner's state dict
        self._params = dict(self.model.state_dict(keep_vars=True))
        self._base: dict[str, Tensor] = {}  # original weights of LoRA-adapted layers, by param name
        self._lora: list[LoraDelta] = []  # the adapter merged now (re-merged after update_weights)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[str], sampling: SamplingParams, group_offset: int = 0,
                 columns: list[dict[str, Any]] | None = None,
                 prompt_ids: list[list[int]] | None = None) -> list[Sample]:
        """`sampling.n` samples per prompt, prompt-major (see `RolloutEngine.generate`)."""
        columns = check_columns(prompts, columns)
        self.wake()
        if prompt_ids is None:
            prompt_ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        rows = [i for i in range(len(prompts)) for _ in range(sampling.n)]
        samples = []
        devices = [self.device] if self.device != HOST else []  # a GPU's generator too
        with torch.random.fork_rng(devices=devices):  # a seed must not reset the caller's RNG
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start:start + self.max_batch_size]
                outs = self._generate_batch([prompt_ids[i] for i in chunk], sampling)
                for i, (ids, lps) in zip(chunk, outs):
                    samples.append(finish_sample(self.tokenizer, self.eos_ids, prompts[i], prompt_ids[i],
                                                 ids, lps, sampling, group_offset + i, columns[i]))
        return samples

    @torch.no_grad()
    def _generate_batch(self, prompt_ids: list[list[int]], sampling: SamplingParams
                        ) -> list[tuple[list[int], list[float] | None]]:
        """Generated ids (padding stripped later) and their logprobs, one pair per row."""
        P = max(len(p) for p in prompt_ids)
        input_ids, attention_mask = _left_padded(prompt_ids, P, self.pad_id)  # (B, P) each
        kw: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, return_dict_in_generate=True,
            output_logits=sampling.logprobs, repetition_penalty=1.0,
        )
        if not sampling.greedy:
            kw.update(temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=max(sampling.top_k, 0))  # top_k 0 = off; None would mean 50 here
        if sampling.stop:
            from transformers import StoppingCriteriaList
            kw["stopping_criteria"] = StoppingCriteriaList([StopStrings(self.tokenizer,
                                                                         sampling.stop, P)])
        if self.share_prefix:
            cache = self._prefill_once(prompt_ids, P)
            if cache is not None:  # generate() then runs only the prompts' last column itself
                kw["past_key_values"] = cache
        out = self.model.generate(input_ids=input_ids.to(self.device),
                                  attention_mask=attention_mask.to(self.device), **kw)
        gen = out.sequences[:, P:].to(HOST)  # (B, C)
        lps = None
        if sampling.logprobs:  # step by step: a (B, C, V) float block would be 400 MB at 32 x 64 x 49k
            temp = sampling.temperature if not sampling.greedy else 1.0
            ids = out.sequences[:, P:]  # (B, C) on the device
            lps = torch.stack([torch.log_softmax(step.float() / temp, dim=-1)  # (B, V) raw, before any warper
                               .gather(-1, ids[:, t:t + 1]).squeeze(-1)
                               for t, step in enumerate(out.logits)], dim=1).to(HOST)  # (B, C)
        return [(gen[b].tolist(), None if lps is None else lps[b].tolist())
                for b in range(gen.shape[0])]

    def _prefill_once(self, prompt_ids: list[list[int]], P: int) -> Any:
        """A KV cache of the first P - 1 columns of every row, computed once per distinct prompt
        and copied to its rows (a group's n samples share a prompt: n - 1 of n prefills saved);
        None when no prompt repeats. Same left-padded layout and positions as generate()'s own."""
        first: dict[tuple[int, ...], int] = {}
        rows = [first.setdefault(tuple(p), len(first)) for p in prompt_ids]
        if len(first) == len(prompt_ids) or P < 2:
            return None
        ids, mask = _left_padded([list(p) for p in first], P, self.pad_id)  # (U, P)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids[:, :-1].to(self.device), attention_mask=mask[:, :-1].to(self.device),
                         position_ids=position_ids[:, :-1].to(self.device), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.reorder_cache(torch.tensor(rows, device=self.device))  # (U, ...) -> (B, ...): row b gets its prompt's
        return cache

    # ------------------------------------------------------------------ weight sync
    @torch.no_grad()
    def update_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Copy full or partial base weights in (HF names); a merged LoRA stays on top of them."""
        self.wake()
        unknown = [k for k in state_dict if k not in self._params]
        if unknown:
            raise KeyError(f"update_weights: {len(unknown)} names are not parameters of the "
                           f"model, e.g. {unknown[:3]}")
        for name, tensor in state_dict.items():
            if name in self._base:  # the new base of an adapted layer
                self._base[name] = tensor.detach().to(self.device, self._params[name].dtype).clone()
            else:
                self._params[name].copy_(tensor)
        self._merge(self._lora)

    @torch.no_grad()
    def update_lora(self, lora_tensors: dict[str, Tensor], peft_config: dict[str, Any]) -> None:
        """Merge this adapter into the inference copy, replacing any adapter merged before (empty
        `lora_tensors` = back to the base model)."""
        deltas = parse_lora(lora_tensors, peft_config)
        self.wake()
        for d in deltas:
            name = d.module + ".weight"
            if name not in self._params:
                raise KeyError(f"update_lora: the model has no layer {d.module!r}")
            if name not in self._base:  # first time this layer is adapted: keep W0 aside
                self._base[name] = self._params[name].detach().clone()
        self._lora = deltas
        self._merge(deltas)

    def _merge(self, deltas: list[LoraDelta]) -> None:
        """Every adapted layer := W0 (+ its delta when `deltas` adapts it)."""
        by_name = {d.module + ".weight": d for d in deltas}
        for name, base in self._base.items():
            d = by_name.get(name)
            self._params[name].copy_(merged_weight(base, d) if d is not None else base)

    def sleep(self) -> None:
        """On a GPU: move the inference copy (and the kept W0 of adapted layers) to host memory
        and return the freed memory to the driver, for a colocated learner. A no-op on the CPU."""
        if self.device != HOST and not self._asleep:
            self._move(HOST)
            empty_cache(self.device)
            self._asleep = True

    def wake(self) -> None:
        """Move what `sleep` parked back onto the engine's device; a no-op when awake."""
        if self._asleep:
            self._move(self.device)
            self._asleep = False

    @torch.no_grad()
    def _move(self, device: torch.device) -> None:
        """The model and the kept W0 tensors onto `device`. `Module.to` swaps buffers for new
        tensors, so the name -> tensor map that weight updates write into is rebuilt."""
        self.model.to(device)
        self._base = {k: v.to(device) for k, v in self._base.items()}
        self._params = dict(self.model.state_dict(keep_vars=True))
