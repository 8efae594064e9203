"""Every fine-tuning method behind one field (`peft.method`), on peft wherever peft has it.

full / freeze / bitfit are ours (they only choose which parameters train); lora, qlora, dora,
adalora, ia3, prefix, prompt and ptuning are peft's. BitFit on models without bias terms (Llama,
Mistral, SmolLM2) adds zero-initialised biases to the attention and MLP projections and sets the
config's `attention_bias` / `mlp_bias` flags, so the exported model reloads as a plain
Hugging Face model and starts out computing exactly what the base model computed.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from align.config import ConfigError, ModelConfig, PeftConfig

log = logging.getLogger(__name__)
PEFT_METHODS = {"lora", "qlora", "dora", "adalora", "ia3", "prefix", "prompt", "ptuning"}


LORA_FAMILY = ("lora", "qlora", "dora", "adalora")  # the methods with low-rank A / B matrices


def quantization_config(cfg: PeftConfig, model_cfg: ModelConfig):
    """The bitsandbytes 4-bit config for QLoRA, else None."""
    if cfg.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if model_cfg.dtype == "bfloat16" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute)


def fix_bnb_cpu_backward(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 inference on CPUs.

    After the first eval-mode forward without gradients the repacked `Linear4bit` silently sends
    no gradient through itself (ENVIRONMENT.md: 4 of 14 LoRA modules updated) -- exactly the RL
    pattern of generate, then train. Returns how many layers were fixed.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _targets(cfg: PeftConfig):
    """peft's target_modules argument: the string 'all-linear' or a list of names."""
    return "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)


def _peft_config(cfg: PeftConfig, model: nn.Module, total_steps: int | None, tokenizer_path: str | None,
                 task_type: str = "CAUSAL_LM"):
    """The peft config object for a peft method (SEQ_CLS also trains the new score head)."""
    import peft

    common = dict(task_type=task_type)
    m = cfg.method
    if (task_type != "CAUSAL_LM" or cfg.adapter_layers) and cfg.target_modules == ["all-linear"]:
        # peft's "all-linear" keeps the causal LM head out, not a classifier's: name the body's
        # linear layers so the new head trains in full (modules_to_save) and carries no adapter
        # (and peft takes no layer choice with the "all-linear" string)
        heads = {"score", "classifier", "lm_head"}
        cfg = copy.copy(cfg)
        cfg.target_modules = sorted({n.split(".")[-1] for n, mod in model.named_modules()
                                     if isinstance(mod, nn.Linear) and n.split(".")[-1] not in heads})
    if cfg.adapter_layers:
        if m not in LORA_FAMILY:  # peft has no layer choice for the others
            raise ConfigError(f"peft.adapter_layers applies to lora, qlora, dora and adalora, not peft.method={m} "
                              "(freeze-tuning: peft.freeze_trainable_layers)")
        common.update(_adapter_layers(model, cfg.adapter_layers))
    if m in ("lora", "qlora", "dora"):
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=_targets(cfg), use_rslora=cfg.rslora,
                               use_dora=m == "dora", **common)
    if m == "adalora":
        if not total_steps:
            raise ValueError("peft.method=adalora needs the number of training steps (train.max_steps or data size)")
        if cfg.adalora_target_r >= cfg.r:  # nothing to prune: peft's rank allocator fails with an opaque kthvalue error
            raise ConfigError(f"peft.method=adalora prunes from peft.r={cfg.r} down to peft.adalora_target_r="
                              f"{cfg.adalora_target_r}; the target must be smaller than r")
        tfinal = cfg.adalora_tfinal or max(1, total_steps // 5)
        tinit = min(cfg.adalora_tinit, max(0, total_steps - tfinal - 1))
        return peft.AdaLoraConfig(init_r=cfg.r, target_r=cfg.adalora_target_r, lora_alpha=cfg.alpha,
                                  lora_dropout=cfg.dropout, target_modules=_targets(cfg), tinit=tinit,
                                  tfinal=tfinal, deltaT=cfg.adalora_deltaT, total_step=total_steps, **common)
    if m == "ia3":
        # None lets peft choose its per-architecture defaults (k, v, down_proj for Llama).
        targets = None if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
        ff = None if targets is None else [t for t in targets if "mlp" in t or "down" in t or "fc" in t]
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff, **common)
    if m == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    if m == "prompt":
        kw = {}
        if cfg.prompt_init_text:
            kw = dict(prompt_tuning_init=peft.PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.prompt_init_text,
                      tokenizer_name_or_path=tokenizer_path)
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **kw, **common)
    if m == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=cfg.num_virtual_tokens,
                                        encoder_hidden_size=model.config.hidden_size, **common)
    raise AssertionError(m)


