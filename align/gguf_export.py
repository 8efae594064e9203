"""GGUF export: a trained Llama-architecture model as one file that llama.cpp and Ollama run.

The counterpart of Unsloth's `save_pretrained_gguf`, written on the `gguf` package (llama.cpp's
own writer, tensor-name map and Q8_0 quantiser) instead of shelling out to llama.cpp's
convert_hf_to_gguf.py. What llama.cpp's "llama" loader expects, and so what we write:

- Q and K projection rows permuted per head: HF keeps the two rotary halves of a head apart,
  GGML's rope rotates adjacent pairs (the inverse of transformers' convert_llama_weights_to_hf);
- norms and other 1-D tensors in f32; q8_0 only for 2-D weights whose rows split into whole
  32-value blocks (others fall back to f16), as llama.cpp's converter does;
- a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2": tokens, token types, merges) with the
  name of the pre-tokenizer regex that reproduces the HF tokenizer's splitting;
- no output.weight when the embeddings are tied: llama.cpp then reuses token_embd.

Not supported (clear errors): other architectures, sentencepiece (Llama-2 style) tokenizers, rope
scaling other than linear. `check_gguf` loads the file back with transformers (which dequantises
and undoes the permutation) and compares tokenizer ids, greedy outputs and logits.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")
# HF pre-tokenizer -> llama.cpp pre-tokenizer name with the same regex (llama-vocab.cpp).
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                 "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
# The shape of each ChatML turn; `(?:\n|\\n)` accepts a newline written literally or as '\n'.
_CHATML_TURN = re.compile(r"<\|im_start\|>'\s*\+\s*message\['role'\]\s*\+\s*'(?:\n|\\n)'\s*\+\s*"
                          r"message\['content'\]\s*\+\s*'<\|im_end\|>")
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'{}]*?)<\|im_end\|>")


class GGUFExportError(ValueError):
    """The model or tokenizer is of a kind this exporter does not write."""


def export_gguf(src, out_dir, outtype: str = "f16", tokenizer=None, name: str | None = None) -> Path:
    """Write `<out_dir>/<name>.<outtype>.gguf` and an Ollama `Modelfile` beside it; returns the GGUF path.

    `src`: a Hugging Face model directory, a peft adapter directory (merged first), or a model
    in memory (then `tokenizer` is required)."""
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    model, tokenizer, default_name = load_source(src, tokenizer)
    config = model.config
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    if arch != "LlamaForCausalLM":
        raise GGUFExportError(f"GGUF export supports LlamaForCausalLM only, not {arch}")
    name = name or default_name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.{outtype}.gguf"
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    _write_hparams(writer, config, outtype)
    n_vocab = config.vocab_size
    chat_template = _write_vocab(writer, tokenizer, n_vocab)
    for gname, data, qtype in _tensors(model, outtype):
        writer.add_tensor(gname, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)  # a crash never leaves a truncated file under the final name
    (out_dir / "Modelfile").write_text(modelfile(path.name, chat_template, tokenizer.eos_token))
    return path


def load_source(src, tokenizer=None):
    """(plain model, tokenizer, default file name) for a model or adapter directory, or a model in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.tuning import merged_model

    if isinstance(src, torch.nn.Module):
        if tokenizer is None:
            raise GGUFExportError("exporting an in-memory model needs its tokenizer")
        return merged_model(src), tokenizer, "model"
    path = Path(src)
    if not path.is_dir():
        from align.models import resolve_model  # the embedded alias, e.g. smollm2-135m-instruct

        path = Path(resolve_model(str(src)))
    if (path / "adapter_config.json").is_file():
        import peft

        model = merged_model(peft.AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        # a run's adapter sits in RUN/final: name the file after the run, not "final"
        default_name = f"{path.parent.name}-{path.name}" if path.name == "final" else path.name
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        default_name = path.name
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer, default_name


def _write_hparams(w, config, outtype: str) -> None:
    """The llama.* keys llama.cpp reads: sizes, head counts, context, rope, norm epsilon."""
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise GGUFExportError(f"rope scaling {rope_type!r} is not supported by this exporter (default, linear)")
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(model, outtype: str):
    """(GGUF name, array, raw GGML type or None) for every weight, in llama.cpp's layout."""
    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise GGUFExportError(f"no GGUF name for tensor {hf_name} of a Llama model")
        data = t.detach().float().cpu()
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute_rope(data, n_head)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute_rope(data, n_kv)
        yield (gname, *_encode(data.numpy(), outtype))


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head reordered from HF's [first halves | second halves] to GGML's pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(data: np.ndarray, outtype: str):
    """(array, raw type): 1-D tensors stay f32; q8_0 needs rows of whole 32-value blocks."""
    if data.ndim < 2 or outtype == "f32":
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q8), q8
    if outtype == "bf16":  # torch rounds to nearest even, as ggml does, and far faster than gguf's numpy
        bits = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
        return bits.numpy().view(np.uint8), gguf.GGMLQuantizationType.BF16
    return data.astype(np.float16), None


