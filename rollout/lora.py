"""LoRA adapters as the learner ships them: peft tensor names + LoraConfig dict, parsed once.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) replaces W by W + s * B @ A with
s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732). The HF engine merges that delta into its weights; the vLLM engine
either folds it into its workers' weights or hands the tensors to its workers, which serve them as
an adapter built in memory (no files).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from align.device import to_host

# peft's saved-adapter names: "base_model.model.<module>.lora_A.weight"; the in-memory state dict
# adds the adapter name ("lora_A.default.weight"); both are accepted.
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraDelta:
    """One adapted linear layer: W becomes W + scale * B @ A (transposed if fan_in_fan_out)."""

    module: str  # module name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    A: Tensor  # (r, in_features)
    B: Tensor  # (out_features, r)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    fan_in_fan_out: bool  # GPT-2 Conv1D layers store W as (in, out)

    def delta(self) -> Tensor:
        """scale * B @ A in float32, shaped like the base weight."""
        d = self.scale * (self.B.float() @ self.A.float())  # (out, in)
        return d.T if self.fan_in_fan_out else d


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's `get_pattern_key` rule: a pattern matches a trailing run of dotted name parts."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def parse_lora(lora_tensors: dict[str, Tensor], peft_config: dict[str, Any]) -> list[LoraDelta]:
    """The adapted modules of a peft LoRA adapter, with their scales; unsupported variants raise."""
    peft_type = str(peft_config.get("peft_type", "LORA")).split(".")[-1].upper()
    if peft_type != "LORA":
        raise ValueError(f"update_lora takes a LoRA adapter, got peft_type {peft_type!r}")
    if peft_config.get("use_dora"):
        raise NotImplementedError("DoRA adapters cannot be served by the rollout engines; merge "
                                  "them and push full weights with update_weights")
    pairs: dict[str, dict[str, Tensor]] = {}
    for name, tensor in lora_tensors.items():
        match = _KEY.match(name)
        if match is None:  # lora_embedding_A, lora_magnitude_vector, lora_B.bias, modules_to_save
            raise NotImplementedError(f"unsupported adapter tensor {name!r}: only LoRA on linear "
                                      "layers is served; push other weights with update_weights")
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    alpha = peft_config.get("lora_alpha", 8)
    alpha_pattern = peft_config.get("alpha_pattern") or {}
    deltas = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter module {module!r} lacks lora_A or lora_B")
        r = ab["A"].shape[0]  # the rank is read off the tensor, so rank_pattern needs no lookup
        a = _pattern_value(alpha_pattern, module, alpha)
        scale = a / math.sqrt(r) if peft_config.get("use_rslora") else a / r
        deltas.append(LoraDelta(module, ab["A"], ab["B"], scale,
                                bool(peft_config.get("fan_in_fan_out", False))))
    return deltas


def max_rank(lora_tensors: dict[str, Tensor]) -> int:
    """The largest LoRA rank among the adapter's lora_A tensors (r, in)."""
    return max((t.shape[0] for n, t in lora_tensors.items() if ".lora_A" in n), default=0)


def merged_weight(base: Tensor, delta: LoraDelta) -> Tensor:
    """`base` + the adapter's delta, summed in float32 and cast back to the base dtype."""
    return (base.float() + delta.delta().to(base.device)).to(base.dtype)


def scaled_adapter(deltas: list[LoraDelta]) -> dict[str, Tensor]:
    """The adapter as host tensors in peft's saved names with the scale folded into B
    ("base_model.model.<module>.lora_A.weight" = A, "...lora_B.weight" = scale * B): a server that
    applies B @ A with scaling 1 then computes exactly `delta()`, whatever rsLoRA, alpha_pattern or
    rank_pattern set the per-module scale to."""
    out = {}
    for d in deltas:
        prefix = f"base_model.model.{d.module}"
        out[f"{prefix}.lora_A.weight"] = to_host(d.A).float().contiguous()  # (r, in)
        out[f"{prefix}.lora_B.weight"] = (d.scale * to_host(d.B).float()).contiguous()  # (out, r)
    return out
