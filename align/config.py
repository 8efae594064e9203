"""One typed config tree: nested dataclasses loaded from YAML and overridden by dotted `key=value`.

Validation happens at load time: an unknown key names the closest valid one, a wrong type or value
names the field and what it accepts. The same dataclasses are the Python API.

Secrets (a reward's HTTP headers, API keys, tokens) never reach a file: everything that writes a
config (config.yaml, the checkpoint fingerprint, the wandb config) passes it through `redact`.
A secret can stay out of the config altogether as `"${env:NAME}"`, which the reward registry reads
from the environment when it builds the function; such a reference is kept, it holds no secret.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Which model to load and how."""

    name: str = "smollm2-135m-instruct"  # HF id, local directory, or the alias of the embedded default
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights' dtype when loading
    trust_remote_code: bool = False  # run model code from the checkpoint: off unless asked
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    attn_implementation: str = "sdpa"  # transformers attention backend (sdpa, eager, flash_attention_2)


@dataclass
class PeftConfig:
    """The fine-tuning method and its options (one field picks the method)."""

    method: Literal["full", "freeze", "bitfit", "lora", "qlora", "dora", "adalora", "ia3",
                    "prefix", "prompt", "ptuning"] = "lora"  # what to train
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # LoRA-family targets
    # LoRA / DoRA / QLoRA / AdaLoRA: adapters on the last N decoder layers only (negative: the
    # first N; 0 = every layer). Below the lowest adapted layer nothing needs a gradient, so the
    # backward pass stops there (peft's layers_to_transform)
    adapter_layers: int = 0
    r: int = 16  # LoRA / DoRA / QLoRA rank (AdaLoRA: initial rank)
    alpha: float = 32.0  # LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the LoRA input
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
    loraplus_lr_ratio: float = 0.0  # LoRA+ (Hayou et al. 2024): > 0 trains the B matrices at this many times the lr (peft); 0 = off
    adalora_target_r: int = 8  # AdaLoRA: average rank after pruning
    adalora_tinit: int = 0  # AdaLoRA: steps before rank pruning starts
    adalora_tfinal: int = 0  # AdaLoRA: final steps with fixed ranks
    adalora_deltaT: int = 1  # AdaLoRA: steps between rank re-allocations
    num_virtual_tokens: int = 8  # prefix / prompt / P-tuning: learned virtual tokens
    prompt_init_text: str | None = None  # prompt tuning: initialise the prompt from this text
    freeze_trainable_layers: int = 2  # freeze-tuning: train the last N decoder layers (negative: first N)
    freeze_trainable_modules: list[str] = field(default_factory=lambda: ["all"])  # freeze: sub-modules of those layers ("mlp", "self_attn", or "all")
    freeze_extra_modules: list[str] = field(default_factory=list)  # freeze: also train these (e.g. "lm_head", "embed_tokens")
    bitfit_modules: list[str] = field(default_factory=lambda: ["attention", "mlp"])  # BitFit: where to add zero-init biases when the model has none
    quant_type: Literal["nf4", "fp4"] = "nf4"  # QLoRA: 4-bit data type
    double_quant: bool = True  # QLoRA: quantise the quantisation constants too


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids."""

    path: str = ""  # JSONL / JSON / Parquet file, or a `datasets` name (cached locally)
    split: str = "train"  # split of a `datasets` name
    eval_path: str | None = None  # a separate eval file; else `eval_fraction` of `path`
    eval_fraction: float = 0.0  # held-out share of `path` for eval loss (0 = no eval)
    max_examples: int | None = None  # use only the first N rows (smoke runs)
    template: Literal["auto", "chat", "none"] = "auto"  # chat template: auto = when the tokenizer has one
    max_length: int = 512  # tokens per example (prompt + completion)
    overlong: Literal["truncate", "skip"] = "truncate"  # what to do with a longer example (counted)
    completion_only_loss: bool = True  # loss on completion (assistant) tokens only
    packing: bool = False  # pack several examples per row (position ids restart per example)
    messages_field: str = "messages"  # column holding chat messages
    prompt_field: str = "prompt"  # column holding the prompt
    completion_field: str = "completion"  # column holding the completion
    chosen_field: str = "chosen"  # preference data: the preferred completion (or whole transcript)
    rejected_field: str = "rejected"  # preference data: the dispreferred completion (or transcript)
    margin_field: str = "margin"  # reward model: optional per-pair Bradley-Terry margin


@dataclass
class TrainConfig:
    """The optimisation loop shared by the supervised stages."""

    output_dir: str = "runs/sft"  # the run directory
    seed: int = 0  # seeds data order, dropout and initialisation
    epochs: int = 1  # passes over the data (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps in total
    batch_size: int = 8  # examples per micro-batch of each process (under torchrun N processes take N x this)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.03  # share of steps with linear warm-up
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    eval_every: int = 0  # steps between evals (0 = only at the end)
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    num_threads: int = 0  # torch threads for this process (0 = all cores)
    device: Literal["auto", "cuda", "cpu"] = "auto"  # where the model and batches go: auto = the GPU of this process (LOCAL_RANK under torchrun) where there is one
    autocast: Literal["none", "bfloat16", "auto"] = "none"  # forward/backward in bf16 autocast; auto = where the device computes bf16 fast (3x faster with AMX / AVX512-BF16, 3x slower without)
    save_merged: bool = False  # final/: merged plain model instead of the adapter


@dataclass
class LogConfig:
    """Where metrics go."""

    wandb: bool = False  # also log to Weights & Biases
    tensorboard: bool = False  # also write TensorBoard event files to <output_dir>/tensorboard (`tensorboard --logdir runs`)
    trackio: bool = False  # also log to trackio (TRL's default), stored locally under $TRACKIO_DIR (`trackio show`)
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # online needs WANDB_API_KEY in the environment
    project: str = "align"  # wandb / trackio project
    run_name: str | None = None  # wandb / trackio run name (default: the run directory's name)
    progress: bool = True  # show a progress bar
    plot: bool = True  # write PNG curves to plots/ at the end


@dataclass
class PromptConfig:
    """Where prompts come from and how they become engine inputs."""

    path: str = "arithmetic"  # JSONL / JSON / Parquet / datasets name, or "arithmetic" (generated)
    prompt_field: str = "prompt"  # column with the prompt (a string or chat messages); GSM8K: "question"
    split: str = "train"  # split of a datasets name
    eval_path: str | None = None  # held-out prompts (never trained on); "arithmetic" = generated
    eval_size: int = 100  # held-out prompts used for accuracy
    train_size: int = 2000  # generated problems when path is "arithmetic"
    max_examples: int | None = None  # use only the first N training rows
    template: Literal["auto", "chat", "none"] = "auto"  # chat template: auto = when the tokenizer has one
    prompt_suffix: str = ""  # appended to every question (e.g. " Reply with only the final number.")
    max_prompt_length: int = 512  # longer prompts are skipped and counted


@dataclass
class RewardFnConfig:
    """One reward function of the run."""

    name: str = "math_accuracy"  # a registered reward, or "module:function" / "file.py:function"
    weight: float = 1.0  # weight in the combined reward
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments
    on_error: Literal["raise", "none"] = "raise"  # a raising function fails the run, or scores None
    timeout: float | None = 300.0  # seconds one call (a whole batch) may take; past it the batch scores None or fails the run, as on_error says (null: no deadline)


@dataclass
class RewardsConfig:
    """The reward functions combined into each sample's reward."""

    functions: list[RewardFnConfig] = field(default_factory=lambda: [RewardFnConfig()])  # combined by weight
    accuracy: str | None = "math_accuracy"  # the component reported as accuracy (held-out too)
    truncated_reward: float | None = None  # total reward of a reply cut at the token limit (None: scored like any other)


