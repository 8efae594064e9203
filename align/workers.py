"""The workers of online RL, each a plain class that `ActorGroup` turns into Ray actors:

- `RolloutWorker`: one rollout engine (vLLM or HF generate); takes weight updates.
- `PolicyLearner`: the policy (a transformers model under any fine-tuning method) and its optimizer;
  computes old / reference logprobs and runs the algorithm's loss. When the policy is a PEFT
  adapter the reference is the same model with the adapter disabled: no second copy.
- `ReferenceWorker`: a frozen copy of the initial policy, only for full / freeze / BitFit tuning.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from align.config import ModelConfig, PeftConfig
from align.experience import token_logprobs
from align.models import load_causal_lm, set_threads
from align.types import Experience, Sample
from align.tuning import apply_tuning, is_peft, quantization_config, trainable_state_dict

_MERGEABLE_ADAPTERS = {"lora", "dora", "adalora", "ia3", "qlora"}
# Loss metrics of a micro-batch are its share of the minibatch loss (normalised by the minibatch's
# counts): they add up over micro-batches. Every other metric is a per-token mean: token-weighted.
_ADDITIVE = ("loss", "pg_loss", "value_loss")


class MetricSums:
    """Accumulates micro-batch metrics into per-update means (see `_ADDITIVE`)."""

    def __init__(self) -> None:
        self.weighted: dict[str, float] = {}
        self.added: dict[str, float] = {}
        self.tokens = 0.0
        self.updates = 0

    def add(self, metrics: dict[str, float], tokens: float, prefix: str = "") -> None:
        """One micro-batch's metrics over `tokens` completion tokens."""
        self.tokens += tokens
        for k, v in metrics.items():
            if k in _ADDITIVE:
                self.added[prefix + k] = self.added.get(prefix + k, 0.0) + float(v)
            else:
                self.weighted[prefix + k] = self.weighted.get(prefix + k, 0.0) + float(v) * tokens

    def means(self) -> dict[str, float]:
        """Per-update means: losses averaged over optimizer updates, the rest over tokens."""
        out = {k: v / max(self.tokens, 1.0) for k, v in self.weighted.items()}
        out.update({k: v / max(self.updates, 1) for k, v in self.added.items()})
        return out


def _trim(exp: Experience) -> Experience:
    """Drop trailing columns that are padding in every row (a micro-batch of short completions)."""
    used = exp.attention_mask.any(0).nonzero()
    last = int(used[-1]) + 1 if len(used) else exp.prompt_len + 1
    if last >= exp.input_ids.shape[1]:
        return exp
    return Experience(**{k: (v[:, :last] if v.dim() == 2 else v) for k, v in exp.tensors().items()},
                      prompt_len=exp.prompt_len)


def group_order(group_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random row order that keeps each group's rows together (online preference pairs need
    their two rows adjacent; for the other algorithms any order is as good as this one)."""
    ids = group_ids.unique()
    perm = ids[torch.randperm(len(ids), generator=generator)]
    return torch.cat([(group_ids == g).nonzero().flatten() for g in perm])


def autocast(dtype: str):
    """bf16 autocast for forward passes (3x faster forward + backward on CPUs with AVX512-BF16 / AMX,
    measured on SmolLM2 + LoRA); a no-op context for "none". Logprobs are taken in float32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _pad_to(x: torch.Tensor, T: int) -> torch.Tensor:
    """Right-pad a (B, t) tensor with zeros to (B, T)."""
    return torch.nn.functional.pad(x, (0, T - x.shape[1])) if x.shape[1] < T else x


class RolloutWorker:
    """One rollout engine behind the `RolloutEngine` protocol."""

    def __init__(self, backend: str, model: Any, tokenizer: Any = None, dtype: str = "float32",
                 num_threads: int = 0, seed: int = 0, max_lora_rank: int = 64, max_model_len: int | None = None,
                 vllm_kwargs: dict | None = None, enable_lora: bool = True):
        from rollout import make_engine

        threads = set_threads(num_threads)
        self.engine = make_engine(backend, model=model, tokenizer=tokenizer, dtype=dtype, num_threads=threads,
                                  enable_lora=enable_lora, max_lora_rank=max_lora_rank, seed=seed,
                                  max_model_len=max_model_len, vllm_kwargs=vllm_kwargs)
        self.backend = type(self.engine).__name__
        self.version = 0  # weights version last loaded; 0 = the initial checkpoint (also after a restart)

    def generate(self, prompts: list[str], sampling: Any, group_offset: int = 0,
                 columns: list[dict] | None = None) -> tuple[list[Sample], float, int]:
        """Samples for `prompts`, the seconds generation took, and the weights version that made them
        (a restarted worker reports 0, so the driver re-syncs it and asks again)."""
        t0 = time.perf_counter()
        out = self.engine.generate(prompts, sampling, group_offset=group_offset, columns=columns)
        return out, time.perf_counter() - t0, self.version

    def update(self, payload: dict[str, Any]) -> float:
        """Load weights from `PolicyLearner.sync_payload`; returns the seconds it took."""
        t0 = time.perf_counter()
        self.version = payload.get("version", self.version + 1)
        if payload["kind"] == "lora":
            self.engine.update_lora(payload["tensors"], payload["config"])
        else:
            self.engine.update_weights(payload["tensors"])
        return time.perf_counter() - t0

    def ping(self) -> bool:
        """True once the worker is up (used to wait for actor start-up)."""
        return True


