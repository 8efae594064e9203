"""GGUF export: what transformers reads back from the file computes what the exported model did.

The tiny model covers every outtype, the tensor layout, the Modelfile and a LoRA adapter; the
embedded default (SmolLM2-135M: 30 layers, tied embeddings, its own tokenizer) covers a real model.
transformers dequantises the file and undoes llama.cpp's Q/K row permutation, so equal logits
also show that the permutation is the one llama.cpp uses.
"""
import copy

import gguf
import numpy as np
import pytest
import torch

from align.gguf_export import GGUFExportError, check_gguf, export_gguf, load_gguf, modelfile
from align.tiny import save_tiny_model, tiny_model

PROMPTS = ["What is 12 + 7?", "Tom has 5 apples and buys 3 more."]
# q8_0 stores each 32-value block as int8 times one f16 scale (max/127): a weight moves by at most
# 1/254 of its block's largest value. Through 2 layers of a random model that moved logits by
# ~1% of the largest logit, and by ~3.5% through SmolLM2's 30 layers; the bound below leaves ~1.5x
# room. The tight check is against the same model with its weights rounded to q8_0 in torch.
Q8_REL_BOUND = {"tiny": 0.02, "smollm2": 0.05}
# bf16 keeps 8 significant bits (a weight moves by at most 1/512 of itself): measured 0.27 % of the
# largest logit on the tiny model
BF16_REL_BOUND = 0.01


def _ids(tok, prompt):
    """The chat-rendered prompt as a (1, T) id tensor."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def _logits(model, ids):
    """(T, V) float32 logits."""
    return model.eval()(ids).logits[0].float()


def _rounded(model, outtype):
    """A copy of `model` whose weights went through the same storage rounding as the export."""
    model = copy.deepcopy(model)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim != 2:
                continue  # 1-D tensors are stored in f32
            w = p.numpy()
            if outtype == "q8_0" and w.shape[-1] % 32 == 0:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8).reshape(w.shape)))
            elif outtype == "bf16":
                p.copy_(p.bfloat16().float())
            else:
                p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """The tiny model and tokenizer, exported once in each outtype."""
    model, tok = tiny_model(seed=0)
    out = tmp_path_factory.mktemp("gguf")
    paths = {t: export_gguf(model, out / t, t, tokenizer=tok, name="tiny") for t in ("f32", "f16", "bf16", "q8_0")}
    return model, tok, paths


def test_f32_export_reproduces_logits_exactly(tiny_exports):
    model, tok, paths = tiny_exports
    got, _ = load_gguf(paths["f32"])
    for p in PROMPTS:
        ids = _ids(tok, p)
        torch.testing.assert_close(_logits(got, ids), _logits(model, ids), rtol=0, atol=1e-5)


def _near_ties_only(r):
    """Greedy outputs part only where the reference's two candidates lie within the logit error."""
    return all(0 <= m < r["max_abs_logit_diff"] for m in r["divergence_margins"])


@pytest.mark.parametrize("outtype,bound", [("f16", 1e-2), ("bf16", BF16_REL_BOUND), ("q8_0", Q8_REL_BOUND["tiny"])])
def test_tiny_round_trip_matches(tiny_exports, outtype, bound):
    model, tok, paths = tiny_exports
    r = check_gguf(paths[outtype], model, tok, PROMPTS, max_new_tokens=16)
    assert r["tokenizer_ids_equal"] == r["decode_equal"] == r["tokenizer_strings"] == 4 + 2 * len(PROMPTS)
    assert r["chat_template_equal"]
    assert 0 < r["max_rel_logit_diff"] < bound
    # the random tiny model's top-2 logits come as close as 0.002 (0.5% of the largest logit),
    # within q8_0's rounding: greedy may flip there, nowhere else
    assert _near_ties_only(r)
    if outtype == "f16":
        assert r["greedy_equal"] == len(PROMPTS)
    # all of the difference is storage rounding: the same rounding in torch gives the same model
    r = check_gguf(paths[outtype], _rounded(model, outtype), tok, PROMPTS, max_new_tokens=16)
    assert r["greedy_equal"] == len(PROMPTS)
    assert r["max_rel_logit_diff"] < 1e-5


