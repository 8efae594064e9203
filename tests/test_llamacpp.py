"""The llama.cpp rollout engine (llama-cpp-python) on tiny Llama models: its log-probs against a
teacher-forced torch forward (base, LoRA hot-swapped in, full weights reloaded, after a real learner
update), its sampling contract (groups, finish reasons, seeds, stop strings, top-k) and the
weights it writes (adapters merged into the model file in place, or as adapter files with q/k rows
in GGML's rope order)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the test install (make test)")

from align.experience import build_experience  # noqa: E402
from align.logprobs import token_logprobs  # noqa: E402
from align.tiny import save_tiny_model, tiny_model  # noqa: E402
from align.workers import RolloutWorker  # noqa: E402
from rollout import SamplingParams, make_engine, resolve_backend  # noqa: E402
from rollout.llamacpp import LlamaCppEngine  # noqa: E402
from test_rl import _learner_after_one_update  # noqa: E402
from test_rollout import (PROMPTS, check_groups_and_finish, check_stop_strings, eos_prone,  # noqa: E402
                          max_logprob_error, peft_lora, perturbed_state_dict)

# float32 GGUF weights, llama.cpp's kernels against torch's: measured 2e-5 on the base model and
# 3e-4 under adapters of random N(0, 0.3^2) matrices (logits several times larger); a weight update
# moves log-probs by ~1 (test_hf_update_weights), so these bounds still tell a stale engine apart
BASE_TOL, ADAPTED_TOL = 1e-4, 2e-3
# after a learner update, LoRA merged into the file's float32 weights (W0 + s B A rounded once,
# where peft computes W0 x + s B (A x)): measured 2e-4
SYNC_TOL = 1e-3
# bf16 GGUF weights (rollout.dtype=bfloat16, "auto" on CPUs with bf16 units): llama.cpp rounds the
# activations to bf16 too in its products: measured 1.0e-3 (base) and 1.1e-3 (LoRA merged) on the tiny model
BF16_TOL = 1e-2


@pytest.fixture
def engine_and_model():
    """A llama.cpp engine on an EOS-prone tiny model (both finish reasons occur), and the model."""
    model, tok = tiny_model(0)
    eos_prone(model, tok)
    engine = LlamaCppEngine(model, tok, num_threads=1)
    yield engine, model, tok
    engine.close()


def test_samples_match_teacher_forced_logprobs(engine_and_model):
    engine, model, tok = engine_and_model
    cols = [{"answer": 1}, {"answer": 2}]
    sp = SamplingParams(n=4, temperature=0.7, max_new_tokens=12, seed=0)
    samples = check_groups_and_finish(engine, tok, sp, cols)
    assert max_logprob_error(model, samples, 0.7) < BASE_TOL
    # a group's 4 samples share one prefill of their prompt, yet they differ (independent sampling)
    assert len({tuple(s.completion_ids) for s in samples[:4]}) > 1
    again = engine.generate(PROMPTS, sp, group_offset=3, columns=cols)
    assert [s.completion_ids for s in again] == [s.completion_ids for s in samples]
    greedy = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0, max_new_tokens=12))
    assert max_logprob_error(model, greedy, 1.0) < BASE_TOL
    with torch.no_grad():  # greedy = argmax of torch's own logits at every step
        for s in greedy[::2]:
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1]
            assert logits.argmax(-1).tolist() == s.completion_ids[:len(logits)]


def test_top_k_truncates_sampling_but_not_logprobs(engine_and_model):
    engine, model, tok = engine_and_model
    samples = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, top_k=2, max_new_tokens=10, seed=1))
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s.prompt_ids + s.completion_ids])
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1:-1]
            top2 = logits.topk(2, -1).indices
            assert all(t in top2[k].tolist() for k, t in enumerate(s.completion_ids))
    assert max_logprob_error(model, samples, 1.0) < BASE_TOL  # full-vocabulary log-softmax, not the top-2's


def test_stop_strings(engine_and_model):
    engine, _, tok = engine_and_model
    check_stop_strings(engine, tok)


@pytest.mark.parametrize("lora", ["merge", "adapter"])
def test_lora_updates_and_full_weights(lora):
    """LoRA merged into the model file in place, or served as a llama.cpp adapter file; full
    weights rewritten in place; each reload serves exactly what was pushed."""
    model, tok = tiny_model(0)
    eos_prone(model, tok)
    engine = LlamaCppEngine(model, tok, num_threads=1, lora=lora)
    sp = SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=0)
    base = engine.generate(PROMPTS, sp)
    peft1, lora1, cfg1 = peft_lora(eos_prone(tiny_model(0)[0], tok), seed=1)
    engine.update_lora(lora1, cfg1)
    assert max_logprob_error(peft1, engine.generate(PROMPTS, sp), 0.9) < ADAPTED_TOL
    assert max_logprob_error(model, engine.generate(PROMPTS, sp), 0.9) > 0.1  # the adapter is served
    # a second adapter replaces the first: rsLoRA and a per-module alpha (scales folded into B)
    peft2, lora2, cfg2 = peft_lora(eos_prone(tiny_model(0)[0], tok), seed=2, r=4, use_rslora=True,
                                   alpha_pattern={"down_proj": 2})
    engine.update_lora(lora2, cfg2)
    assert max_logprob_error(peft2, engine.generate(PROMPTS, sp), 0.9) < ADAPTED_TOL
    engine.update_lora({}, {})  # no adapter: the base model's samples again, token for token
    assert [s.completion_ids for s in engine.generate(PROMPTS, sp)] == [s.completion_ids for s in base]
    # full weights: the model file is rewritten and reloaded; the caller's model is never touched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = perturbed_state_dict(model, seed=5)
    engine.update_weights(new)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    moved = eos_prone(tiny_model(0)[0], tok)
    moved.load_state_dict(new)
    assert max_logprob_error(moved, engine.generate(PROMPTS, sp), 0.9) < ADAPTED_TOL
    with pytest.raises(KeyError, match="not parameters"):
        engine.update_weights({"nope.weight": torch.zeros(1)})
    engine.update_lora(lora1, cfg1)  # an adapter on top of the new weights
    on_new = peft_lora(moved, seed=1)[0]
    assert max_logprob_error(on_new, engine.generate(PROMPTS, sp), 0.9) < ADAPTED_TOL
    engine.close()


def test_bf16_weights_serve_the_model_within_bf16_rounding():
    """rollout.dtype=bfloat16 serves bf16 GGUF weights: log-probs are the model's within bf16's
    rounding (and not bit-equal: the rounding is really there), and LoRA merges into the bf16 file."""
    from align.device import engine_dtype
    from rollout import gguf_type

    # "auto" never takes bf16 on a CPU: policy updates merged into bf16 weights are mostly lost
    assert gguf_type("auto") == "f32" and engine_dtype("auto", "cpu") == "float32"
    assert engine_dtype("bfloat16", "cpu") == "bfloat16"
    assert (gguf_type("float32"), gguf_type("float16"), gguf_type("bfloat16")) == ("f32", "f16", "bf16")
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        gguf_type("int8")
    model, tok = tiny_model(0)
    eos_prone(model, tok)
    engine = make_engine("llamacpp", model=model, tokenizer=tok, dtype="bfloat16", num_threads=1)
    assert engine.outtype == "bf16" and engine.path.name.endswith(".bf16.gguf")
    sp = SamplingParams(n=2, temperature=0.9, max_new_tokens=10, seed=0)
    err = max_logprob_error(model, engine.generate(PROMPTS, sp), 0.9)
    assert BASE_TOL < err < BF16_TOL, err
    peft1, lora1, cfg1 = peft_lora(eos_prone(tiny_model(0)[0], tok), seed=1)
    engine.update_lora(lora1, cfg1)
    assert max_logprob_error(peft1, engine.generate(PROMPTS, sp), 0.9) < BF16_TOL
    assert max_logprob_error(model, engine.generate(PROMPTS, sp), 0.9) > 3 * BF16_TOL  # the adapter is served
    engine.close()


def test_engine_equals_learner_after_sync(tmp_path):
    """The issue's check: after a real GRPO update and a sync through the rollout worker, the
    engine's log-probs of its own samples are the learner's (LoRA adapter file, hot-swapped)."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    learner = _learner_after_one_update(model_dir)
    worker = RolloutWorker("llamacpp", str(model_dir), num_threads=1)
    assert worker.backend == "LlamaCppEngine"
    worker.update(learner.sync_payload())
    samples, _, _ = worker.generate(["What is 12 + 7?", "The quick brown fox"],
                                    SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=1))
    exp = build_experience(samples, 0)
    with torch.no_grad():
        lp, _ = token_logprobs(learner.model.eval(), exp.input_ids, exp.attention_mask, exp.prompt_len)
    for i, s in enumerate(samples):
        want = lp[i, exp.prompt_len:exp.prompt_len + len(s.completion_ids)]
        assert torch.allclose(torch.tensor(s.logprobs), want, atol=SYNC_TOL), (torch.tensor(s.logprobs) - want).abs().max()
    # and they are not the base model's: the update moved them by far more than the tolerance
    with torch.no_grad(), learner.model.disable_adapter():
        base, _ = token_logprobs(learner.model, exp.input_ids, exp.attention_mask, exp.prompt_len)
    assert (base - lp)[exp.action_mask.bool()].abs().max() > 10 * SYNC_TOL
    worker.engine.close()