def _logprobs_in_chunks(model: torch.nn.Module, exp: Experience, micro: int, temperature: float) -> torch.Tensor:
    """(B, T) token logprobs of `exp` without gradients, `micro` rows at a time."""
    T = exp.input_ids.shape[1]
    out = []
    with torch.no_grad():
        for mb in exp.split(micro):
            mb = _trim(mb)
            lp, _ = token_logprobs(model, mb.input_ids, mb.attention_mask, mb.prompt_len, temperature)
            out.append(_pad_to(lp, T))
    return torch.cat(out)


class ReferenceWorker:
    """The frozen initial policy, for KL terms when the policy is not a PEFT adapter."""

    def __init__(self, model_cfg: ModelConfig, num_threads: int = 0, model: torch.nn.Module | None = None,
                 temperature: float = 1.0, micro_batch_size: int = 8):
        set_threads(num_threads)
        self.model = (model if model is not None else load_causal_lm(model_cfg)).eval().requires_grad_(False)
        self.temperature, self.micro = temperature, micro_batch_size

    def logprobs(self, exp: Experience) -> torch.Tensor:
        """(B, T) reference logprobs."""
        return _logprobs_in_chunks(self.model, exp, self.micro, self.temperature)


class DataParallel:
    """Data parallelism shared by the policy and critic learners: N actors in one torch.distributed
    group, each on whole groups of the batch, token counts summed and gradients averaged, so N
    learners take the step one learner would take on the combined batch (tested)."""

    def init_distributed(self, rank: int, world_size: int, port: int, host: str = "127.0.0.1") -> int:
        """Join the learners' process group (gloo on CPUs, NCCL on GPUs); returns the rank."""
        import torch.distributed as dist

        import os

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # DeepSpeed reads the launcher's variables; Ray gives each GPU actor its own device 0
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=host, MASTER_PORT=str(port),
                          LOCAL_RANK="0" if torch.cuda.is_available() else str(rank))
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size)
        if getattr(self, "zero_stage", 0):
            self._init_deepspeed()
        return rank

    def _global_counts(self, counts: dict[str, int]) -> dict[str, float]:
        """Token / sequence counts of the whole minibatch across learners, divided by the number of
        learners because gradients are averaged (algorithms/core.py's rule for data parallelism)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return counts
        t = torch.tensor([float(counts["num_tokens"]), float(counts["num_seqs"])])
        dist.all_reduce(t)
        w = dist.get_world_size()
        return {"num_tokens": float(t[0]) / w, "num_seqs": float(t[1]) / w}

    def _average_gradients(self) -> None:
        """All-reduce the gradients (mean over learners): every learner takes the same step."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        w = dist.get_world_size()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= w


