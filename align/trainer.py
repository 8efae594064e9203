"""The optimisation loop shared by the supervised stages (SFT, reward model, offline preference).

A stage gives it a model, examples, a collate function and a loss function; the loop does the
rest: seeded data order, gradient accumulation normalised over the whole optimizer step,
warm-up + decay, clipping, eval, atomic checkpoints that resume exactly, and metrics.

Gradient accumulation: each collated micro-batch carries `num_targets` (label tokens, or pairs).
The loss function returns a *sum* over its targets; the loop divides by the targets of the whole
optimizer step, so k micro-batches give exactly the gradient of one batch k times larger.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from align import checkpoint
from align.config import LogConfig, TrainConfig
from align.tracking import Tracker
from align.tuning import trainable_state_dict

# loss_fn(model, batch) -> (summed loss over the batch's targets, metrics summed over targets)
LossFn = Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]


def lr_lambda(scheduler: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine / linear / constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress

    return f


@dataclass
class TrainResult:
    """What a finished (or stopped) training loop reports."""

    step: int  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per step
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # one record per eval
    skipped_nonfinite: int = 0  # updates skipped because the loss or gradient was not finite


class Trainer:
    """Runs the supervised loop; see the module docstring."""

    def __init__(self, model: nn.Module, examples: Sequence[Any], collate_fn: Callable[[list[Any]], dict],
                 loss_fn: LossFn, train_cfg: TrainConfig, log_cfg: LogConfig, run_dir: Path,
                 config: dict[str, Any], eval_examples: Sequence[Any] = (), after_backward=None,
                 callbacks: Sequence[Callable[[int, dict], None]] = (), desc: str = "train"):
        self.model, self.examples, self.collate_fn, self.loss_fn = model, examples, collate_fn, loss_fn
        self.cfg, self.log_cfg, self.run_dir, self.config = train_cfg, log_cfg, Path(run_dir), config
        self.eval_examples, self.after_backward, self.callbacks, self.desc = eval_examples, after_backward, callbacks, desc
        self.micro_per_epoch = math.ceil(len(examples) / train_cfg.batch_size)
        self.steps_per_epoch = max(1, self.micro_per_epoch // train_cfg.grad_accum)
        self.total_steps = train_cfg.max_steps or train_cfg.epochs * self.steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: check peft.method and its options")
        self.optimizer = torch.optim.AdamW(self.params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        warmup = int(round(train_cfg.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(train_cfg.scheduler, warmup, self.total_steps))
        self.step = 0

    def _autocast(self):
        """bf16 autocast around the loss when `train.autocast` asks for it (losses are float32)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.cfg.autocast == "bfloat16")

    # ------------------------------------------------------------------ data order
    def _micro_batch(self, index: int) -> dict[str, Any]:
        """Micro-batch number `index` counted from the start of training (epochs reshuffle by seed)."""
        epoch, pos = divmod(index, self.steps_per_epoch * self.cfg.grad_accum)
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        bs = self.cfg.batch_size
        chunk = order[pos * bs:(pos + 1) * bs] or order[:bs]
        return self.collate_fn([self.examples[i] for i in chunk])

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> Path:
        extra = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": checkpoint.rng_state()}
        return checkpoint.save(self.run_dir / "checkpoints", self.step, trainable_state_dict(self.model), extra,
                               self.config, keep=self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest complete checkpoint in the run directory, if any; True when resumed."""
        path = checkpoint.latest(self.run_dir / "checkpoints")
        if path is None:
            return False
        weights, extra = checkpoint.load(path, self.config)
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(weights) != names:
            raise checkpoint.ResumeError(f"{path} holds different trainable parameters than this model "
                                         f"(e.g. {sorted(set(weights) ^ names)[:3]})")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        checkpoint.set_rng_state(extra["rng"])
        self.step = extra["step"]
        return True

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the eval examples."""
        self.model.eval()
        total, sums, count = 0.0, {}, 0
        bs = self.cfg.batch_size
        for i in range(0, len(self.eval_examples), bs):
            batch = self.collate_fn(list(self.eval_examples[i:i + bs]))
            n = batch.pop("num_targets")
            batch.pop("num_tokens", None)
            with self._autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            total += loss.item()
            count += n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train()
        return {"eval/loss": total / max(count, 1), **{f"eval/{k}": v / max(count, 1) for k, v in sums.items()}}

    def train(self) -> TrainResult:
        """Run until `total_steps`; checkpoints, evals and metrics along the way."""
        result = TrainResult(step=self.step)
        tracker = Tracker(self.run_dir, self.log_cfg, self.total_steps, self.step, self.config, self.desc)
        self.model.train()
        try:
            while self.step < self.total_steps:
                record = self._one_step(result)
                self.step += 1
                tracker.log(self.step, record, advance=1, show=("loss", "tokens_per_s"))
                result.history.append(record)
                if self.cfg.eval_every and self.eval_examples and self.step % self.cfg.eval_every == 0:
                    ev = self.evaluate()
                    tracker.log(self.step, ev)
                    result.eval_history.append({"step": self.step, **ev})
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self._save()
                for cb in self.callbacks:
                    cb(self.step, record)
            if self.eval_examples and not (result.eval_history and result.eval_history[-1]["step"] == self.step):
                ev = self.evaluate()
                tracker.log(self.step, ev)
                result.eval_history.append({"step": self.step, **ev})
            self._save()
        finally:
            tracker.close(plots={"loss": ["loss", "eval/loss"]})
        result.step = self.step
        return result

    def _one_step(self, result: TrainResult) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns its metrics."""
        t0 = time.perf_counter()
        batches = [self._micro_batch(self.step * self.cfg.grad_accum + k) for k in range(self.cfg.grad_accum)]
        targets = sum(b.pop("num_targets") for b in batches)
        tokens = sum(int(b.pop("num_tokens", b["input_ids"].numel())) for b in batches)
        loss_sum, sums = 0.0, {}
        for batch in batches:
            with self._autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            (loss / targets).backward()
            loss_sum += loss.item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
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