@dataclass
class GenerationEvalConfig:
    """Held-out generation inside a supervised stage, as `align eval` measures it: greedy accuracy
    and reward with reward functions, every N steps and after the last; off while `every` is 0."""

    every: int = 0  # steps between generation evals (0 = off)
    data: PromptConfig = field(default_factory=lambda: PromptConfig(path=""))  # prompts: eval_path, else path ("arithmetic" = generated held-out)
    reward: RewardsConfig = field(default_factory=RewardsConfig)  # reward functions and the accuracy component
    max_new_tokens: int = 64  # completion token limit
    limit: int = 100  # prompts evaluated each time
    log_samples: int = 16  # completions written to <output_dir>/samples/step_N.jsonl each time


@dataclass
class SFTConfig:
    """Supervised fine-tuning on demonstrations."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the model
    peft: PeftConfig = field(default_factory=PeftConfig)  # the fine-tuning method
    data: DataConfig = field(default_factory=DataConfig)  # the demonstrations
    train: TrainConfig = field(default_factory=TrainConfig)  # the optimisation loop
    log: LogConfig = field(default_factory=LogConfig)  # metrics sinks
    generate_eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)  # held-out generation every N steps


# ----------------------------------------------------------------------------- loading
C = TypeVar("C")


def _accepts(tp: Any) -> str:
    """Human words for a type annotation, for error messages."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_accepts(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_accepts(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp` (converting int->float, str->list), or raise."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _convert(value, arg, where)
            except ConfigError:
                pass
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif origin is list:
        items = value if isinstance(value, list) else [value] if isinstance(value, str) else None
        if items is not None:
            return [_convert(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(items)]
    elif tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, where)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is Any or isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: got {value!r}, which is not {_accepts(tp)}")


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build dataclass `cls` from a nested dict, naming any unknown key and its closest valid one."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint} (valid here: {', '.join(names)})")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted 'a.b', creating mappings on the way; an integer key indexes
    a list ('reward.functions.2.weight')."""
    keys = dotted.split(".")
    node: Any = data
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"override '{dotted}': '{k}' is not an index of the "
                                  f"{len(node)}-item list '{'.'.join(keys[:depth])}'")
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{keys[depth - 1]}' is not a section")
        if last:
            node[k] = value
        elif isinstance(node, dict):
            node = node.setdefault(k, {})
        else:
            node = node[k]


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = (),
                base: dict[str, Any] | None = None) -> C:
    """Read YAML `path` (optional) over `base` (sections taken elsewhere, e.g. a run's own config),
    apply `key=value` overrides (values parsed as YAML), validate."""
    import copy

    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for section, values in loaded.items():  # a file's section replaces the base's field by field
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, secrets redacted."""
    Path(path).write_text(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))


