"""DeepSpeed ZeRO-2 / ZeRO-3 policy learners (two Ray actors, gloo) follow the same loss curve and
reach the same parameters as the plain learner. The first DeepSpeed start builds a small op
(30-50 s, cached under ~/.cache/torch_extensions)."""
import pytest
import torch

import algorithms
from align import actors
from align.actors import ActorGroup
from align.config import ModelConfig, PeftConfig
from align.rl import _free_port, _shard
from align.tiny import save_tiny_model
from align.workers import PolicyLearner
from conftest import rollout_batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny") / "m")
    exp = rollout_batch(model_dir)
    algo = algorithms.get("grpo", loss_agg="token-mean")
    exp.advantages = algo.advantages(**exp.tensors())
    exp.old_logprobs = torch.zeros_like(exp.advantages[:, None].expand_as(exp.action_mask), dtype=torch.float) - 2.0
    actors.init_ray(num_cpus=4)
    args = (ModelConfig(name=str(model_dir)), PeftConfig(method="lora", r=8), 1e-2, 4)
    plain = ActorGroup(PolicyLearner, 1, *args, temperature=1.0, micro_batch_size=4, num_threads=1)
    curve = [actors.get(plain.call(0, "update", exp, algo))["loss"] for _ in range(3)]
    weights = actors.get(plain.call(0, "trainable_weights"))
    plain.kill()
    return args, exp, algo, curve, weights


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_learners_match_the_plain_learner(setup, stage):
    args, exp, algo, curve, weights = setup
    group = ActorGroup(PolicyLearner, 2, *args, temperature=1.0, micro_batch_size=4, num_threads=1, zero_stage=stage)
    try:
        port = _free_port()
        actors.get(group.run_each("init_distributed", [(0, 2, port), (1, 2, port)]))
        got = []
        for _ in range(3):
            out = actors.get([group.call(i, "update", sh, algo) for i, sh in enumerate(_shard(exp, 2))])
            got.append((out[0]["loss"] + out[1]["loss"]) / 2)  # ranks hold W x their share (gradients are averaged)
        assert got == pytest.approx(curve, abs=1e-4), (got, curve)
        w0, w1 = actors.get(group.run("trainable_weights"))
        for n in weights:
            assert torch.allclose(w0[n], w1[n]) and torch.allclose(w0[n], weights[n], atol=1e-4), n
    finally:
        group.kill()
