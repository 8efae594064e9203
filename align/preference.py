"""The offline preference stage: DPO (sigmoid, IPO, hinge, robust, cDPO), ORPO, SimPO and KTO on
preference data, with any fine-tuning method.

    align preference examples/preference.yaml algorithm.name=simpo
    align.preference.run(load_config(PreferenceConfig, "examples/preference.yaml"))

The stage reads in four modules, one concern each:
- align/preference_data.py: rows -> examples (pairs; KTO's unpairing and mismatched KL pairs), and
  examples -> length-bucketed micro-batches;
- align/preference_logps.py: each sequence's summed completion log-prob, exact and without wasted
  tokens (shared-prompt forward, logits only at completion positions);
- align/preference_reference.py: the precomputed reference log-probs and their cache;
- here: the config, the loss on a micro-batch, and `run`.

Reference log-probabilities (`algorithm.reference`, unused by reference-free ORPO / SimPO):
- `precompute` (default): once before training, cached on disk (align/preference_reference.py);
- `adapter`: the same model with the peft adapter disabled, on the fly each step (TRL's default);
- `model`: a frozen copy of the initial model (full fine-tuning without precomputing).

KTO's reference point z0 is the mean log-ratio over the micro-batch's mismatched pairs; under data
parallelism over all processes' pairs (as TRL gathers them), so N processes compute the z0 of one
process with the combined batch.
"""
from __future__ import annotations

import copy
import difflib
import functools
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

import algorithms
from algorithms.preference import preference_names
from align import data as D
from align import distributed
from align.config import (ConfigError, GenerationEvalConfig, LogConfig, ModelConfig, PeftConfig, TrainConfig, from_dict, save_config,
                          to_dict)
from align.evaluate import stage_evaluator
from align.models import load_causal_lm, load_tokenizer, resolve_model, set_threads
from align.preference_data import PreferenceDataConfig, collate, encode_examples
from align.preference_logps import can_share_prompt, sequence_logps
from align.preference_reference import attach_reference, model_fingerprint, reference_context
from align.trainer import Trainer, TrainResult, place_model, plan_steps
from align.tuning import after_backward_hook, apply_tuning, count_parameters, is_peft, quantization_config, save_final


# ----------------------------------------------------------------------------- config
def _check_name(name: str) -> None:
    """Stop unless `name` is a registered preference algorithm, naming the closest one."""
    valid = preference_names()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"algorithm.name={name!r}{hint} (the preference stage runs {', '.join(valid)})")


@dataclass
class AlgorithmSection:
    """Which preference loss, its hyper-parameters, and where the reference log-probs come from."""

    name: str = "dpo"  # a preference loss of the registry (algorithms/preference.py): dpo, kto, orpo, simpo
    params: dict[str, Any] = field(default_factory=dict)  # the algorithm's dataclass fields, e.g. beta, loss_type
    reference: Literal["precompute", "adapter", "model"] = "precompute"  # see the module docstring
    reference_cache: str | None = None  # directory for precomputed reference log-probs (None: the run directory)
    share_prompt: bool = True  # pairs: one forward over the shared prompt, both completions on its cache (exact)

    def __post_init__(self) -> None:
        _check_name(self.name)  # at load time, before any model is read


@dataclass
class PreferenceConfig:
    """Offline preference tuning on pairs (DPO family, ORPO, SimPO) or labelled completions (KTO)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the policy (and reference) model
    peft: PeftConfig = field(default_factory=PeftConfig)  # the fine-tuning method
    data: PreferenceDataConfig = field(default_factory=lambda: PreferenceDataConfig(max_length=512))  # pairs
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/preference", lr=5e-5))  # the loop
    log: LogConfig = field(default_factory=LogConfig)  # metrics sinks
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)  # the loss and its reference
    generate_eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)  # held-out generation every N steps


def build_algorithm(section: AlgorithmSection) -> Any:
    """The loss object for `section`; an unknown or invalid hyper-parameter stops with its name."""
    _check_name(section.name)  # again: the section may have been changed since it was loaded
    cls = algorithms.get_class(section.name)
    try:  # from_dict names an unknown key with its closest valid one, and checks types
        return from_dict(cls, section.params, "algorithm.params")
    except (ValueError, TypeError) as exc:  # __post_init__ range checks (beta <= 0, bad loss_type)
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{exc} [{section.name}]") from None
        raise ConfigError(f"algorithm.params ({section.name}): {exc}") from None


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


def _reference_logps(model: torch.nn.Module, batch: dict[str, Any], reference: str,
                     ref_model: torch.nn.Module | None, kto: bool) -> torch.Tensor:
    """(2, n) reference log-probs of the batch (pairs: chosen, rejected; KTO: completions, KL
    partners): precomputed, or on the fly with the adapter disabled or the frozen copy."""
    ref = batch.get("ref")  # (2, n) attached by align/preference_reference.py
    if ref is not None:
        return ref
    if reference == "precompute":
        raise RuntimeError("algorithm.reference=precompute but the batch carries no reference log-probs")
    n = batch["n"]
    ref_net = ref_model if reference == "model" else model
    ctx = nullcontext() if reference == "model" else reference_context(model)
    with torch.no_grad(), ctx:
        r, _ = sequence_logps(ref_net, batch["chunks"])  # (S,)
        rk = sequence_logps(ref_net, batch["kl_chunks"])[0] if kto else r[n:]  # (n,)
    return torch.stack([r[:n], rk])  # (2, n)


def preference_loss(model: torch.nn.Module, batch: dict[str, Any], algo: Any, reference: str,
                    ref_model: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The algorithm's loss on a micro-batch, as a sum over its rows (the trainer normalises)."""
    n, kto = batch["n"], not algo.pairwise
    logps, lengths = sequence_logps(model, batch["chunks"])  # (S,), S = 2n pairs / n KTO
    ref = _reference_logps(model, batch, reference, ref_model, kto) if algo.needs_reference else None  # (2, n)
    if kto:
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, batch["kl_chunks"])  # (n,) z0 is detached in the loss
        kl, ref_kl = _global_kl(kl_logps, ref[1])
        loss, metrics = algo.loss(policy_logps=logps, ref_logps=ref[0], labels=batch["labels"],
                                  kl_logps=kl, ref_kl_logps=ref_kl)
        return loss * n, _kto_metrics(metrics, logps, ref[0], batch["labels"], n)
    pc, pr = logps[:n], logps[n:]  # (n,) chosen, rejected
    lc, lr = lengths[:n].float(), lengths[n:].float()  # (n,)
    refs = dict(ref_chosen_logps=ref[0], ref_rejected_logps=ref[1]) if ref is not None else {}
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