def test_tiny_tensor_layout_and_metadata(tiny_exports):
    model, tok, paths = tiny_exports
    r = gguf.GGUFReader(paths["q8_0"])
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert "output.weight" in types  # the tiny model does not tie its embeddings
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.add_bos_token") is False and field("tokenizer.ggml.add_space_prefix") is False
    assert field("tokenizer.ggml.tokens")[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert field("tokenizer.chat_template") == tok.chat_template
    assert field("llama.attention.head_count_kv") == model.config.num_key_value_heads
    # Q rows are permuted per head (HF halves -> GGML pairs); f32 keeps the values bit-exact
    f32 = {t.name: t for t in gguf.GGUFReader(paths["f32"]).tensors}
    q_hf = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    q_gguf = np.asarray(f32["blk.0.attn_q.weight"].data).reshape(q_hf.shape)
    head = q_hf.shape[0] // model.config.num_attention_heads
    assert not np.array_equal(q_gguf, q_hf)
    np.testing.assert_array_equal(q_gguf[:head:2], q_hf[:head // 2])  # even rows: first half of head 0
    np.testing.assert_array_equal(q_gguf[1:head:2], q_hf[head // 2:head])
    # bf16: 2-D weights in GGML's BF16, rounded to nearest even as torch rounds them; norms in f32
    b16 = {t.name: t for t in gguf.GGUFReader(paths["bf16"]).tensors}
    assert b16["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    emb = b16["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.BF16
    want = model.model.embed_tokens.weight.detach().bfloat16().view(torch.int16).numpy()
    np.testing.assert_array_equal(np.asarray(emb.data).view(np.int16).reshape(want.shape), want)


def test_q8_0_falls_back_to_f16_for_rows_not_of_32(tmp_path):
    model, tok = tiny_model(seed=1, hidden_size=96, intermediate_size=80, num_attention_heads=2, head_dim=48)
    path = export_gguf(model, tmp_path, "q8_0", tokenizer=tok, name="odd")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 80
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 96
    got, _ = load_gguf(path)
    ids = _ids(tok, PROMPTS[0])
    torch.testing.assert_close(_logits(got, ids), _logits(_rounded(model, "q8_0"), ids), rtol=1e-4, atol=1e-4)


def test_modelfile_template_renders_like_the_chat_template(tiny_exports):
    _, tok, paths = tiny_exports
    text = (paths["q8_0"].parent / "Modelfile").read_text()
    assert "FROM ./tiny.q8_0.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    assert _render_ollama(text, messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True)


def _render_ollama(text, messages):
    """Expand the Modelfile's `range .Messages` TEMPLATE as Ollama would (SYSTEM as a first turn)."""
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    head, rest = template.split("{{- range .Messages }}", 1)
    body, tail = rest.split("{{ end }}", 1)
    if 'SYSTEM """' in text and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": text.split('SYSTEM """', 1)[1].split('"""', 1)[0]}] + messages
    turns = [body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages]
    return head + "".join(turns) + tail


def test_modelfile_does_not_guess_a_non_chatml_template():
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}")
    text = modelfile("m.f16.gguf", llama3, "<|eot_id|>")
    assert "\nTEMPLATE" not in text and "not ChatML" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text


def test_other_architectures_are_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tok = tiny_model()
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(GGUFExportError, match="Qwen2ForCausalLM"):
        export_gguf(model, tmp_path, tokenizer=tok)


def test_lora_adapter_directory_exports_merged_weights(tmp_path):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = save_tiny_model(tmp_path / "base")
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False))  # random B: the adapter changes the outputs
    adapter = tmp_path / "run" / "final"
    model.save_pretrained(adapter)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.save_pretrained(adapter)
    path = export_gguf(adapter, tmp_path / "out", "f32")
    assert path.name == "run-final.f32.gguf"
    got, _ = load_gguf(path)
    ids = _ids(tok, PROMPTS[0])
    expected = _logits(model, ids)
    with model.disable_adapter():
        base = _logits(model, ids)
    assert (expected - base).abs().max() > 0.1
    torch.testing.assert_close(_logits(got, ids), expected, rtol=1e-4, atol=1e-4)


def test_default_model_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models import resolve_model

    src = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    path = export_gguf(src, tmp_path, "q8_0")
    assert path.name == "smollm2-135m-instruct.q8_0.gguf"
    prompts = ["What is the capital of France?", "Name a color."]
    r = check_gguf(path, model, tok, prompts, max_new_tokens=12)
    assert r["tokenizer_ids_equal"] == r["decode_equal"] == r["tokenizer_strings"] and r["chat_template_equal"]
    # "Name a color." parts at token 12 where the reference's top two are 0.0008 apart
    assert r["greedy_equal"] >= 1 and _near_ties_only(r)
    assert 0 < r["max_rel_logit_diff"] < Q8_REL_BOUND["smollm2"]
    text = (tmp_path / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    messages = [{"role": "user", "content": "Hi"}]
    assert _render_ollama(text, messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True)
    types = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    # f16: exactly the same greedy outputs (its rounding is far below these prompts' top-two gaps)
    r16 = check_gguf(export_gguf(src, tmp_path / "f16", "f16"), model, tok, prompts[:1], max_new_tokens=12)
    assert r16["greedy_equal"] == 1 and r16["tokenizer_ids_equal"] == r16["tokenizer_strings"]
    assert r16["max_rel_logit_diff"] < r["max_rel_logit_diff"]
