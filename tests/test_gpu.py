"""GPU path (marked `gpu`, skipped without CUDA): the vLLM engine with LoRA weight sync, QLoRA
training and data-parallel learners on a real accelerator. Run on a lent GPU machine with
`.venv/bin/pytest -m gpu tests/test_gpu.py`."""
import importlib.util

import pytest
import torch

import algorithms
from align.config import ModelConfig, PeftConfig
from align.experience import build_experience
from align.logprobs import token_logprobs
from align.tiny import save_tiny_model
from rollout import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_lora_sync_on_cuda(tmp_path):
    from align.learners import PolicyLearner
    from align.workers import RolloutWorker

    model_dir = save_tiny_model(tmp_path / "tiny")
    learner = PolicyLearner(ModelConfig(name=str(model_dir)), PeftConfig(method="lora", r=8), lr=5e-2, total_steps=2)
    worker = RolloutWorker("vllm", str(model_dir), max_lora_rank=8, max_model_len=256,
                           vllm_kwargs={"gpu_memory_utilization": 0.2})
    samples, _, _ = worker.generate(["What is 2 + 3?"], SamplingParams(n=4, max_new_tokens=6, seed=0))
    for i, s in enumerate(samples):
        s.reward = float(i % 2)
    exp = build_experience(samples, 0).to("cuda")
    algo = algorithms.get("grpo")
    exp.advantages = algo.advantages(**exp.tensors())
    learner.update(exp, algo)
    worker.update(learner.sync_payload())
    samples, _, _ = worker.generate(["The quick brown fox"], SamplingParams(n=2, max_new_tokens=8, seed=1, logprobs=True))
    exp = build_experience(samples, 0).to("cuda")
    with torch.no_grad():
        lp, _ = token_logprobs(learner.model.eval(), exp.input_ids, exp.attention_mask, exp.prompt_len)
    for i, s in enumerate(samples):
        want = lp[i, exp.prompt_len:exp.prompt_len + len(s.completion_ids)].cpu()
        assert torch.allclose(torch.tensor(s.logprobs), want, atol=2e-3)


def test_qlora_trains_every_lora_module_on_cuda(tmp_path):
    from transformers import AutoModelForCausalLM

    from align.tuning import apply_tuning, quantization_config

    model_dir = save_tiny_model(tmp_path / "tiny")
    cfg = PeftConfig(method="qlora", r=4)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization_config(cfg, ModelConfig()),
                                                 device_map={"": 0})
    model = apply_tuning(model, cfg)
    ids = torch.randint(5, 400, (2, 16), device="cuda")
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