def _write_vocab(w, tokenizer, n_vocab: int) -> str | None:
    """Tokens, types, merges, special ids, add-BOS flag and chat template; returns the template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise GGUFExportError(f"only byte-level BPE tokenizers are supported, not {spec['model']['type']}")
    norm = spec.get("normalizer")
    if norm and norm.get("normalizers", [norm]):
        raise GGUFExportError(f"tokenizer normalizer {norm['type']} has no llama.cpp equivalent")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    w.add_add_space_prefix(False)  # unstated, transformers' reader strips the first space when decoding
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in vocab:  # the embedding matrix is padded past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(vocab[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        # SpecialVocab reads merges, special-token ids and the chat template from saved files
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    if "bos" not in special.special_token_ids and tokenizer.eos_token_id is not None:
        # No BOS (GPT-2 style): llama.cpp would make up token 11 and transformers' GGUF reader
        # crashes; EOS stands in, as in GPT-2, and add_bos_token=false keeps it out of prompts.
        special.special_token_ids["bos"] = tokenizer.eos_token_id
    # what the tokenizer does decides, not what its config claims (SmolLM2 states no flag)
    probe = "Hello"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special.add_special_token["bos"] = len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(w, quiet=True)
    return special.chat_template if isinstance(special.chat_template, str) else None


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for the regex that splits text as this HF pre-tokenizer does."""
    parts = (pre.get("pretokenizers", [pre]) if pre else [])
    kinds = [p["type"] for p in parts]
    if any(p.get("add_prefix_space") for p in parts):
        raise GGUFExportError("a byte-level pre-tokenizer with add_prefix_space has no llama.cpp equivalent")
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # \p{N} split first, then the GPT-2 regex (SmolLM / SmolLM2 hub tokenizers)
    if kinds == ["Split", "ByteLevel"] and parts[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise GGUFExportError(f"pre-tokenizer {json.dumps(pre)} has no known llama.cpp equivalent "
                          "(supported: GPT-2 byte-level, SmolLM digits + byte-level, Llama-3 split)")


def modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None) -> str:
    """An Ollama Modelfile: FROM the GGUF, a Go TEMPLATE for ChatML chat templates, stop tokens."""
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    if chat_template and _CHATML_TURN.search(chat_template):
        # each turn as the Jinja template renders it, then the generation prompt
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n"""')
        if default := _DEFAULT_SYSTEM.search(chat_template):
            # the Jinja template inserts this system turn itself; Ollama does it through SYSTEM
            lines.append(f'SYSTEM """{default.group(1)}"""')
        lines += [f'PARAMETER stop "{s}"' for s in CHATML_STOPS]
        return "\n".join(lines) + "\n"
    lines.append("# the chat template is not ChatML: no TEMPLATE was translated; write one by hand from "
                 "tokenizer.chat_template in the GGUF" if chat_template else "# the tokenizer has no chat template")
    if eos_token:
        lines.append(f'PARAMETER stop "{eos_token}"')
    return "\n".join(lines) + "\n"


def load_gguf(gguf_path):
    """(model, tokenizer) read back from a GGUF by transformers, special tokens repaired."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # the class AutoTokenizer resolves to, named directly: AutoTokenizer parses the file once more
    # only to find it (8 s of a 49k-token vocabulary)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF tokenizer conversion reads BOS where EOS belongs (see align.models.convert_gguf):
    # the config carries the ids the file states
    for attr in ("bos", "eos", "pad"):
        tid = getattr(model.config, f"{attr}_token_id", None)
        if tid is not None:
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(tid))
    return model, tokenizer