def _adapter_layers(model: nn.Module, n: int) -> dict:
    """peft's layers_to_transform / layers_pattern for the last n decoder layers (negative: first -n)."""
    prefix, layers = _decoder_layers(model)
    if abs(n) > len(layers):
        raise ConfigError(f"peft.adapter_layers={n}, but the model has {len(layers)} decoder layers")
    chosen = range(len(layers) - n, len(layers)) if n > 0 else range(0, -n)
    return dict(layers_to_transform=list(chosen), layers_pattern=prefix.split(".")[-1])


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (the longest ModuleList in the model) and its name."""
    best = max(((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)),
               key=lambda nm: len(nm[1]), default=None)
    if best is None:
        raise ValueError("freeze-tuning could not find the model's list of decoder layers")
    return best


def _apply_freeze(model: nn.Module, cfg: PeftConfig) -> None:
    """Train the last (or first, when negative) N decoder layers' chosen sub-modules and extras."""
    prefix, layers = _decoder_layers(model)
    n = cfg.freeze_trainable_layers
    chosen = range(len(layers) - n, len(layers)) if n >= 0 else range(0, -n)
    for p in model.parameters():
        p.requires_grad_(False)
    for i in chosen:
        for name, p in layers[i].named_parameters():
            if "all" in cfg.freeze_trainable_modules or any(m in name for m in cfg.freeze_trainable_modules):
                p.requires_grad_(True)
    for name, p in model.named_parameters():
        if any(extra in name for extra in cfg.freeze_extra_modules):
            p.requires_grad_(True)


def _apply_bitfit(model: nn.Module, cfg: PeftConfig) -> None:
    """Train bias terms only; add zero-initialised ones where a Llama-style model has none."""
    has_bias = any(n.endswith(".bias") and "norm" not in n for n, _ in model.named_parameters())
    if not has_bias:
        flags = {"attention": "attention_bias", "mlp": "mlp_bias"}
        for part in cfg.bitfit_modules:
            if part not in flags or not hasattr(model.config, flags[part]):
                raise ValueError(f"BitFit cannot add '{part}' biases to {type(model).__name__}; "
                                 f"peft.bitfit_modules accepts {sorted(flags)} on Llama-style models")
            setattr(model.config, flags[part], True)
        key = {"attention": "self_attn", "mlp": "mlp"}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.bias is None and any(
                    f".{key[p]}." in f".{name}." for p in cfg.bitfit_modules):
                w = mod.weight
                mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias"))


