"""The reward-model stage: a one-scalar head on a causal LM, trained on preference pairs with the
Bradley-Terry loss (optional per-pair margin, optional reward centring), any fine-tuning method.

    align rm examples/rm.yaml train.max_steps=100

The reward is the head's output at the last real token of prompt + completion. Eval reports
pairwise accuracy and mean margin. `RewardModelScorer(run_dir / "final")` loads the result as a
reward function `fn(prompts, completions, **columns) -> list[float]` for the RL stages.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from algorithms.preference import bradley_terry_loss
from align import data as D
from align import distributed
from align.config import DataConfig, LogConfig, ModelConfig, PeftConfig, TrainConfig, save_config, to_dict
from align.device import to_device, worker_device
from align.models import load_causal_lm, load_tokenizer, resolve_model, set_threads
from align.pairs import Pair, collate_side, encode_pairs
from align.trainer import Trainer, TrainResult, plan_steps
from align.tuning import after_backward_hook, apply_tuning, count_parameters, quantization_config, save_final


@dataclass
class RewardConfig:
    """Bradley-Terry options (ALGORITHMS.md section 8)."""

    center_coef: float | None = None  # eta in eta * mean((r_w + r_l)^2); TRL recommends 0.01
    use_margin: bool = True  # subtract the data's `margin` column inside the sigmoid when present


@dataclass
class RMConfig:
    """Reward-model training on preference pairs."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the base causal LM
    peft: PeftConfig = field(default_factory=PeftConfig)  # the fine-tuning method
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=512, eval_fraction=0.1))  # pairs
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/rm", lr=1e-4))  # the loop
    log: LogConfig = field(default_factory=LogConfig)  # metrics sinks
    reward: RewardConfig = field(default_factory=RewardConfig)  # loss options


def _collate(pairs: list[Pair], pad_id: int) -> dict[str, Any]:
    """Chosen and rejected sequences stacked into one padded batch (one forward pass for both)."""
    c, r = collate_side(pairs, "chosen", pad_id), collate_side(pairs, "rejected", pad_id)
    T = max(c["input_ids"].shape[1], r["input_ids"].shape[1])

    def pad(x: torch.Tensor, v: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)

    return {"input_ids": torch.cat([pad(c["input_ids"], pad_id), pad(r["input_ids"], pad_id)]),
            "attention_mask": torch.cat([pad(c["attention_mask"], 0), pad(r["attention_mask"], 0)]),
            "margin": torch.tensor([p.margin for p in pairs]), "num_targets": len(pairs),
            "num_tokens": int(c["attention_mask"].sum() + r["attention_mask"].sum())}


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) head outputs at each row's last real token (right padding)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits  # (B, 1) pooled by transformers, or (B, T, 1) for a token-level head
    if logits.dim() == 3:
        last = attention_mask.sum(-1) - 1
        logits = logits[torch.arange(len(last), device=last.device), last]
    return logits.squeeze(-1).float()


