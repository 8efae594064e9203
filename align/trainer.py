"""The optimisation loop shared by the supervised stages (SFT, reward model, offline preference).

A stage gives it a model, examples, a collate function and a loss function; the loop does the
rest: seeded data order, gradient accumulation normalised over the whole optimizer step,
warm-up + decay, clipping, eval, atomic checkpoints that resume exactly, and metrics.

Gradient accumulation: each collated micro-batch carries `num_targets` (label tokens, or pairs).
The loss function returns a *sum* over its targets; the loop divides by the targets of the whole
optimizer step, so k micro-batches give exactly the gradient of one batch k times larger.

Data parallelism (torchrun, align/distributed.py): micro-batch k of the run is the k-th chunk of
`batch_size x processes` examples of the seeded order (the order one process uses) and process r
takes the r-th of its near-equal contiguous slices. The step's target count is summed over the
processes before any loss is divided by it, and gradients are summed (not averaged) after
accumulation, before clipping: every process then holds exactly the gradient of the combined batch,
so clipping and AdamW agree everywhere, and N processes take the steps one process takes with
`batch_size x N`. Eval is sliced the same way and reduced. Rank 0 alone writes metrics, plots and
checkpoints; every process resumes from the checkpoint.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from align import checkpoint, distributed
from align.config import LogConfig, PeftConfig, TrainConfig
from align.device import autocast, resolve_autocast, to_device, to_host
from align.frozen_cast import cache_frozen_casts
from align.tracking import Tracker
from align.tuning import make_optimizer, trainable_state_dict

# loss_fn(model, batch) -> (summed loss over the batch's targets, metrics summed over targets)
LossFn = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


def decay(scheduler: str, progress: float) -> float:
    """Multiplier of the peak learning rate after warm-up at `progress` (0 to 1) of the decay: cosine / linear / constant."""
    progress = min(1.0, max(0.0, progress))
    if scheduler == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress


def lr_lambda(scheduler: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine / linear / constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return decay(scheduler, (step - warmup) / max(1, total - warmup))

    return f


@dataclass
class TrainResult:
    """What a finished (or stopped) training loop reports."""

    step: int  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per step
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # one record per eval
    skipped_nonfinite: int = 0  # updates skipped because the loss or gradient was not finite


def plan_steps(num_examples: int, cfg: TrainConfig, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for `num_examples` split over `world` processes,
    each taking `cfg.batch_size` per micro-batch."""
    micro_per_epoch = math.ceil(num_examples / (cfg.batch_size * world))
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    return steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch


def rank_slice(chunk: list[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s contiguous share of `chunk`: `world` near-equal slices in rank order
    (batch_size each for a full chunk; a short last chunk is spread so that few are left empty)."""
    q, r = divmod(len(chunk), world)
    start = rank * q + min(rank, r)
    return chunk[start:start + q + (rank < r)]


def place_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`; a quantised model is left where `device_map` put it when it was loaded
    (bitsandbytes models cannot be moved)."""
    if getattr(model, "hf_device_map", None) is not None:
        return model
    return model.to(device)


class Trainer:
    """Runs the supervised loop; see the module docstring."""

    def __init__(self, model: nn.Module, examples: Sequence[Any], collate_fn: Callable[[list[Any]], dict],
                 loss_fn: LossFn, train_cfg: TrainConfig, log_cfg: LogConfig, run_dir: Path,
                 config: dict[str, Any], eval_examples: Sequence[Any] = (), after_backward=None,
                 callbacks: Sequence[Callable[[int, dict], None]] = (), desc: str = "train",
                 generate_eval: Callable[[nn.Module, int], dict] | None = None, generate_every: int = 0,
                 peft_cfg: PeftConfig | None = None):
        self.examples, self.collate_fn, self.loss_fn = examples, collate_fn, loss_fn
        self.cfg, self.log_cfg, self.run_dir, self.config = train_cfg, log_cfg, Path(run_dir), config
        self.eval_examples, self.after_backward, self.callbacks, self.desc = eval_examples, after_backward, callbacks, desc
        # generation evals (align.evaluate.StageEvaluator) run on rank 0: one engine, one file of samples
        self.generate_eval, self.generate_every = generate_eval, generate_every
        self.device = distributed.init_from_env(train_cfg.device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.model = place_model(model, self.device)
        if resolve_autocast(train_cfg.autocast, self.device) == "bfloat16":
            cache_frozen_casts(self.model)  # frozen weights cast once (align.frozen_cast)
        self.steps_per_epoch, self.total_steps = plan_steps(len(examples), train_cfg, self.world)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: check peft.method and its options")
        distributed.broadcast_params(self.params)
        self.optimizer = make_optimizer(self.model, self.params, train_cfg.lr, train_cfg.weight_decay, peft_cfg)
        warmup = int(round(train_cfg.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(train_cfg.scheduler, warmup, self.total_steps))
        self.step = 0

    # ------------------------------------------------------------------ data order
    def _my_batch(self, examples: Sequence[Any], chunk: list[int]) -> tuple[dict[str, Any], float]:
        """(this process's slice of the combined micro-batch `chunk`, collated and on the device,
        its weight). A process whose slice is empty (a last chunk shorter than the number of
        processes) still runs a forward on one example, weighted 0, so that every process issues
        the same collectives (KTO's reference point, the gradient sum)."""
        mine = rank_slice(chunk, self.rank, self.world)
        weight = 1.0 if mine else 0.0
        return to_device(self.collate_fn([examples[i] for i in mine or chunk[:1]]), self.device), weight

    def _micro_batch(self, index: int) -> tuple[dict[str, Any], float]:
        """Micro-batch number `index` counted from the start of training (epochs reshuffle by seed)."""
        epoch, pos = divmod(index, self.steps_per_epoch * self.cfg.grad_accum)
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        size = self.cfg.batch_size * self.world  # the combined micro-batch of all processes
        chunk = order[pos * size:(pos + 1) * size] or order[:size]
        return self._my_batch(self.examples, chunk)

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> Path | None:
        """Rank 0 writes the checkpoint (host tensors); the weights are the same on every process."""
        if not distributed.is_main():
            return None
        extra = {"step": self.step, "optimizer": to_host(self.optimizer.state_dict()),
                 "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state(), "world_size": self.world}
        return checkpoint.save(self.run_dir / "checkpoints", self.step, trainable_state_dict(self.model), extra,
                               self.config, keep=self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest complete checkpoint in the run directory, if any; True when resumed.
        Every process loads it (under data parallelism the run directory must be shared)."""
        path = checkpoint.latest(self.run_dir / "checkpoints")
        if path is None:
            return False
        weights, extra = checkpoint.load(path, self.config)
        if extra.get("world_size", 1) != self.world:  # the combined batch, hence the data order, would change
            raise checkpoint.ResumeError(f"{path} was written by {extra.get('world_size', 1)} processes, this run has "
                                         f"{self.world}: resume with the same number, or a new train.output_dir")
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(weights) != names:
            raise checkpoint.ResumeError(f"{path} holds different trainable parameters than this model "
                                         f"(e.g. {sorted(set(weights) ^ names)[:3]})")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        self.optimizer.load_state_dict(extra["optimizer"])  # moves the state to the parameters' device
        self.scheduler.load_state_dict(extra["scheduler"])
        checkpoint.set_rng_state(extra["rng"])
        self.step = extra["step"]
        return True

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the eval examples: each process evaluates its slice of every
        combined batch (as in training) and the sums are reduced, so all processes get the result."""
        self.model.eval()
        sums: dict[str, float] = {"loss": 0.0, "count": 0.0}
        size = self.cfg.batch_size * self.world
        for i in range(0, len(self.eval_examples), size):
            batch, weight = self._my_batch(self.eval_examples, list(range(i, min(i + size, len(self.eval_examples)))))
            sums["count"] += weight * batch.pop("num_targets")
            batch.pop("num_tokens", None)
            with autocast(self.device, self.cfg.autocast):
                loss, metrics = self.loss_fn(self.model, batch)
            sums["loss"] += weight * loss.item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
        self.model.train()
        sums = distributed.sum_dicts(sums)
        count = max(sums.pop("count"), 1)
        return {f"eval/{k}": v / count for k, v in sums.items()}

    def train(self) -> TrainResult:
        """Run until `total_steps`; checkpoints, evals and metrics along the way (written by rank 0)."""
        result = TrainResult(step=self.step)
        tracker = (Tracker(self.run_dir, self.log_cfg, self.total_steps, self.step, self.config, self.desc)
                   if distributed.is_main() else None)
        self.model.train()
        try:
            while self.step < self.total_steps:
                record = self._one_step(result)
                self.step += 1
                if tracker is not None:
                    tracker.log(self.step, record, advance=1, show=("loss", "tokens_per_s"))
                result.history.append(record)
                if self.cfg.eval_every and self.eval_examples and self.step % self.cfg.eval_every == 0:
                    self._eval(result, tracker)
                if self.generate_every and self.step % self.generate_every == 0:
                    self._generate_eval(result, tracker)
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self._save()
                for cb in self.callbacks:
                    cb(self.step, record)
            if self.eval_examples and not (result.eval_history and result.eval_history[-1]["step"] == self.step):
                self._eval(result, tracker)
            if self.generate_every and self.step % self.generate_every:
                self._generate_eval(result, tracker)
            self._save()
        finally:
            if tracker is not None:
                tracker.close(plots={"loss": ["loss", "eval/loss"], "accuracy": ["eval/accuracy"]})
        result.step = self.step
        return result

    def _generate_eval(self, result: TrainResult, tracker: Tracker | None) -> None:
        """Held-out generation (rank 0), logged and recorded with the loss evals."""
        if not distributed.is_main() or self.generate_eval is None:
            return
        ev = self.generate_eval(self.model, self.step)
        if tracker is not None:
            tracker.log(self.step, ev)
        result.eval_history.append({"step": self.step, **ev})

    def _eval(self, result: TrainResult, tracker: Tracker | None) -> None:
        """Evaluate (every process), record, and log (rank 0)."""
        ev = self.evaluate()
        if tracker is not None:
            tracker.log(self.step, ev)
        result.eval_history.append({"step": self.step, **ev})

    def _one_step(self, result: TrainResult) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches (of every process); returns its metrics."""
        t0 = time.perf_counter()
        parts = [self._micro_batch(self.step * self.cfg.grad_accum + k) for k in range(self.cfg.grad_accum)]
        local = sum(w * b.pop("num_targets") for b, w in parts)
        # every process divides by the targets of the whole step on all processes
        targets = distributed.all_reduce_sum(torch.tensor(float(local), dtype=torch.float64), self.device).item()
        tokens = sum(w * int(b.pop("num_tokens", b["input_ids"].numel())) for b, w in parts)
        sums = {"loss": 0.0, "tokens": float(tokens)}
        for batch, weight in parts:
            with autocast(self.device, self.cfg.autocast):
                loss, metrics = self.loss_fn(self.model, batch)
            (loss * weight / targets).backward()
            sums["loss"] += weight * loss.item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
        distributed.all_reduce_grads(self.params)  # summed: each process now holds the combined batch's gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        sums = distributed.sum_dicts(sums)  # global values on every process, so all take the same branch below
        tokens, loss_sum = sums.pop("tokens"), sums.pop("loss")
        record = {"loss": loss_sum / targets, **{k: v / targets for k, v in sums.items()},
                  "grad_norm": grad_norm.item(), "lr": self.scheduler.get_last_lr()[0]}
        if math.isfinite(loss_sum) and torch.isfinite(grad_norm):
            self.optimizer.step()
            if self.after_backward is not None:
                self.after_backward(self.step)
        else:
            result.skipped_nonfinite += 1
            record["skipped_nonfinite"] = result.skipped_nonfinite
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        dt = time.perf_counter() - t0
        record.update(step_time=dt, tokens_per_s=tokens / dt, epoch=self.step / self.steps_per_epoch)
        return record
