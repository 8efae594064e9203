"""The learners of online RL, plain classes that `ActorGroup` turns into Ray actors:

- `PolicyLearner`: the policy (a transformers model under any fine-tuning method) and its optimizer;
  computes old / reference logprobs and runs the algorithm's loss. When the policy is a PEFT
  adapter the reference is the same model with the adapter disabled: no second copy.
- `CriticLearner`: PPO's value model, a one-output token head on a causal LM.

Both are `DataParallel`: N actors in one torch.distributed group (NCCL on GPUs, gloo on CPUs) whose
rendezvous is the rank-0 learner's node, optionally under DeepSpeed ZeRO. Each computes on its own
device (`align.device`): batches arrive from the driver on the host, are moved there, and results
go back on the host.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any

import torch

from align import prompt_replay
from align.config import ModelConfig, PeftConfig
from align.cores import ThreadBudget, watch_layers
from align.device import HOST, autocast, dist_backend, free_port, node_ip, resolve_autocast, to_host, worker_device
from align.frozen_cast import cache_frozen_casts
from align.logprobs import completion_logprobs, logprobs_in_chunks, micro_batches, sequence_logprobs, trim
from align.models import load_causal_lm, set_threads
from align.placement import Placed
from align.trainer import decay, lr_lambda
from align.tuning import (after_backward_hook, apply_tuning, is_peft, make_optimizer, quantization_config,
                          trainable_state_dict)
from align.types import Experience

_MERGEABLE_ADAPTERS = {"lora", "dora", "adalora", "ia3", "qlora"}
# Loss metrics of a micro-batch are its share of the minibatch loss (normalised by the minibatch's
# counts): they add up over micro-batches. Every other metric is a per-token mean: token-weighted.
# idle_rows_skipped (the share of rows `live_rows` left out) is a per-update figure, added the same way.
_ADDITIVE = ("loss", "pg_loss", "value_loss", "idle_rows_skipped")


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


def group_order(group_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random row order that keeps each group's rows together (online preference pairs need
    their two rows adjacent; for the other algorithms any order is as good as this one)."""
    ids = group_ids.unique()
    perm = ids[torch.randperm(len(ids), generator=generator)]
    return torch.cat([(group_ids == g).nonzero().flatten() for g in perm])