class PolicyLearner(DataParallel):
    """The trainable policy, its optimizer and the update loop over one rollout batch."""

    def __init__(self, model_cfg: ModelConfig, peft_cfg: PeftConfig, lr: float, total_steps: int,
                 weight_decay: float = 0.0, warmup_steps: int = 0, max_grad_norm: float = 1.0,
                 temperature: float = 1.0, micro_batch_size: int = 8, seed: int = 0, num_threads: int = 0,
                 model: torch.nn.Module | None = None, amp: str = "none", zero_stage: int = 0,
                 zero_offload: bool = False):
        set_threads(num_threads)
        torch.manual_seed(seed)
        self.amp = amp
        self.zero_stage, self.zero_offload, self.engine = zero_stage, zero_offload, None
        if model is None:
            model = load_causal_lm(model_cfg, quantization_config(peft_cfg, model_cfg))
        if peft_cfg.method in ("prefix", "prompt", "ptuning", "bitfit"):
            raise ValueError(f"peft.method={peft_cfg.method} changes the model's structure in a way no rollout "
                             "engine can serve yet; RL takes full, freeze, lora, qlora, dora, adalora or ia3")
        self.model = apply_tuning(model, peft_cfg, total_steps=total_steps)
        self.method = peft_cfg.method
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)) if warmup_steps else 1.0)
        self.max_grad_norm, self.temperature, self.micro = max_grad_norm, temperature, micro_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        from align.tuning import after_backward_hook

        self.after_step = after_backward_hook(self.model, peft_cfg)

    def _init_deepspeed(self) -> None:
        """Wrap the model and optimizer in a DeepSpeed ZeRO engine (stage 2 or 3, optional CPU offload).

        Micro-batch losses are already normalised by the whole minibatch, so the engine neither
        scales by gradient-accumulation steps nor decides the boundary: `backward` marks the last
        micro-batch of each minibatch.
        """
        import deepspeed

        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_offload:
            zero["offload_optimizer"] = {"device": "cpu"}
        group = self.optimizer.param_groups[0]
        # DeepSpeed builds the optimizer itself (torch's AdamW, same hyper-parameters): a client
        # optimizer under ZeRO-3 did not follow the plain learner's updates exactly
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": zero, "gradient_clipping": self.max_grad_norm or 0.0,
                  "optimizer": {"type": "AdamW", "params": {
                      "lr": group["lr"], "betas": list(group["betas"]), "eps": group["eps"],
                      "weight_decay": group["weight_decay"], "torch_adam": True, "adam_w_mode": True}},
                  "steps_per_print": 2**31, "bf16": {"enabled": self.amp == "bfloat16" and torch.cuda.is_available()}}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=self.params, config=config, dist_init_required=False)

    def _gathered(self):
        """A context in which ZeRO-3's partitioned parameters are whole (a no-op otherwise)."""
        import contextlib

        if self.zero_stage != 3 or self.engine is None:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()))

    # ------------------------------------------------------------------ experience
    def logprobs(self, exp: Experience, old: bool, ref: bool) -> dict[str, torch.Tensor]:
        """Behaviour-policy and/or reference logprobs of `exp` (reference = adapter disabled)."""
        self.model.eval()
        out = {}
        with autocast(self.amp):
            if old:
                out["old_logprobs"] = _logprobs_in_chunks(self.model, exp, self.micro, self.temperature)
            if ref:
                if not is_peft(self.model):
                    raise RuntimeError("reference logprobs of a non-PEFT policy come from a ReferenceWorker")
                with self.model.disable_adapter():
                    out["ref_logprobs"] = _logprobs_in_chunks(self.model, exp, self.micro, self.temperature)
        self.model.train()
        return out

    def backward(self, mini: Experience, loss_fn: Any, sums: MetricSums) -> None:
        """Accumulate the gradient of one minibatch over micro-batches, metrics into `sums`.

        The loss is normalised by the whole minibatch's counts (algorithms/core.py), so the summed
        micro-batch gradients equal the gradient of the minibatch in one piece (tested).
        """
        from algorithms.core import normalizers

        counts = self._global_counts(normalizers(mini.action_mask))
        micro = list(mini.split(self.micro))
        for k, mb in enumerate(micro):
            mb = _trim(mb)
            # Under ZeRO the forward goes through the engine: ZeRO-3 counts micro-steps there, and
            # without that count every micro-batch's gradient overwrote the one before it
            net = self.engine if self.engine is not None else self.model
            with autocast(self.amp):
                lp, ent = token_logprobs(net, mb.input_ids, mb.attention_mask, mb.prompt_len,
                                         self.temperature, with_entropy=True)
            fields = {k: v for k, v in mb.tensors().items() if k not in ("input_ids", "attention_mask")}
            loss, metrics = loss_fn(logprobs=lp, **fields, **counts)
            if self.engine is not None:  # ZeRO: the engine reduces gradients at the boundary
                self.engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
                self.engine.backward(loss, scale_wrt_gas=False)
            else:
                loss.backward()
            w = float(mb.action_mask.sum())
            metrics["entropy"] = float((ent * mb.action_mask).sum()) / max(w, 1.0)
            sums.add(metrics, w)
        sums.updates += 1
        if self.engine is None:
            self._average_gradients()

    def update(self, exp: Experience, algorithm: Any, epochs: int = 1, minibatches: int = 1) -> dict[str, float]:
        """`epochs` x `minibatches` optimizer steps of `algorithm.loss` over `exp`; token-weighted mean metrics."""
        loss_fn = getattr(algorithm, "policy_loss", None) or algorithm.loss
        sums = MetricSums()
        skipped, norms = 0, []
        size = math.ceil(len(exp) / minibatches)
        for _ in range(epochs):
            order = group_order(exp.group_ids, self.generator)
            for start in range(0, len(exp), size):
                self.backward(exp.index(order[start:start + size]), loss_fn, sums)
                if self.engine is not None:  # clipping, the step and zeroing happen inside DeepSpeed
                    self.engine.step()
                    norms.append(float(self.engine.get_global_grad_norm() or 0.0))
                    continue
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
                norms.append(float(norm))
                if torch.isfinite(norm):  # a NaN / inf gradient skips the update and is counted
                    self.optimizer.step()
                    if self.after_step is not None:
                        self.after_step(self.steps)
                else:
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.steps += 1
        out = sums.means()
        out.update(lr=self.scheduler.get_last_lr()[0], skipped_updates=skipped, grad_norm=sum(norms) / len(norms))
        return out

    # ------------------------------------------------------------------ weights
    def sync_payload(self) -> dict[str, Any]:
        """What the rollout engines need: LoRA tensors + config, or a full (merged) state dict.
        Under ZeRO-3 every learner must call it (gathering the parameters is collective)."""
        with self._gathered():
            return self._payload()

    def _payload(self) -> dict[str, Any]:
        if self.method in ("lora", "qlora") and not getattr(self.model.peft_config["default"], "use_dora", False):
            import peft

            tensors = {k: v.detach().cpu() for k, v in peft.get_peft_model_state_dict(self.model).items()}
            return {"kind": "lora", "tensors": tensors, "config": self.model.peft_config["default"].to_dict()}
        if self.method in _MERGEABLE_ADAPTERS:  # DoRA / AdaLoRA / IA3: the engine takes merged weights
            merged = copy.deepcopy(self.model).merge_and_unload()
            return {"kind": "full", "tensors": {k: v.detach().cpu() for k, v in merged.state_dict().items()}}
        return {"kind": "full", "tensors": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name (what checkpoints store; collective under ZeRO-3)."""
        with self._gathered():
            return trainable_state_dict(self.model)

    def state(self) -> dict[str, Any]:
        """Optimizer, scheduler, step counter and RNG: the rest of a checkpoint."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "steps": self.steps, "generator": self.generator.get_state()}

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore what `trainable_weights` and `state` returned."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])

    def save_final(self, path: str, tokenizer: Any = None) -> str:
        """Write the policy (adapter or whole model) in Hugging Face format."""
        from pathlib import Path

        from align.tuning import save_final

        if tokenizer is None:
            return str(self.model.save_pretrained(path) or path)
        return str(save_final(self.model, tokenizer, Path(path)))


class CriticLearner(DataParallel):
    """The value model of PPO: a one-output token head on a causal LM, under any fine-tuning method,
    with its own optimizer and learning rate. Values are aligned with logprobs: the value of the
    action at column t is the head's output at column t - 1 (the state before token t)."""

    def __init__(self, model_cfg: ModelConfig, peft_cfg: PeftConfig, lr: float, total_steps: int,
                 max_grad_norm: float = 1.0, micro_batch_size: int = 8, seed: int = 0, num_threads: int = 0,
                 model: torch.nn.Module | None = None, amp: str = "none"):
        set_threads(num_threads)
        torch.manual_seed(seed)
        self.amp = amp
        if model is None:
            model = load_causal_lm(model_cfg, quantization_config(peft_cfg, model_cfg), head="token")
        self.model = apply_tuning(model, peft_cfg, total_steps=total_steps, task_type="TOKEN_CLS",
                                  new_heads=("score", "classifier"))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.max_grad_norm, self.micro = max_grad_norm, micro_batch_size
        self.generator = torch.Generator().manual_seed(seed + 1)

    def _values(self, mb: Experience) -> torch.Tensor:
        """(b, t) values of a trimmed micro-batch (prompt columns 0)."""
        pos = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with autocast(self.amp):
            out = self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=pos,
                             use_cache=False).logits[..., 0].float()  # (b, t)
        v = torch.zeros_like(out)
        v[:, mb.prompt_len:] = out[:, mb.prompt_len - 1:-1]
        return v

    def values(self, exp: Experience) -> torch.Tensor:
        """(B, T) values at rollout time."""
        T = exp.input_ids.shape[1]
        self.model.eval()
        with torch.no_grad():
            out = torch.cat([_pad_to(self._values(_trim(mb)), T) for mb in exp.split(self.micro)])
        self.model.train()
        return out * exp.action_mask

    def update(self, exp: Experience, algorithm: Any, epochs: int = 1, minibatches: int = 1) -> dict[str, float]:
        """Value-loss steps over `exp` (needs values and returns); token-weighted mean metrics."""
        from algorithms.core import normalizers

        sums = MetricSums()
        size = math.ceil(len(exp) / minibatches)
        for _ in range(epochs):
            order = torch.randperm(len(exp), generator=self.generator)
            for start in range(0, len(exp), size):
                mini = exp.index(order[start:start + size])
                counts = self._global_counts(normalizers(mini.action_mask))
                for mb in mini.split(self.micro):
                    mb = _trim(mb)
                    loss, metrics = algorithm.value_loss(new_values=self._values(mb), values=mb.values,
                                                         returns=mb.returns, action_mask=mb.action_mask, **counts)
                    loss.backward()
                    sums.add(metrics, float(mb.action_mask.sum()), prefix="critic/")
                sums.updates += 1
                self._average_gradients()
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return sums.means()