def _policy(cfg: PreferenceConfig, model: Any, device: torch.device, needs_ref: bool,
            num_rows: int) -> tuple[torch.nn.Module, torch.nn.Module | None, str]:
    """(the policy with its fine-tuning method applied, the frozen reference copy or None, the
    reference cache's model key); the copy and the key are taken from the weights before tuning."""
    passed_in = model is not None
    if model is None:
        model = load_causal_lm(cfg.model, quantization_config(cfg.peft, cfg.model), device=cfg.train.device)
    model = place_model(model, device)  # before the reference copy and the precomputed log-probs
    ref_model = None
    if needs_ref and cfg.algorithm.reference == "model":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # the initial weights, frozen
    model_key = model_fingerprint(model, cfg.model.name, cfg.model.dtype, cfg.train.autocast) if needs_ref else ""
    total = plan_steps(num_rows, cfg.train, distributed.world_size())[1]
    tok_path = resolve_model(cfg.model.name) if cfg.peft.prompt_init_text and not passed_in else None
    model = place_model(apply_tuning(model, cfg.peft, total_steps=total, tokenizer_path=tok_path), device)
    if needs_ref and cfg.algorithm.reference == "adapter" and not is_peft(model):
        raise ConfigError(f"algorithm.reference=adapter needs a peft adapter, but peft.method={cfg.peft.method}; "
                          "use algorithm.reference=precompute or model")
    return model, ref_model, model_key


def _finish(cfg: PreferenceConfig, model: torch.nn.Module, tokenizer: Any, run_dir: Path) -> None:
    """Plots and the final model, written by rank 0."""
    if cfg.log.plot:
        from align.tracking import plot_metrics

        plot_metrics(run_dir / "metrics.jsonl", run_dir / "plots",
                     {"rewards_accuracy": ["rewards/accuracy", "eval/rewards/accuracy"],
                      "rewards_margins": ["rewards/margins", "eval/rewards/margins"],
                      "logps": ["logps/chosen", "logps/rejected"]})
    save_final(model, tokenizer, run_dir / "final", merged=cfg.train.save_merged)


def run(cfg: PreferenceConfig, model=None, tokenizer=None,
        callbacks: Sequence[Callable[[int, dict], None]] = ()) -> PreferenceRun:
    """Preference-tune as `cfg` says (a tiny `model` / `tokenizer` may be passed in)."""
    algo = build_algorithm(cfg.algorithm)  # config errors before any loading
    kto, needs_ref = not algo.pairwise, algo.needs_reference
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
    model, ref_model, model_key = _policy(cfg, model, device, needs_ref, len(train))
    n_train, n_all = count_parameters(model)
    if main:
        print(f"[align] preference ({cfg.algorithm.name}), peft.method={cfg.peft.method}: {n_train:,} trainable / "
              f"{n_all:,} parameters; {len(train)} train rows, {len(evals)} eval rows, {stats['truncated']} "
              f"truncated, {stats['skipped']} skipped; {world} process(es) on {device}", flush=True)
        save_config(cfg, run_dir / "config.yaml")
    share = cfg.algorithm.share_prompt and not kto and can_share_prompt(model)
    cached = False
    if needs_ref and cfg.algorithm.reference == "precompute":  # before resume: the initial model
        cache, pad = Path(cfg.algorithm.reference_cache or run_dir), tokenizer.pad_token_id
        cached = attach_reference(model, train, pad, cache, model_key, cfg.train.autocast, share)
        attach_reference(model, evals, pad, cache, model_key, cfg.train.autocast, share, "eval")
    collate_fn = functools.partial(collate, pad_id=tokenizer.pad_token_id, kto=kto, share_prompt=share)
    loss_fn = functools.partial(preference_loss, algo=algo, reference=cfg.algorithm.reference, ref_model=ref_model)
    gen_eval = stage_evaluator(cfg.generate_eval, tokenizer, run_dir, cfg.train.seed)
    trainer = Trainer(model, train, collate_fn, loss_fn, cfg.train, cfg.log, run_dir, to_dict(cfg), eval_examples=evals,
                      after_backward=after_backward_hook(model, cfg.peft), callbacks=callbacks, desc=cfg.algorithm.name,
                      generate_eval=gen_eval, generate_every=cfg.generate_eval.every, peft_cfg=cfg.peft)
    if cfg.train.resume and trainer.resume() and main:
        print(f"[align] resumed from step {trainer.step}", flush=True)
    try:
        result = trainer.train()
    finally:
        if gen_eval is not None:
            gen_eval.close()
    if main:
        _finish(cfg, model, tokenizer, run_dir)
    distributed.barrier()  # final/ is complete when run() returns on any process
    return PreferenceRun(model, tokenizer, result, run_dir, cached)
