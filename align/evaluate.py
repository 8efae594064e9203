"""`align eval`: measure a model, an adapter, a run's final/ or one of its checkpoints.

    align eval runs/main                                  # the run's held-out prompts and rewards
    align eval runs/main eval.samples=8 eval.temperature=1.0   # + pass@1..8
    align eval runs/rm/final eval.task=reward_model pairs.path=pairs.jsonl
    align eval runs/dpo/final eval.task=preference pairs.path=pairs.jsonl
    align eval smollm2-135m-instruct eval.lm_eval_tasks=[my_task] eval.lm_eval_include=tasks/

Tasks: `generate` (greedy accuracy and pass@k with the run's reward functions, every output in
outputs.jsonl), `reward_model` (pairwise accuracy of a reward model), `preference` (the implicit
reward beta * (log pi - log pi_ref) of chosen vs rejected, as DPO's rewards/accuracies), and
standard benchmarks through lm-evaluation-harness on the user's local task files.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from align.config import DataConfig, LogConfig, ModelConfig, PeftConfig, ConfigError, save_config
from align.rl_config import PromptConfig, RewardsConfig, RolloutConfig
from align.types import Sample


@dataclass
class EvalSection:
    """What `align eval` measures and where it writes."""

    target: str = ""  # what to evaluate: a model name or directory, an adapter, final/, a checkpoint or a run directory
    task: Literal["generate", "reward_model", "preference"] = "generate"  # what to measure
    samples: int = 0  # generate: samples per prompt at `temperature` for pass@k (0 = greedy only)
    temperature: float = 1.0  # generate: temperature of the pass@k samples
    limit: int | None = None  # evaluate only the first N prompts / pairs
    output_dir: str = "runs/eval"  # where outputs.jsonl and summary.json are written
    batch_size: int = 32  # prompts per engine call (generate) or pairs per forward (reward_model / preference)
    reference: str | None = None  # preference: the reference model (default: the adapter's base model)
    beta: float = 0.1  # preference: scale of the implicit reward (accuracy does not depend on it)
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness task names (run as well)
    lm_eval_include: str | None = None  # a directory of the user's own lm-eval task YAMLs (local data)
    lm_eval_limit: int | None = None  # lm-eval: examples per task
    seed: int = 0  # seeds the pass@k samples
    num_threads: int = 0  # torch threads (0 = all cores)


@dataclass
class EvalConfig:
    """`align eval`: the model, its prompts or pairs, the rewards, and what to measure."""

    model: ModelConfig = field(default_factory=ModelConfig)  # a checkpoint's base model (read from its run's config)
    peft: PeftConfig = field(default_factory=PeftConfig)  # a checkpoint's fine-tuning method (read from its run's config)
    data: PromptConfig = field(default_factory=PromptConfig)  # generate: prompts (eval_path, else path)
    pairs: DataConfig = field(default_factory=DataConfig)  # reward_model / preference: the pairs (path)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # generate: max_new_tokens, stop, dtype
    reward: RewardsConfig = field(default_factory=RewardsConfig)  # generate: reward functions and accuracy
    eval: EvalSection = field(default_factory=EvalSection)  # what to measure
    log: LogConfig = field(default_factory=LogConfig)  # progress bar


# ----------------------------------------------------------------------------- what to load
RUN_SECTIONS = ("model", "peft", "data", "pairs", "rollout", "reward")  # taken from a run's config.yaml


def run_config_for(target: str) -> tuple[dict[str, Any], str]:
    """(sections of the run's config.yaml that eval uses, the model directory to load) for a run
    directory (its final/, else its newest checkpoint), a checkpoint or final/ inside a run, or
    ({}, target) for anything else."""
    import yaml

    from align import checkpoint

    p = Path(target).expanduser()
    run = None
    if (p / "config.yaml").is_file() and ((p / "final").is_dir() or (p / "checkpoints").is_dir()):
        run = p
        final = p / "final"
        p = final if final.is_dir() else checkpoint.latest(p / "checkpoints")
        if p is None:
            raise ConfigError(f"run {run} has neither final/ nor a complete checkpoint")
    elif (p.parent / "config.yaml").is_file():  # RUN/final
        run = p.parent
    elif p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file():
        run = p.parent.parent
    if run is None:
        return {}, target
    return eval_sections(yaml.safe_load((run / "config.yaml").read_text()) or {}), str(p)


def eval_sections(cfg: dict[str, Any]) -> dict[str, Any]:
    """The sections of a stage's config that `align eval` uses: the model and its tuning, the
    prompts and rewards of an RL run, the pairs of a reward-model or preference run."""
    cfg = dict(cfg)
    if "reward" in cfg and not isinstance(cfg["reward"].get("functions"), list):
        cfg.pop("reward")  # a reward-model run's `reward` section is its loss, not reward functions
    data = cfg.get("data") or {}
    if "messages_field" in data:  # an offline stage's data are demonstrations or pairs, not prompts
        cfg.pop("data")
        if "chosen_field" in data:  # pairs: the run's held-out ones by default
            known = {f.name for f in dataclasses.fields(DataConfig)}  # a preference run's has KTO's fields too
            cfg["pairs"] = {**{k: v for k, v in data.items() if k in known},
                            "path": data.get("eval_path") or data.get("path"), "eval_path": None}
    out = {k: cfg[k] for k in RUN_SECTIONS if k in cfg}
    if isinstance((cfg.get("train") or {}).get("seed"), int):  # generated held-out problems depend on the run's seed
        out["eval"] = {"seed": cfg["train"]["seed"]}
    return out


def load_policy(cfg: EvalConfig, path: str) -> tuple[torch.nn.Module, Any, str | None]:
    """(a plain causal LM with any adapter folded in, its tokenizer, the base model's path) from a
    model name or directory, an adapter directory or a training checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models import load_causal_lm, load_tokenizer, resolve_model
    from align.tuning import merged_model

    p = Path(path)
    if (p / "adapter_config.json").is_file():
        import peft

        model = peft.AutoPeftModelForCausalLM.from_pretrained(str(p))
        base = model.peft_config["default"].base_model_name_or_path
        tok = AutoTokenizer.from_pretrained(str(p))
    elif (p / "weights.safetensors").is_file():  # a checkpoint: the run's model + tuning, then its weights
        from safetensors.torch import load_file

        from align.tuning import apply_tuning

        model = apply_tuning(load_causal_lm(cfg.model), cfg.peft)
        weights = load_file(str(p / "weights.safetensors"))
        unknown = set(weights) - set(model.state_dict())
        if unknown:
            raise ConfigError(f"{p}: checkpoint weights {sorted(unknown)[:3]} do not fit model.name={cfg.model.name!r} "
                              f"with peft.method={cfg.peft.method}")
        model.load_state_dict(weights, strict=False)
        base, tok = resolve_model(cfg.model.name), load_tokenizer(cfg.model)
    else:
        base = resolve_model(path)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                     trust_remote_code=cfg.model.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        raise ConfigError(f"{path}: a prompt-learning adapter cannot be folded into the weights; evaluate it "
                          "inside its training stage (train.eval_every) instead")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return merged_model(model).eval(), tok, base


# ----------------------------------------------------------------------------- generate
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_samples(runner: Any, samples: list[Sample], model_tokens: list[int] | None = None) -> dict[str, float]:
    """Set each sample's reward and components with a `rewards.RewardRunner`; its metrics back."""
    columns: dict[str, list] = {k: [s.columns.get(k) for s in samples] for k in {k for s in samples for k in s.columns}}
    columns["completion_token_counts"] = model_tokens or [len(s.completion_ids) for s in samples]
    res = runner([s.prompt for s in samples], [s.completion for s in samples], columns,
                 truncated=[s.truncated for s in samples])
    for i, s in enumerate(samples):
        s.reward = res.total[i]
        s.reward_components = {name: vals[i] for name, vals in res.components.items()}
    return res.metrics


def reward_runner(cfg: RewardsConfig) -> Any:
    """The reward functions of `cfg`, run in this process."""
    import rewards

    return rewards.RewardRunner([rewards.RewardSpec(f.name.split(":")[-1], f.name, weight=f.weight, on_error=f.on_error,
                                                    kwargs=f.kwargs, timeout=f.timeout) for f in cfg.functions],
                                truncated_reward=cfg.truncated_reward)


def sample_record(s: Sample) -> dict[str, Any]:
    """One evaluated sample as a JSON line: prompt, completion, reward and its parts, the row's columns."""
    return {"group": s.group_id, "prompt": s.prompt, "completion": s.completion, "reward": s.reward,
            "reward_components": s.reward_components, "finish_reason": s.finish_reason,
            **{k: v for k, v in s.columns.items() if isinstance(v, (str, int, float, bool))}}


def write_samples(path: Path, samples: list[Sample]) -> None:
    """Evaluated samples as JSONL (what `align board` shows per evaluation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(sample_record(s), default=str) + "\n")


def generation_eval(engine: Any, rows: list[dict], runner: Any, accuracy: str | None, rollout: RolloutConfig,
                    samples: int = 0, temperature: float = 1.0, seed: int = 0, progress: bool = True,
                    batch: int = 16) -> tuple[dict[str, float], list[Sample]]:
    """Greedy accuracy / reward on `rows` and, with `samples` > 0, pass@k for k = 1, 2, 4, ... up to
    `samples` (unbiased estimator); returns the summary and every sample (greedy first)."""
    from tqdm.auto import tqdm

    from rollout.base import SamplingParams

    plans = [("greedy", SamplingParams(n=1, temperature=0.0, max_new_tokens=rollout.max_new_tokens, stop=rollout.stop))]
    if samples:
        plans.append(("sampled", SamplingParams(n=samples, temperature=temperature, top_p=rollout.top_p,
                                                top_k=rollout.top_k, max_new_tokens=rollout.max_new_tokens,
                                                stop=rollout.stop, seed=seed)))
    out: dict[str, float] = {"n": len(rows)}
    every: list[Sample] = []
    bar = tqdm(total=sum(len(rows) * p.n for _, p in plans), desc="eval", disable=not progress, dynamic_ncols=True)
    for name, sp in plans:
        got: list[Sample] = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            new = engine.generate([r["text"] for r in chunk], sp, group_offset=i,
                                  columns=[r["columns"] for r in chunk], prompt_ids=[r["ids"] for r in chunk])
            score_samples(runner, new)
            got += new
            bar.update(len(new))
        every += got
        out[f"{name}/reward"] = _mean([s.reward for s in got])
        out[f"{name}/response_length"] = _mean([len(s.completion_ids) for s in got])
        if accuracy and any(accuracy in s.reward_components for s in got):
            if name == "greedy":
                out["accuracy"] = _mean([s.reward_components.get(accuracy) for s in got])
            else:
                correct = [0] * len(rows)
                for s in got:
                    correct[s.group_id] += int((s.reward_components.get(accuracy) or 0.0) >= 0.5)
                k = 1
                while k <= sp.n:
                    out[f"pass@{k}"] = sum(pass_at_k(sp.n, c, k) for c in correct) / len(rows)
                    k *= 2
                if sp.n & (sp.n - 1):  # not a power of two: report k = n too
                    out[f"pass@{sp.n}"] = sum(pass_at_k(sp.n, c, sp.n) for c in correct) / len(rows)
    bar.close()
    return out, every


def _mean(xs: list) -> float:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else float("nan")


# ----------------------------------------------------------------------------- the command
def _pairs(cfg: EvalConfig, tokenizer) -> tuple[list, list[dict]]:
    """The pairs of `cfg.pairs.path`, each kept with its row (a pair that cannot be encoded is
    left out, as in the reward-model stage)."""
    from align.data import DataError, read_rows
    from align.pairs import encode_pairs

    if not cfg.pairs.path:
        raise ConfigError(f"eval.task={cfg.eval.task} needs pairs.path (a JSONL of prompt / chosen / rejected)")
    rows = read_rows(cfg.pairs.path, cfg.pairs.split, cfg.eval.limit)
    pairs, kept = [], []
    for i, row in enumerate(rows):
        try:
            pairs += encode_pairs([row], cfg.pairs, tokenizer, f"{cfg.pairs.path} row {i + 1}")[0]
            kept.append(row)
        except DataError:
            if not (row.get(cfg.pairs.chosen_field) and row.get(cfg.pairs.rejected_field)):
                raise
    return pairs, kept


def _text_fields(cfg: EvalConfig) -> Any:
    """The row fields a pair record keeps (its text, not its tokens)."""
    keys = (cfg.pairs.prompt_field, cfg.pairs.chosen_field, cfg.pairs.rejected_field)
    return lambda r: {k: r[k] for k in keys if k in r}


def _evaluate_pairs(cfg: EvalConfig, path: str) -> tuple[dict[str, float], list[dict]]:
    """Pairwise accuracy of a reward model (task reward_model) or of a policy's implicit reward."""
    from align import eval_pairs as E

    if cfg.eval.task == "reward_model":
        from align.rm import RewardModelScorer

        scorer = RewardModelScorer(path, num_threads=cfg.eval.num_threads, device="cpu")
        pairs, rows = _pairs(cfg, scorer.tokenizer)
        c, r = E.reward_model_scores(scorer.model, pairs, scorer.tokenizer.pad_token_id, cfg.eval.batch_size,
                                     cfg.log.progress)
    else:
        from transformers import AutoModelForCausalLM

        policy, tok, base = load_policy(cfg, path)
        ref_path = cfg.eval.reference or base
        if ref_path is None or Path(str(ref_path)).resolve() == Path(path).resolve():
            raise ConfigError("eval.task=preference needs eval.reference (the model the policy was tuned from)")
        reference = load_policy(cfg, ref_path)[0] if cfg.eval.reference else \
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        pairs, rows = _pairs(cfg, tok)
        c, r = E.implicit_rewards(policy, reference, pairs, tok.pad_token_id, cfg.eval.beta, cfg.eval.batch_size,
                                  cfg.log.progress)
    return E.pair_summary(c, r), E.pair_records(rows, c, r, _text_fields(cfg))


def lm_eval_run(model: torch.nn.Module, tokenizer: Any, section: EvalSection) -> dict[str, float]:
    """lm-evaluation-harness tasks on the model in memory; its metrics as lm_eval/<task>/<metric>."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("eval.lm_eval_tasks needs lm-evaluation-harness: pip install 'align[eval]'") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=section.batch_size, device=str(model.device))
    tm = TaskManager(include_path=section.lm_eval_include) if section.lm_eval_include else TaskManager()
    res = lm_eval.simple_evaluate(model=lm, tasks=list(section.lm_eval_tasks), task_manager=tm,
                                  limit=section.lm_eval_limit, random_seed=section.seed)
    out = {}
    for task, metrics in res["results"].items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not k.startswith("alias"):
                out[f"lm_eval/{task}/{k.replace(',none', '')}"] = float(v)
    return out


def run(cfg: EvalConfig) -> dict[str, float]:
    """Evaluate `cfg.eval.target` as `cfg` says; writes outputs.jsonl and summary.json to
    `cfg.eval.output_dir` and returns the summary."""
    from align.models import set_threads

    set_threads(cfg.eval.num_threads)
    if not cfg.eval.target:
        raise ConfigError("eval.target is empty: name a model, adapter, final/, checkpoint or run directory")
    out_dir = Path(cfg.eval.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = run_config_for(cfg.eval.target)[1]  # a run directory: its final/, else its newest checkpoint
    save_config(cfg, out_dir / "config.yaml")
    records: list[dict] = []
    if cfg.eval.task in ("reward_model", "preference"):
        summary, records = _evaluate_pairs(cfg, path)
    else:
        from align.rl import prompt_rows
        from rollout.hf import HFEngine

        model, tok, _ = load_policy(cfg, path)
        summary = {}
        if cfg.data.path or cfg.data.eval_path:
            train, held = prompt_rows(cfg.data, tok, cfg.eval.seed)
            rows = (held or train)[: cfg.eval.limit]
            engine = HFEngine(model, tok, dtype=cfg.rollout.dtype, device="cpu")
            runner = reward_runner(cfg.reward)
            try:
                summary, samples = generation_eval(engine, rows, runner, cfg.reward.accuracy, cfg.rollout,
                                                   cfg.eval.samples, cfg.eval.temperature, cfg.eval.seed,
                                                   cfg.log.progress, cfg.eval.batch_size)
            finally:
                runner.close()
            records = [sample_record(s) | {"kind": "greedy" if i < len(rows) else "sampled"}
                       for i, s in enumerate(samples)]
        if cfg.eval.lm_eval_tasks:
            summary.update(lm_eval_run(model, tok, cfg.eval))
    with open(out_dir / "outputs.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
    (out_dir / "summary.json").write_text(json.dumps({"target": cfg.eval.target, "task": cfg.eval.task, **summary},
                                                     indent=2))
    return summary


def summary_table(summary: dict[str, float]) -> str:
    """The summary as an aligned two-column table."""
    width = max((len(k) for k in summary), default=0)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in summary.items():
        shown = f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else str(int(v)) \
            if isinstance(v, (int, float)) and math.isfinite(v) else str(v)
        lines.append(f"{k:<{width}}  {shown}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inside a stage
class StageEvaluator:
    """`generate_eval` of a supervised stage: `evaluator(model, step)` generates greedily on the
    held-out prompts with the model as it is now (adapter folded into a copy), scores them, writes
    samples/step_N.jsonl and returns eval/accuracy and eval/gen_reward."""

    def __init__(self, cfg: Any, tokenizer: Any, run_dir: Path, seed: int = 0):
        from align.rl import prompt_rows

        if not (cfg.data.path or cfg.data.eval_path):
            raise ConfigError("generate_eval.every > 0 needs generate_eval.data.path or .eval_path (prompts)")
        self.cfg, self.tokenizer, self.run_dir = cfg, tokenizer, Path(run_dir)
        train, held = prompt_rows(cfg.data, tokenizer, seed)
        self.rows = (held or train)[: cfg.limit]
        self.runner = reward_runner(cfg.reward)
        self.rollout = RolloutConfig(max_new_tokens=cfg.max_new_tokens)

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Greedy accuracy / reward of `model` now; samples written for `align board`."""
        from align.tuning import merged_model
        from rollout.hf import HFEngine

        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            raise ConfigError("generate_eval cannot fold a prompt-learning adapter into the weights; turn it off")
        was_training = model.training
        engine = HFEngine(merged_model(model), self.tokenizer, device=next(model.parameters()).device)
        summary, samples = generation_eval(engine, self.rows, self.runner, self.cfg.reward.accuracy, self.rollout,
                                           progress=False)
        del engine
        model.train(was_training)
        if self.cfg.log_samples:
            write_samples(self.run_dir / "samples" / f"step_{step:05d}.jsonl", samples[: self.cfg.log_samples])
        out = {"eval/gen_reward": summary["greedy/reward"], "eval/response_length": summary["greedy/response_length"]}
        if "accuracy" in summary:
            out["eval/accuracy"] = summary["accuracy"]
        return out

    def close(self) -> None:
        """Stop the reward functions' workers."""
        self.runner.close()


def stage_evaluator(cfg: Any, tokenizer: Any, run_dir: Path, seed: int = 0) -> StageEvaluator | None:
    """The generation evaluator of a supervised stage's `generate_eval` section, on rank 0, or None."""
    from align import distributed

    if not cfg.every or not distributed.is_main():
        return None
    return StageEvaluator(cfg, tokenizer, run_dir, seed)