# ----------------------------------------------------------------------------- secrets
REDACTED = "<redacted>"  # what a secret's value becomes in every file a run writes
_SECRET_NAMES = {"headers", "authorization", "auth", "api_key", "apikey", "token", "access_token", "secret",
                 "password", "passwd", "cookie", "cookies", "credentials"}
_SECRET_SUFFIXES = ("_key", "_token", "_secret", "_password", "_apikey")
# "${env:NAME}", optionally after an auth scheme ("Bearer ${env:NAME}"): a reference, not a secret.
# The same syntax as rewards.registry.ENV_REF (not imported: config loading stays light).
_ENV_ONLY = re.compile(r"\s*(?:[A-Za-z]+\s+)?\$\{env:[A-Za-z_][A-Za-z0-9_]*\}\s*")


def is_secret_key(key: Any) -> bool:
    """Whether a config key names a secret (case-insensitive; '-' counts as '_', as in 'X-API-Key')."""
    k = str(key).lower().replace("-", "_")
    return k in _SECRET_NAMES or k.endswith(_SECRET_SUFFIXES)


def redact(config: Any) -> Any:
    """A copy of a config dict whose secret-looking keys (`is_secret_key`) hold `REDACTED` at every
    leaf; other values, None and `${env:NAME}` references are kept. The input is not changed."""

    def hide(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [hide(v) for v in value]
        if value is None or (isinstance(value, str) and _ENV_ONLY.fullmatch(value)):
            return value
        return REDACTED

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: hide(v) if is_secret_key(k) else walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    return walk(config)