def test_backend_choice(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    assert resolve_backend("llamacpp", str(model_dir)) == "llamacpp"
    assert resolve_backend("auto", str(model_dir)) == "llamacpp"  # the fastest installed on a CPU
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    assert resolve_backend("auto", str(tmp_path / "gpt2")) != "llamacpp"
    with pytest.raises(ValueError, match="Llama-architecture"):
        resolve_backend("llamacpp", str(tmp_path / "gpt2"))
    engine = make_engine("llamacpp", model=str(model_dir), num_threads=1)
    assert isinstance(engine, LlamaCppEngine) and engine.threads == 1
    assert math.isfinite(engine.generate(["hi"], SamplingParams(max_new_tokens=3, seed=0))[0].logprobs[0])
    engine.close()
    assert not engine.workdir.exists()  # its GGUF files are removed with it


def test_a_killed_engines_files_are_removed_by_the_next_engine_and_a_live_ones_kept(tmp_path):
    """Engine directories hold a GGUF copy of the model (in RAM under /dev/shm): one left by a
    process killed without closing is removed when the next engine claims its own; a live one's stays."""
    import subprocess
    import sys

    from rollout.llamacpp import claim_workdir

    code = ("import sys, time; from rollout.llamacpp import claim_workdir; "
            f"p, _ = claim_workdir({str(tmp_path)!r}); (p / 'base.gguf').write_bytes(b'x' * 1000); "
            "print(p, flush=True); time.sleep(120)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
             for _ in range(2)]
    try:
        killed, alive = (Path(p.stdout.readline().strip()) for p in procs)
        procs[0].kill()
        procs[0].wait()
        assert (killed / "base.gguf").exists()  # SIGKILL: no close(), no __del__
        mine, fd = claim_workdir(str(tmp_path))
        assert not killed.exists() and (alive / "base.gguf").exists() and mine.exists()
        os.close(fd)
    finally:
        for p in procs:
            p.kill()
