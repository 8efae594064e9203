"""Checkpoints that resume exactly and are written atomically.

`checkpoints/step-N/` holds the trainable weights (safetensors), optimizer and scheduler state,
RNG states and the data position, plus a fingerprint of the config fields that shape training.
It is written into a temporary directory and renamed into place only when complete, and a
`COMPLETE` marker is the last file written, so a crash mid-write never leaves a directory that
looks like a checkpoint; `latest()` skips any that lack the marker.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from align.config import redact

MARKER = "COMPLETE"
# Sections / fields that do not change what training computes, so a resume may change them.
_NOT_FINGERPRINTED = {"log", "train.resume", "train.output_dir", "train.eval_every", "train.save_every",
                      "train.keep_checkpoints", "train.num_threads", "train.log_samples", "generate_eval", "train.save_merged", "train.max_steps",
                      "rollout.num_threads", "rollout.backend", "train.device", "resources"}


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed with the current config."""


def fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config fields that shape training, flattened to dotted keys, secrets redacted (a rotated
    API key neither reaches fingerprint.json nor blocks a resume)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif prefix not in _NOT_FINGERPRINTED and prefix.split(".")[0] not in _NOT_FINGERPRINTED:
            flat[prefix] = node

    walk(redact(cfg), "")
    return flat


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as plain lists, so that torch.load(weights_only=True) can read it back.
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], extra: dict[str, Any],
         config: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step-N` atomically; keep only the newest `keep` complete ones."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    torch.save(extra, tmp / "state.pt")
    (tmp / "fingerprint.json").write_text(json.dumps(fingerprint(config), sort_keys=True, default=str))
    digest = hashlib.sha256((tmp / "weights.safetensors").read_bytes()).hexdigest()
    (tmp / MARKER).write_text(json.dumps({"step": step, "weights_sha256": digest}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in complete(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step(p: Path) -> int:
    return int(p.name.split("-", 1)[1])


def complete(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (marker present and weights intact), oldest first."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.glob("step-*"):
        marker = p / MARKER
        if not (marker.is_file() and (p / "weights.safetensors").is_file() and (p / "state.pt").is_file()):
            continue
        try:
            digest = json.loads(marker.read_text())["weights_sha256"]
        except (ValueError, KeyError):
            continue
        if hashlib.sha256((p / "weights.safetensors").read_bytes()).hexdigest() == digest:
            out.append(p)
    return sorted(out, key=_step)


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete(ckpt_root)
    return found[-1] if found else None


def load(path: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, extra state) of checkpoint `path`, after checking it matches `config`."""
    saved = json.loads((path / "fingerprint.json").read_text())
    now = json.loads(json.dumps(fingerprint(config), sort_keys=True, default=str))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diff[:8])
        raise ResumeError(f"cannot resume from {path}: it was written with a different config ({details}). "
                          "Use the same config, or a new train.output_dir")
    # weights_only=True: no pickled code runs; the state holds only tensors and plain containers.
    extra = torch.load(path / "state.pt", weights_only=True)
    return load_file(str(path / "weights.safetensors")), extra
