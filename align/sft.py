"""The SFT stage: supervised fine-tuning on demonstrations, with any fine-tuning method.

    align sft examples/sft.yaml train.lr=1e-4          # from the shell
    align.sft.run(load_config(SFTConfig, "examples/sft.yaml"))   # from Python

Rows are chat `messages` or `prompt` / `completion`; the loss is on completion (assistant)
tokens unless `data.completion_only_loss=false`.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from align import data as D
from align import distributed
from align.config import SFTConfig, save_config, to_dict
from align.evaluate import stage_evaluator
from align.models import load_causal_lm, load_tokenizer, resolve_model, set_threads
from align.trainer import Trainer, TrainResult, plan_steps
from align.tuning import after_backward_hook, apply_tuning, count_parameters, quantization_config, save_final

log = logging.getLogger(__name__)


def sft_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed next-token cross-entropy over label tokens (the trainer divides by the step's count)."""
    labels = batch.pop("labels")
    out = model(**batch, use_cache=False)
    logits = out.logits[:, :-1].float()  # (B, T-1, V)
    if logits.shape[1] != labels.shape[1] - 1:  # prompt-learning methods prepend virtual tokens
        logits = logits[:, -(labels.shape[1] - 1):]
    targets = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, {}


def _collate(rows: list[Any], pad_id: int, packed: bool, peft_prompt: bool) -> dict[str, Any]:
    """Collate encoded examples (or packed groups of them) and count their label tokens."""
    batch = D.collate([r if packed else [r] for r in rows], pad_id)
    batch["num_targets"] = int((batch["labels"][:, 1:] != -100).sum())
    batch["num_tokens"] = int(sum(len(e.input_ids) for r in rows for e in (r if packed else [r])))
    if peft_prompt:  # peft's prompt-learning models build their own positions and 2-D masks
        batch.pop("position_ids")
    return batch


@dataclass
class SFTRun:
    """What `run` returns: the trained model, its tokenizer, and the loop's result."""

    model: torch.nn.Module  # the trained (possibly peft-wrapped) model
    tokenizer: Any  # its tokenizer
    result: TrainResult  # per-step history and evals
    run_dir: Path  # where config, metrics, checkpoints and final/ were written


def prepare_data(cfg: SFTConfig, tokenizer) -> tuple[list, list, D.EncodeStats]:
    """Read, split and encode the train and eval examples."""
    rows = D.read_rows(cfg.data.path, cfg.data.split, cfg.data.max_examples)
    eval_rows: list[dict] = []
    if cfg.data.eval_path:
        eval_rows = D.read_rows(cfg.data.eval_path, cfg.data.split)
    else:
        rows, eval_rows = D.split_rows(rows, cfg.data.eval_fraction, cfg.train.seed)
    train, stats = D.encode_sft(rows, cfg.data, tokenizer, source=cfg.data.path)
    evals = D.encode_sft(eval_rows, cfg.data, tokenizer, source=cfg.data.eval_path or "eval split")[0] if eval_rows else []
    if cfg.data.packing:
        train = D.pack(train, cfg.data.max_length)
        evals = D.pack(evals, cfg.data.max_length) if evals else []
    return train, evals, stats


def run(cfg: SFTConfig, model=None, tokenizer=None,
        callbacks: Sequence[Callable[[int, dict], None]] = ()) -> SFTRun:
    """Run SFT as `cfg` says; `model` / `tokenizer` may be passed in (tests use tiny ones)."""
    set_threads(cfg.train.num_threads)
    distributed.init_from_env(cfg.train.device)  # joins torchrun's processes, if any
    main = distributed.is_main()
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    train, evals, stats = prepare_data(cfg, tokenizer)
    if main and (stats.truncated or stats.skipped):
        log.warning("data: %d of %d examples truncated, %d skipped (%s) at data.max_length=%d",
                    stats.truncated, stats.total, stats.skipped, stats.reasons, cfg.data.max_length)
    if model is None:
        model = load_causal_lm(cfg.model, quantization_config(cfg.peft, cfg.model), device=cfg.train.device)
    total_steps = plan_steps(len(train), cfg.train, distributed.world_size())[1]
    tok_path = resolve_model(cfg.model.name) if model is None else None
    model = apply_tuning(model, cfg.peft, total_steps=total_steps, tokenizer_path=tok_path)
    trainable, total = count_parameters(model)
    if main:
        print(f"[align] peft.method={cfg.peft.method}: {trainable:,} trainable / {total:,} parameters "
              f"({100 * trainable / total:.3f}%); {len(train)} train rows, {len(evals)} eval rows, "
              f"{stats.truncated} truncated, {stats.skipped} skipped", flush=True)
        save_config(cfg, run_dir / "config.yaml")
    peft_prompt = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    collate = functools.partial(_collate, pad_id=tokenizer.pad_token_id, packed=cfg.data.packing,
                                peft_prompt=peft_prompt)
    gen_eval = stage_evaluator(cfg.generate_eval, tokenizer, run_dir, cfg.train.seed)
    trainer = Trainer(model, train, collate, sft_loss, cfg.train, cfg.log, run_dir, to_dict(cfg),
                      eval_examples=evals, after_backward=after_backward_hook(model, cfg.peft),
                      callbacks=callbacks, desc="sft", generate_eval=gen_eval, generate_every=cfg.generate_eval.every,
                      peft_cfg=cfg.peft)
    if cfg.train.resume and trainer.resume() and main:
        print(f"[align] resumed from step {trainer.step}", flush=True)
    try:
        result = trainer.train()
    finally:
        if gen_eval is not None:
            gen_eval.close()
    if main:
        save_final(model, tokenizer, run_dir / "final", merged=cfg.train.save_merged)
    distributed.barrier()  # final/ is complete when run() returns on any process
    return SFTRun(model, tokenizer, result, run_dir)