def group_minibatches(order: torch.Tensor, group_ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    """`order` (rows, groups contiguous) cut into `n` near-equal minibatches at group boundaries:
    a group, e.g. an online (chosen, rejected) pair, is never split between optimizer steps."""
    gids = group_ids[order].tolist()
    starts = [0] + [i for i in range(1, len(gids)) if gids[i] != gids[i - 1]]
    n = min(n, len(starts))
    bounds = sorted({starts[round(k * len(starts) / n)] for k in range(n)}) + [len(gids)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def live_rows(exp: Experience) -> Experience:
    """`exp` without its rows whose advantages are all 0 (a GRPO group whose rewards are equal):
    under a loss with no KL or entropy term they carry no gradient, so an update can skip their forward and
    backward. One row stays when none is live, so that the optimizer still steps on zero gradients."""
    adv = exp.advantages.reshape(len(exp.advantages), -1)
    live = (adv != 0).any(1)
    if bool(live.all()):
        return exp
    if not bool(live.any()):
        live[int(exp.attention_mask.sum(1).argmin())] = True
    return exp.index(live.nonzero().squeeze(1))


def _place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` on `device`; a quantised model was placed by its loader's device map already."""
    return model if getattr(model, "hf_quantizer", None) is not None else model.to(device)


def _plain(obj: Any) -> Any:
    """`obj` with only tensors, numbers, strings and containers of them (what
    `torch.load(weights_only=True)` reads back); DeepSpeed puts objects such as its loss scaler
    into optimizer state dicts, which a resume does not need."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(HOST)
    if isinstance(obj, dict):
        items = {k: _plain(v) for k, v in obj.items()}
        return {k: v for k, v in items.items() if v is not _DROP}
    if isinstance(obj, (list, tuple)):
        return [v for v in (_plain(v) for v in obj) if v is not _DROP]
    if obj is None or type(obj) in (bool, int, float, str):  # not subclasses: DeepSpeed's IntEnums
        return obj
    return _DROP


_DROP = object()


def init_group(group: Any) -> None:
    """Join the learners of `group` (an `ActorGroup`) into one process group whose rendezvous is
    rank 0's node and a port free there."""
    from align import actors

    host, port = actors.get(group.call(0, "rendezvous"))
    actors.get(group.run_each("init_distributed", [(i, len(group), host, port) for i in range(len(group))]))


class DataParallel(Placed):
    """What the policy and critic learners share: a device, a torch.distributed group of N
    learners (each on whole groups of the batch, token counts summed and gradients averaged, so N
    learners take the step one learner would take on the combined batch: tested), DeepSpeed ZeRO
    when asked, the guarded optimizer step and the checkpointed state."""

    model: torch.nn.Module
    optimizer: Any
    params: list[torch.nn.Parameter]
    max_grad_norm: float
    amp: str
    zero_stage: int = 0
    zero_offload: bool = False
    engine: Any = None  # the DeepSpeed engine under ZeRO
    rank: int = 0  # this learner's rank in its process group

    def _setup(self, seed: int, num_threads: int, device: str, amp: str, zero_stage: int, zero_offload: bool) -> None:
        """What every learner does first: threads, seed, device, precision and ZeRO settings."""
        self.threads = ThreadBudget(set_threads(num_threads), None, "learner", torch.set_num_threads)
        torch.manual_seed(seed)
        self.device = worker_device(device)
        self.amp, self.zero_stage, self.zero_offload = resolve_autocast(amp, self.device), zero_stage, zero_offload

    def _cache_casts(self) -> None:
        """Frozen linear weights keep one bf16 copy under autocast (align.frozen_cast); not under
        ZeRO-3, whose weights exist whole only while their layer runs."""
        if self.amp == "bfloat16" and self.zero_stage != 3:
            cache_frozen_casts(self.model)

    def rendezvous(self) -> tuple[str, int]:
        """(address, port) for the group's rendezvous, asked of rank 0: its node's address and a
        port free there, so learners on other machines can reach it."""
        host = node_ip()
        return host, free_port(host)

    def init_distributed(self, rank: int, world_size: int, host: str, port: int) -> int:
        """Join the learners' process group (NCCL on GPUs, gloo on CPUs); returns the rank."""
        import torch.distributed as dist

        # DeepSpeed reads the launcher's variables; Ray gives each GPU actor its own device 0
        local = str(self.device.index or 0) if self.device.type == "cuda" else str(rank)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=host, MASTER_PORT=str(port),
                          LOCAL_RANK=local)
        dist.init_process_group(dist_backend(self.device), init_method=f"tcp://{host}:{port}", rank=rank,
                                world_size=world_size)
        self.rank = rank
        if self.zero_stage:
            self._init_deepspeed()
        return rank

    def _init_deepspeed(self) -> None:
        """Wrap the model and optimizer in a DeepSpeed ZeRO engine (stage 2 or 3, optional CPU offload).

        Micro-batch losses are already normalised by the whole minibatch, so the engine neither
        scales by gradient-accumulation steps nor decides the boundary: `_backward` marks the last
        micro-batch of each minibatch.
        """
        import deepspeed

        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_offload:
            zero["offload_optimizer"] = {"device": str(HOST)}
        group = self.optimizer.param_groups[0]
        # DeepSpeed builds the optimizer itself (torch's AdamW, same hyper-parameters): a client
        # optimizer under ZeRO-3 did not follow the plain learner's updates exactly
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": zero, "gradient_clipping": self.max_grad_norm or 0.0,
                  "optimizer": {"type": "AdamW", "params": {
                      "lr": group["lr"], "betas": list(group["betas"]), "eps": group["eps"],
                      "weight_decay": group["weight_decay"], "torch_adam": True, "adam_w_mode": True}},
                  "steps_per_print": 2**31,
                  "bf16": {"enabled": self.amp == "bfloat16" and self.device.type == "cuda"}}
        if self.device.type == "cpu":
            # DeepSpeed's CPU backend compiles a shared-memory op (30-50 s of g++ on every fresh
            # machine) that serves only its inference all-reduce; ZeRO training never calls it, so
            # it is marked unavailable and gloo's all-reduce does the work, as it would anyway
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        scheduler = getattr(self, "scheduler", None)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=self._groups(), config=config, dist_init_required=False)
        if scheduler is not None:  # the LR schedule now drives DeepSpeed's optimizer
            scheduler.optimizer = self.optimizer

    def _groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups with their own lr / weight decay (LoRA+), for DeepSpeed."""
        return [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                for g in self.optimizer.param_groups]

    @property
    def net(self) -> torch.nn.Module:
        """What forward passes go through: under ZeRO the engine (ZeRO-3 counts micro-steps in
        its forward; calling the bare module made every micro-batch overwrite the last gradient)."""
        return self.engine if self.engine is not None else self.model

    def _gathered(self):
        """A context in which ZeRO-3's partitioned parameters are whole (a no-op otherwise)."""
        if self.zero_stage != 3 or self.engine is None:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0)

    def _global_counts(self, counts: dict[str, int]) -> dict[str, float]:
        """Token / sequence counts of the whole minibatch across learners, divided by the number of
        learners because gradients are averaged (algorithms/core.py's rule for data parallelism)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return counts
        t = torch.tensor([float(counts["num_tokens"]), float(counts["num_seqs"])], device=self.device)
        dist.all_reduce(t)
        w = dist.get_world_size()
        return {"num_tokens": float(t[0]) / w, "num_seqs": float(t[1]) / w}

    def _backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """Accumulate `loss`'s gradient; `boundary` marks a minibatch's last micro-batch (ZeRO)."""
        if self.engine is None:
            loss.backward()
            return
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)

    def _step(self) -> tuple[float, bool]:
        """Average gradients over learners, clip, and step unless the gradient is NaN / inf;
        returns (gradient norm, whether the update was applied)."""
        if self.engine is not None:  # averaging, clipping, the step and zeroing happen in DeepSpeed
            self.engine.step()
            norm = float(self.engine.get_global_grad_norm() or 0.0)
            return norm, math.isfinite(norm)
        self._average_gradients()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
        ok = bool(torch.isfinite(norm))
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), ok

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

    # ------------------------------------------------------------------ checkpoints
    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """The trainable parameters by name, on the host (collective under ZeRO-3)."""
        with self._gathered():
            return to_host(trainable_state_dict(self.model))

    def state(self) -> dict[str, Any]:
        """This rank's optimizer (a ZeRO partition under DeepSpeed), scheduler, counters and RNG."""
        out = {"optimizer": _plain(self.optimizer.state_dict()), "generator": self.generator.get_state(),
               "steps": getattr(self, "steps", 0)}
        if getattr(self, "scheduler", None) is not None:
            out["scheduler"] = self.scheduler.state_dict()
        return out

    def load(self, weights: dict[str, torch.Tensor], states: list[dict[str, Any]]) -> None:
        """Restore what `trainable_weights` and every rank's `state` returned (this rank takes its own)."""
        state = states[self.rank]
        with self._gathered():
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, w in weights.items():
                    params[n].copy_(w.to(params[n].device))
        if self.engine is not None:  # ZeRO: master weights and moments from this rank's partition
            # entries `_plain` left out (a static loss scaler, enums) are as this optimizer has them
            live = {k: v for k, v in self.optimizer.state_dict().items() if _plain(v) is _DROP}
            self.optimizer.load_state_dict([{**live, **st["optimizer"]} for st in states], load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])


class PolicyLearner(DataParallel):
    """The trainable policy, its optimizer and the update loop over one rollout batch."""

    def __init__(self, model_cfg: ModelConfig, peft_cfg: PeftConfig, lr: float, total_steps: int,
                 weight_decay: float = 0.0, warmup_steps: int = 0, lr_scheduler: str = "constant",
                 max_grad_norm: float = 1.0, temperature: float = 1.0, micro_batch_size: int = 8, seed: int = 0,
                 num_threads: int = 0,
                 model: torch.nn.Module | None = None, amp: str = "none", zero_stage: int = 0,
                 zero_offload: bool = False, device: str = "auto", micro_batch_tokens: int = 0,
                 packing: bool = False, share_prompt: bool = False, loan_path: str | None = None):
        """`loan_path`: the driver's core-loan file (align/cores.py): extra threads while the engine waits."""
        self._setup(seed, num_threads, device, amp, zero_stage, zero_offload)
        self.threads.path = loan_path
        # micro-batch plan and forward (align.logprobs.micro_batches / sequence_logprobs)
        self.tokens, self.packing, self.shared = micro_batch_tokens, packing, share_prompt
        if peft_cfg.method in ("prefix", "prompt", "ptuning", "bitfit"):
            raise ValueError(f"peft.method={peft_cfg.method} changes the model's structure in a way no rollout "
                             "engine can serve yet; RL takes full, freeze, lora, qlora, dora, adalora or ia3")
        if model is None:
            model = load_causal_lm(model_cfg, quantization_config(peft_cfg, model_cfg))
        self.model = _place(apply_tuning(model, peft_cfg, total_steps=total_steps), self.device)
        self._cache_casts()
        self.method = peft_cfg.method
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, self.params, lr, weight_decay, peft_cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # stepped once per training step
            self.optimizer, lr_lambda(lr_scheduler, warmup_steps, total_steps))
        self.schedule = (lr_scheduler, warmup_steps)  # for a decay over a time budget (update's `progress`)
        self.max_grad_norm, self.temperature, self.micro = max_grad_norm, temperature, micro_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.after_step = after_backward_hook(self.model, peft_cfg)
        if loan_path is not None:  # the loan is re-read at every block, forward and backward
            watch_layers(self.model, self.threads.refresh)

    # ------------------------------------------------------------------ experience
    def logprobs(self, exp: Experience, old: bool, ref: bool) -> dict[str, torch.Tensor]:
        """Behaviour-policy and/or reference logprobs of `exp` (reference = adapter disabled)."""
        exp = exp.to(self.device)
        self.model.eval()
        self.threads.refresh()
        out = {}
        with autocast(self.device, self.amp):
            if old:
                out["old_logprobs"] = logprobs_in_chunks(self.net, exp, self.micro, self.temperature,
                                                         self.tokens, self.packing, self.shared)
            if ref:
                if not is_peft(self.model):
                    raise RuntimeError("reference logprobs of a non-PEFT policy come from a ReferenceWorker")
                with self.model.disable_adapter():
                    out["ref_logprobs"] = logprobs_in_chunks(self.net, exp, self.micro, self.temperature,
                                                             self.tokens, self.packing, self.shared)
        self.model.train()
        self.threads.reset()
        return to_host(out)

    def backward(self, mini: Experience, loss_fn: Any, sums: MetricSums, correction: dict | None = None,
                 skip_idle: bool = False, entropy_grad: bool = False) -> None:
        """Accumulate the gradient of one minibatch over micro-batches, metrics into `sums`.

        The loss is normalised by the whole minibatch's counts (algorithms/core.py), so the summed
        micro-batch gradients equal the gradient of the minibatch in one piece (tested). With
        `skip_idle` (a loss with no term but the advantage-weighted one) rows whose advantages are
        all 0 are left out after the counts are taken: same gradient, less compute (`live_rows`).
        With `entropy_grad` the loss gets the token entropies, differentiable (an entropy bonus).
        """
        from algorithms.core import normalizers

        mini = mini.to(self.device)
        counts = self._global_counts(normalizers(mini.action_mask))
        if skip_idle:
            rows = len(mini.input_ids)
            mini = live_rows(mini)
            sums.add({"idle_rows_skipped": 1 - len(mini.input_ids) / rows}, 0.0)
        prompts = None
        if (self.shared and self.tokens > 0 and not self.packing and self.engine is None
                and prompt_replay.can_replay(self.net, mini.prompt_len)):
            with autocast(self.device, self.amp):  # every prompt once; rows cut by length (align/prompt_replay.py)
                prompts = prompt_replay.PromptCache(self.net, mini, grad=True)
            micro = prompt_replay.row_micro_batches(mini, self.tokens)
        else:
            micro = micro_batches(mini, self.micro, self.tokens, self.packing, self.shared)
        for k, (idx, mb) in enumerate(micro):
            self.threads.refresh()  # the engine may have finished generating: its core is lent here
            with autocast(self.device, self.amp):
                if prompts is not None:
                    lp, ent = completion_logprobs(self.net, mb.input_ids, mb.attention_mask, mb.prompt_len,
                                                  prompts.cache(idx), self.temperature, True, entropy_grad)
                else:
                    lp, ent = sequence_logprobs(self.net, mb, self.temperature, self.packing, with_entropy=True,
                                                shared=self.shared, entropy_grad=entropy_grad)
            fields = {k: v for k, v in mb.tensors().items() if k not in ("input_ids", "attention_mask")}
            if entropy_grad:
                fields["entropy"] = ent
            loss, metrics = loss_fn(logprobs=lp, **fields, **counts, **(correction or {}))
            self._backward(loss, boundary=k == len(micro) - 1)
            w = float(mb.action_mask.sum())
            metrics["entropy"] = float((ent.detach() * mb.action_mask).sum()) / max(w, 1.0)
            sums.add(metrics, w)
        if prompts is not None:
            prompts.backward()  # the prompts' share of every micro-batch's gradient, through them once
        sums.updates += 1

    def update(self, exp: Experience, algorithm: Any, epochs: int = 1, minibatches: int = 1,
               correction: dict | None = None, progress: float | None = None) -> dict[str, float]:
        """`epochs` x `minibatches` optimizer steps of `algorithm.loss` over `exp` (minibatches of
        whole groups); `correction` = the run's rollout-correction settings, passed to the loss;
        `progress` = the share of a time budget used (train.max_time_s): the decay follows it instead
        of the step count (warm-up steps still count steps). Returns token-weighted mean metrics."""
        scheduler, warmup = self.schedule
        if progress is not None and self.steps >= warmup:
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * decay(scheduler, progress)
        loss_fn = getattr(algorithm, "policy_loss", None) or algorithm.loss
        # not under DeepSpeed: ZeRO's collectives in every forward / backward need the same
        # micro-batches on every rank (a rank left with fewer aborted the run)
        skip_idle = self.engine is None and not getattr(algorithm, "zero_advantage_trains", True)
        entropy_grad = getattr(algorithm, "entropy_coef", 0.0) > 0
        sums = MetricSums()
        skipped, norms = 0, []
        for _ in range(epochs):
            order = group_order(exp.group_ids, self.generator)
            for idx in group_minibatches(order, exp.group_ids, minibatches):
                self.backward(exp.index(idx), loss_fn, sums, correction, skip_idle, entropy_grad)
                norm, ok = self._step()
                norms.append(norm)
                if ok and self.after_step is not None:
                    self.after_step(self.steps)
                skipped += not ok
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.scheduler.step()
        self.steps += 1
        out = sums.means()
        out.update(lr=lr, skipped_updates=skipped, grad_norm=sum(norms) / len(norms),
                   **{"threads/update_peak": self.threads.reset()})
        return out

    # ------------------------------------------------------------------ weights
    def sync_payload(self) -> dict[str, Any]:
        """What the rollout engines need: LoRA tensors + config, or a full (merged) state dict,
        on the host. Under ZeRO-3 every learner must call it (gathering the parameters is collective)."""
        with self._gathered():
            return self._payload()

    def _payload(self) -> dict[str, Any]:
        if self.method in ("lora", "qlora") and not getattr(self.model.peft_config["default"], "use_dora", False):
            import peft

            tensors = to_host(peft.get_peft_model_state_dict(self.model))
            return {"kind": "lora", "tensors": tensors, "config": self.model.peft_config["default"].to_dict()}
        if self.method in _MERGEABLE_ADAPTERS:  # DoRA / AdaLoRA / IA3: the engine takes merged weights
            merged = copy.deepcopy(self.model).merge_and_unload()
            return {"kind": "full", "tensors": to_host(merged.state_dict())}
        return {"kind": "full", "tensors": to_host(self.model.state_dict())}

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
                 model: torch.nn.Module | None = None, amp: str = "none", zero_stage: int = 0,
                 zero_offload: bool = False, device: str = "auto"):
        self._setup(seed, num_threads, device, amp, zero_stage, zero_offload)
        if model is None:
            model = load_causal_lm(model_cfg, quantization_config(peft_cfg, model_cfg), head="token")
        self.model = _place(apply_tuning(model, peft_cfg, total_steps=total_steps, task_type="TOKEN_CLS",
                                         new_heads=("score", "classifier")), self.device)
        self._cache_casts()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model, self.params, lr, 0.0, peft_cfg)
        self.max_grad_norm, self.micro = max_grad_norm, micro_batch_size
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.steps = 0

    def _values(self, mb: Experience) -> torch.Tensor:
        """(b, t) values of a trimmed micro-batch (prompt columns 0)."""
        pos = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with autocast(self.device, self.amp):
            out = self.net(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=pos,
                           use_cache=False).logits[..., 0].float()  # (b, t)
        v = torch.zeros_like(out)
        v[:, mb.prompt_len:] = out[:, mb.prompt_len - 1:-1]
        return v

    def values(self, exp: Experience) -> torch.Tensor:
        """(B, T) values at rollout time, on the host."""
        from align.logprobs import pad_to

        exp = exp.to(self.device)
        T = exp.input_ids.shape[1]
        self.model.eval()
        with torch.no_grad():
            out = torch.cat([pad_to(self._values(trim(mb)), T) for mb in exp.split(self.micro)])
        self.model.train()
        return to_host(out * exp.action_mask)

    def update(self, exp: Experience, algorithm: Any, epochs: int = 1, minibatches: int = 1) -> dict[str, float]:
        """Value-loss steps over `exp` (needs values and returns); token-weighted mean metrics. A NaN
        / inf gradient skips the update and is counted, as the policy's does."""
        from algorithms.core import normalizers

        exp = exp.to(self.device)
        sums, skipped = MetricSums(), 0
        size = math.ceil(len(exp) / minibatches)
        for _ in range(epochs):
            order = torch.randperm(len(exp), generator=self.generator)
            for start in range(0, len(exp), size):
                mini = exp.index(order[start:start + size].to(exp.input_ids.device))
                counts = self._global_counts(normalizers(mini.action_mask))
                micro = list(mini.split(self.micro))
                for k, mb in enumerate(micro):
                    mb = trim(mb)
                    loss, metrics = algorithm.value_loss(new_values=self._values(mb), values=mb.values,
                                                         returns=mb.returns, action_mask=mb.action_mask, **counts)
                    self._backward(loss, boundary=k == len(micro) - 1)
                    sums.add(metrics, float(mb.action_mask.sum()), prefix="critic/")
                sums.updates += 1
                skipped += not self._step()[1]
        self.steps += 1
        return {**sums.means(), "critic/skipped_updates": skipped}
