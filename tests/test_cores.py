"""Core lending (align/cores.py): the loan plan, the file between driver and workers, a learner
whose update runs on the engine's lent core, and a llama.cpp engine resizing its thread pool
between decode steps when the loan changes."""
from __future__ import annotations

import pytest
import torch

import algorithms
from align.config import ModelConfig, PeftConfig
from align.cores import CoreLoan, ThreadBudget, plan_loan
from align.experience import build_experience
from align.learners import PolicyLearner
from align.tiny import save_tiny_model
from align.workers import RolloutWorker
from rollout import SamplingParams


def test_plan_lends_only_what_the_machine_has():
    assert plan_loan(1, 1, 2) == (1, 1)
    assert plan_loan(1, 3, 4) == (3, 1)
    assert plan_loan(2, 2, 3) == (1, 1)  # never more threads than cores
    assert plan_loan(2, 2, 2) is None  # both already on every core
    assert plan_loan(0, 1, 2) is None  # 0 = all cores: nothing to lend


def test_loan_file_drives_a_budget(tmp_path):
    applied = []
    loan = CoreLoan(1, 2, directory=str(tmp_path))
    engine = ThreadBudget(1, str(loan.path), "engine", applied.append)
    learner = ThreadBudget(1, str(loan.path), "learner", applied.append)
    assert engine.refresh() == 2 and learner.refresh() == 1  # at first the learner waits
    loan.learner_works(engines_idle=False)
    assert engine.refresh() == 1 and learner.refresh() == 1
    loan.learner_works(engines_idle=True)
    assert learner.refresh() == 3 and applied == [2, 1, 3]
    assert learner.reset() == 3 and applied[-1] == 1  # peak reported, own threads restored
    loan.close()
    assert learner.refresh() == 1 and not loan.path.exists()  # a missing file lends nothing
    with pytest.raises(ValueError, match="role"):
        ThreadBudget(1, None, "critic", applied.append)


def test_learner_update_uses_the_lent_core_then_gives_it_back(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    loan = CoreLoan(1, 1, directory=str(tmp_path))
    before = torch.get_num_threads()
    try:
        learner = PolicyLearner(ModelConfig(name=str(model_dir)), PeftConfig(method="lora", r=8), lr=1e-2,
                                total_steps=2, micro_batch_size=4, num_threads=1, loan_path=str(loan.path))
        engine = RolloutWorker("hf", str(model_dir), num_threads=1)
        samples, _, _ = engine.generate(["What is 2 + 3?", "Tom has 5 apples"], SamplingParams(n=4, max_new_tokens=6, seed=1))
        for i, s in enumerate(samples):
            s.reward = float(i % 3)
        exp = build_experience(samples, 0)
        algo = algorithms.get("grpo")
        exp.advantages = algo.advantages(**exp.tensors())
        loan.learner_works(engines_idle=False)
        assert learner.update(exp, algo)["threads/update_peak"] == 1
        loan.learner_works(engines_idle=True)
        assert learner.update(exp, algo)["threads/update_peak"] == 2
        assert torch.get_num_threads() == 1  # back to its own core for whatever runs next
    finally:
        loan.close()
        torch.set_num_threads(before)


def test_llamacpp_engine_follows_the_loan_between_decode_steps(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the test install (make test)")
    model_dir = save_tiny_model(tmp_path / "tiny")
    loan = CoreLoan(1, 1, directory=str(tmp_path))  # the learner waits: the engine may use 2 threads
    before = torch.get_num_threads()
    try:
        worker = RolloutWorker("llamacpp", str(model_dir), num_threads=1, loan_path=str(loan.path))
        eng, seen = worker.engine, []
        refresh = eng.before_decode

        def watch():  # what llama.cpp's context runs with at each step; the learner starts at step 3
            refresh()
            seen.append(eng.ll.llama_n_threads(eng._ctx))
            if len(seen) == 3:
                loan.learner_works(engines_idle=False)

        eng.before_decode = watch
        worker.generate(["What is 2 + 3?"], SamplingParams(n=4, max_new_tokens=10, temperature=1.0, seed=0))
        assert seen[:3] == [2, 2, 2] and set(seen[3:]) == {1}
        assert eng.threads == 1 and torch.get_num_threads() == 1  # reset after the generation
        eng.close()
    finally:
        loan.close()
        torch.set_num_threads(before)


def test_blocks_reread_the_loan_in_forward_and_backward():
    """A micro-batch takes seconds: the learner checks the loan at every transformer block, both ways."""
    from align.cores import watch_layers
    from align.tiny import tiny_model

    model, tok = tiny_model(0)
    calls = []
    handles = watch_layers(model, lambda: calls.append(1))
    n = len(model.model.layers)
    ids = torch.tensor([tok("What is 2 + 3?")["input_ids"]])
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == n  # no gradient: forward only
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == n + 2 * n
    for h in handles:
        h.remove()