DEFAULT_PROMPTS = ["What is the capital of France?", "What is 12 + 7?", "Write one sentence about the sea."]
_PROBES = [" Hello world!", "  two  spaces, tabs\tand\nnewlines", "12 + 7 = 19; 1234567", "héllo wörld 你好 🙂"]


@torch.no_grad()
def check_gguf(gguf_path, reference_model, tokenizer, prompts: list[str], max_new_tokens: int = 16) -> dict:
    """Round trip: tokenizer ids, greedy continuations and logits of the GGUF against the reference.

    `divergence_margins` holds, for each prompt whose greedy output differs, how far apart the
    reference's logits for its token and the GGUF model's token were at the first difference:
    a quantised model may flip a near-tie, but not a choice the reference made by a wide margin."""
    from align.tuning import merged_model

    model, gguf_tok = load_gguf(gguf_path)
    reference = merged_model(reference_model)
    was_training = reference.training
    reference.eval()  # dropout would make the two models disagree
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    strings = _PROBES + prompts + chats
    ids = [tokenizer(s)["input_ids"] for s in strings]
    ids_equal = sum(i == gguf_tok(s)["input_ids"] for i, s in zip(ids, strings))
    decode_equal = sum(tokenizer.decode(i) == gguf_tok.decode(i) for i in ids)
    margins, max_abs, scale = [], 0.0, 0.0
    for chat in chats:
        ids = torch.tensor([tokenizer(chat, add_special_tokens=False)["input_ids"]])  # (1, T)
        ref_logits, got_logits = reference(ids).logits.float(), model(ids).logits  # (1, T, V)
        max_abs = max(max_abs, (ref_logits - got_logits).abs().max().item())
        scale = max(scale, ref_logits.abs().max().item())
        margin = _greedy_divergence(reference, model, ids, max_new_tokens, tokenizer)
        if margin is not None:
            margins.append(margin)
    reference.train(was_training)
    return {"tokenizer_ids_equal": ids_equal, "decode_equal": decode_equal, "tokenizer_strings": len(strings),
            "chat_template_equal": gguf_tok.chat_template == tokenizer.chat_template,
            "greedy_equal": len(chats) - len(margins), "prompts": len(chats), "divergence_margins": margins,
            "max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_abs / max(scale, 1e-12)}


def _greedy_divergence(reference, model, ids: torch.Tensor, max_new_tokens: int, tokenizer) -> float | None:
    """None when both greedy continuations agree, else the reference's logit margin where they part."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, top_p=None, top_k=None, temperature=None,
              pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
    ref, got = reference.generate(ids, **kw), model.generate(ids, **kw)
    a, b = ref.sequences[0, ids.shape[1]:], got.sequences[0, ids.shape[1]:]  # (new,)
    differ = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    if not differ:  # (one cannot stop early: its EOS would differ from the other's token)
        return None
    step = ref.logits[differ[0]][0].float()  # (V,) the reference's logits where the two part
    return (step[a[differ[0]]] - step[b[differ[0]]]).item()