def apply_tuning(model: nn.Module, cfg: PeftConfig, total_steps: int | None = None,
                 tokenizer_path: str | None = None, task_type: str = "CAUSAL_LM",
                 new_heads: tuple[str, ...] = ()) -> nn.Module:
    """Make only the parameters of `cfg.method` trainable; returns the (possibly peft-wrapped) model.

    `task_type="SEQ_CLS"` is for reward models and critics; `new_heads` names freshly initialised
    modules (the score head) that train under every method, since a random head cannot stay frozen.
    """
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.method == "freeze":
        _apply_freeze(model, cfg)
    elif cfg.method == "bitfit":
        _apply_bitfit(model, cfg)
    else:
        import peft

        if cfg.method == "qlora":
            fix_bnb_cpu_backward(model)
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)))
        model = peft.get_peft_model(model, _peft_config(cfg, model, total_steps, tokenizer_path, task_type))
    if cfg.method in ("full", "freeze", "bitfit"):
        for name, p in model.named_parameters():
            if any(h in name.split(".") for h in new_heads):
                p.requires_grad_(True)
    trainable, total = count_parameters(model)
    log.info("peft.method=%s: %s trainable of %s parameters (%.3f%%)", cfg.method, f"{trainable:,}",
             f"{total:,}", 100 * trainable / max(total, 1))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def after_backward_hook(model: nn.Module, cfg: PeftConfig) -> Callable[[int], None] | None:
    """A per-step callback the method needs after backward (AdaLoRA's rank allocation), or None."""
    if cfg.method != "adalora":
        return None

    def step(global_step: int) -> None:
        model.base_model.update_and_allocate(global_step)

    return step


def make_optimizer(model: nn.Module, params: list[torch.Tensor], lr: float, weight_decay: float = 0.0,
                   cfg: PeftConfig | None = None) -> torch.optim.Optimizer:
    """AdamW over `params`; with `cfg.loraplus_lr_ratio` > 0, peft's LoRA+ groups (B matrices and
    1-d adapter parameters at ratio x lr), which LoRA+ found to learn faster than one lr for both."""
    ratio = cfg.loraplus_lr_ratio if cfg is not None else 0.0
    if not ratio:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if ratio < 0 or cfg.method not in LORA_FAMILY:
        raise ConfigError(f"peft.loraplus_lr_ratio={ratio}: LoRA+ needs a ratio > 0 and peft.method in "
                          f"{LORA_FAMILY}, got method {cfg.method!r}")
    from peft.optimizers import create_loraplus_optimizer

    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=weight_decay)
    opt.param_groups = [g for g in opt.param_groups if g["params"]]  # peft keeps empty groups (embeddings)
    return opt


def is_peft(model: nn.Module) -> bool:
    """True for a peft-wrapped model."""
    return hasattr(model, "peft_config")


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: all that a checkpoint needs to restore the weights."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_final(model: nn.Module, tokenizer, out: Path, merged: bool = False) -> Path:
    """Write `out` in Hugging Face format: the adapter (peft) or the whole model, plus the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model) and merged:
        export_merged(model, out)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _dequantized_base(model: nn.Module) -> nn.Module:
    """A float copy of a 4-bit peft model's base, weights dequantised exactly as the forward does."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    state = {}
    for name, mod in base.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            clean = name.replace(".base_layer", "")
            state[f"{clean}.weight"] = w.float().cpu()
            if mod.bias is not None:
                state[f"{clean}.bias"] = mod.bias.detach().float().cpu()
    for name, p in base.named_parameters():
        clean = name.replace(".base_layer", "")
        if "lora_" not in name and clean not in state and p.dtype != torch.uint8:
            state[clean] = p.detach().float().cpu()
    config = base.config.__class__.from_dict(base.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to embeddings
    if missing or unexpected:
        raise RuntimeError(f"dequantised export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    return plain


def merged_model(model: nn.Module) -> nn.Module:
    """A plain transformers model computing what the peft model computes (adapter folded in)."""
    import copy

    import peft

    if not is_peft(model):
        return model
    if fix_bnb_cpu_backward(model):  # QLoRA: merge into an exactly dequantised float base
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return peft.PeftModel.from_pretrained(_dequantized_base(model), tmp).merge_and_unload()
    return copy.deepcopy(model).merge_and_unload()


def export_merged(model: nn.Module, out: Path) -> Path:
    """Save the merged plain model to `out` (prefix / prompt / P-tuning cannot merge: clear error)."""
    if is_peft(model) and model.peft_config["default"].is_prompt_learning:
        raise ValueError(f"peft method {model.peft_config['default'].peft_type} learns virtual tokens and "
                         "cannot be merged into the weights; use the saved adapter")
    merged_model(model).save_pretrained(out, safe_serialization=True)
    return out