def rm_loss(model: torch.nn.Module, batch: dict[str, Any], cfg: RewardConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss summed over the batch's pairs (the trainer normalises)."""
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    B = rewards.shape[0] // 2
    margin = batch["margin"] if cfg.use_margin and bool((batch["margin"] != 0).any()) else None
    loss, metrics = bradley_terry_loss(rewards[:B], rewards[B:], margin=margin, center_coef=cfg.center_coef)
    return loss * B, {"accuracy": metrics["accuracy"] * B, "margin": metrics["margin"] * B}


@dataclass
class RMRun:
    """What `run` returns."""

    model: torch.nn.Module  # the trained reward model (possibly peft-wrapped)
    tokenizer: Any  # its tokenizer
    result: TrainResult  # history and evals (eval/accuracy, eval/margin)
    run_dir: Path  # the run directory; the model is in final/


def load_rm(cfg: ModelConfig, peft_cfg: PeftConfig, device: str = "auto"):
    """A sequence-classification model with one output, pad id set so pooling finds the last token
    (a quantised one is loaded onto `device`, see `align.models.load_causal_lm`)."""
    return load_causal_lm(cfg, quantization_config(peft_cfg, cfg), head="score", device=device)


def run(cfg: RMConfig, model=None, tokenizer=None, callbacks: Sequence[Callable[[int, dict], None]] = ()) -> RMRun:
    """Train a reward model as `cfg` says (a tiny `model` / `tokenizer` may be passed in)."""
    set_threads(cfg.train.num_threads)
    distributed.init_from_env(cfg.train.device)  # joins torchrun's processes, if any
    main = distributed.is_main()
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    rows = D.read_rows(cfg.data.path, cfg.data.split, cfg.data.max_examples)
    if cfg.data.eval_path:
        eval_rows = D.read_rows(cfg.data.eval_path, cfg.data.split)
    else:
        rows, eval_rows = D.split_rows(rows, cfg.data.eval_fraction, cfg.train.seed)
    train, stats = encode_pairs(rows, cfg.data, tokenizer, cfg.data.path)
    evals = encode_pairs(eval_rows, cfg.data, tokenizer, "eval split")[0] if eval_rows else []
    if model is None:
        model = load_rm(cfg.model, cfg.peft, cfg.train.device)
    model.config.pad_token_id = tokenizer.pad_token_id
    total = plan_steps(len(train), cfg.train, distributed.world_size())[1]
    model = apply_tuning(model, cfg.peft, total_steps=total, task_type="SEQ_CLS", new_heads=("score",),
                         tokenizer_path=resolve_model(cfg.model.name) if cfg.peft.prompt_init_text else None)
    n_train, n_all = count_parameters(model)
    if main:
        print(f"[align] reward model, peft.method={cfg.peft.method}: {n_train:,} trainable / {n_all:,} parameters; "
              f"{len(train)} train pairs, {len(evals)} eval pairs, {stats['truncated']} truncated, "
              f"{stats['skipped']} skipped", flush=True)
        save_config(cfg, run_dir / "config.yaml")
    trainer = Trainer(model, train, functools.partial(_collate, pad_id=tokenizer.pad_token_id),
                      functools.partial(rm_loss, cfg=cfg.reward), cfg.train, cfg.log, run_dir, to_dict(cfg),
                      eval_examples=evals, after_backward=after_backward_hook(model, cfg.peft),
                      callbacks=callbacks, desc="rm", peft_cfg=cfg.peft)
    if cfg.train.resume and trainer.resume() and main:
        print(f"[align] resumed from step {trainer.step}", flush=True)
    result = trainer.train()
    if main:
        save_final(model, tokenizer, run_dir / "final", merged=cfg.train.save_merged)
    distributed.barrier()  # final/ is complete when run() returns on any process
    return RMRun(model, tokenizer, result, run_dir)


class RewardModelScorer:
    """A trained reward model as a reward function: `scorer(prompts, completions) -> list[float]`.

    `prompts` are the texts the policy saw (chat template applied); each completion is closed
    with the end-of-turn the reward model was trained on, then scored in batches.
    """

    def __init__(self, path: str | Path, batch_size: int = 16, num_threads: int = 0, model=None, tokenizer=None,
                 device: str = "auto"):
        from transformers import AutoTokenizer

        set_threads(num_threads)
        self.device = worker_device(device)
        self.batch_size = batch_size
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        if model is None:
            path = Path(path)
            if (path / "adapter_config.json").is_file():
                import peft

                model = peft.AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1)
            else:
                from transformers import AutoModelForSequenceClassification

                model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        self.model = model.to(self.device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.suffix = ""
        if self.tokenizer.chat_template and self.tokenizer.eos_token:
            self.suffix = self.tokenizer.eos_token + "\n"

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        """One scalar reward per (prompt, completion)."""
        texts = [p + c + (self.suffix if self.suffix and not c.endswith(self.suffix) else "")
                 for p, c in zip(prompts, completions)]
        out: list[float] = []
        self.tokenizer.padding_side = "right"
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False)
            enc = to_device(dict(enc), self.device)
            out.extend(sequence_rewards(self.model, enc["input_ids"], enc["attention_mask"]).tolist())
        return out
