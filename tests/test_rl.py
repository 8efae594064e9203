"""The online-RL core on tiny models: Ray and debug runs train and log; engines equal the learner
after weight sync (HF and vLLM); micro-batch accumulation equals one batch."""
import importlib.util
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import algorithms
import align.logprobs
import align.prompt_replay
from align import rl
from align.config import PeftConfig, ModelConfig, load_config, to_dict
from align.experience import build_experience
from align.logprobs import token_logprobs
from align.rl_config import RLConfig
from align.tiny import save_tiny_model
from align.learners import MetricSums, PolicyLearner
from align.workers import RolloutWorker
from conftest import rollout_batch
from rollout import SamplingParams

REQUIRED = ["reward", "reward/digit_share/mean", "reward/math_accuracy/mean", "accuracy", "kl", "clip_frac_low",
            "clip_frac_high", "entropy", "response_length/mean", "response_length/max", "truncated_frac",
            "zero_variance_group_frac", "gen_tokens_per_s", "time/generate", "time/reward", "time/logprob",
            "time/update", "time/sync", "time/step", "grad_norm"]


def _cfg(tmp_path, model_dir, *extra):
    return load_config(RLConfig, None, [
        f"model.name={model_dir}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "data.train_size=40",
        "data.eval_size=8", "rollout.prompts_per_step=4", "rollout.n=4", "rollout.max_new_tokens=8",
        "rollout.temperature=1.0", "log.progress=false", "rollout.num_threads=1", "train.num_threads=1",
        "train.lr=1e-2", "peft.r=8", "algorithm.params={kl_coef: 0.05}",
        "reward.functions=[{name: math_accuracy}, {name: tests/rl_rewards.py:digit_share}]", *extra])


@pytest.mark.parametrize("debug", [True, False], ids=["debug", "ray"])
def test_three_step_run_changes_weights_and_writes_metrics(tmp_path, debug):
    model_dir = save_tiny_model(tmp_path / "tiny")
    out = rl.run(_cfg(tmp_path, model_dir, f"train.debug={str(debug).lower()}", "train.lr_scheduler=cosine"))
    run = tmp_path / "run"
    lora = load_file(str(run / "final" / "adapter_model.safetensors"))
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(v.abs().sum() > 0 for v in b), "LoRA B started at zero and must have moved"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "time/step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # cosine over 3 steps from 1e-2: 0.5 (1 + cos(pi s / 3)) = 1, 3/4, 1/4 at s = 0, 1, 2
    assert [r["lr"] for r in steps] == pytest.approx([1e-2, 7.5e-3, 2.5e-3])
    for key in REQUIRED:
        assert all(key in r for r in steps), key
    assert recs[0]["step"] == 0 and "eval/accuracy" in recs[0] and "eval/accuracy" in recs[-1]
    assert steps[-1]["kl"] > 0  # the policy moved away from the reference (adapter disabled)
    if not debug and len(os.sched_getaffinity(0)) >= 2:  # one core each; the idle engine's core is lent (align/cores.py)
        assert all(r["threads/update_peak"] == 2 for r in steps)
    assert (run / "plots" / "reward.png").is_file() and (run / "config.yaml").is_file()
    assert len(out["history"]) == 3


def _learner_after_one_update(model_dir):
    learner = PolicyLearner(ModelConfig(name=str(model_dir)), PeftConfig(method="lora", r=8), lr=5e-2,
                            total_steps=3, temperature=1.0, micro_batch_size=4, num_threads=1)
    engine = RolloutWorker("hf", str(model_dir), num_threads=1)
    samples, _, _ = engine.generate(["What is 2 + 3?", "Tom has 5 apples"], SamplingParams(n=4, max_new_tokens=6,
                                                                                        seed=0))
    for i, s in enumerate(samples):
        s.reward = float(i % 3)
    exp = build_experience(samples, 0)
    algo = algorithms.get("grpo")
    exp.advantages = algo.advantages(**exp.tensors())
    learner.update(exp, algo)
    return learner


def _assert_engine_matches_learner(worker, learner, sync=True):
    if sync:
        worker.update(learner.sync_payload())
    samples, _, _ = worker.generate(["What is 12 + 7?", "The quick brown fox"],
                                 SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=1, logprobs=True))
    exp = build_experience(samples, 0)
    with torch.no_grad():
        lp, _ = token_logprobs(learner.model.eval(), exp.input_ids, exp.attention_mask, exp.prompt_len)
    for i, s in enumerate(samples):
        got = torch.tensor(s.logprobs)
        want = lp[i, exp.prompt_len:exp.prompt_len + len(s.completion_ids)]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_hf_engine_equals_learner_after_sync(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    learner = _learner_after_one_update(model_dir)
    worker = RolloutWorker("hf", str(model_dir), num_threads=1)
    _assert_engine_matches_learner(worker, learner)


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
def test_vllm_engine_equals_learner_after_sync(tmp_path, merged):
    """The LoRA reaches vLLM as an adapter, or is folded into the engine's weights by its workers
    (rollout.lora_sync=merged, the CPU default: no LoRA layers in the engine at all)."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    learner = _learner_after_one_update(model_dir)
    worker = RolloutWorker("vllm", str(model_dir), num_threads=1, max_lora_rank=8, max_model_len=256,
                           vllm_kwargs={"kv_cache_gib": 0.25}, enable_lora=not merged)
    try:
        _assert_engine_matches_learner(worker, learner)
        if merged:  # a second sync merges into the checkpoint's weights again, not on top of the first
            with torch.no_grad():
                for n, p in learner.model.named_parameters():
                    if "lora_B" in n:
                        p.mul_(-1.5)
            _assert_engine_matches_learner(worker, learner)
            # an empty adapter means the base model again: every merged layer goes back to W0
            worker.update({"kind": "lora", "tensors": {}, "config": learner.sync_payload()["config"]})
            with torch.no_grad():  # the learner as the base model, to compare against
                for n, p in learner.model.named_parameters():
                    if "lora_B" in n:
                        p.zero_()
            _assert_engine_matches_learner(worker, learner, sync=False)
    finally:
        worker.engine.close()


def _learner_with_gradients(model_dir, micro_batch_size, attn="sdpa", adapter_layers=0):
    """A LoRA policy learner whose B matrices are non-zero, so that every LoRA parameter gets a gradient."""
    learner = PolicyLearner(ModelConfig(name=str(model_dir), attn_implementation=attn),
                            PeftConfig(method="lora", r=8, adapter_layers=adapter_layers),
                            lr=1e-2,
                            total_steps=2, temperature=0.7, micro_batch_size=micro_batch_size, num_threads=1)
    with torch.no_grad():
        for n, p in learner.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return learner


def test_microbatch_accumulation_equals_one_batch(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    learner = _learner_with_gradients(model_dir, micro_batch_size=8)
    engine = RolloutWorker("hf", str(model_dir), num_threads=1)
    samples, _, _ = engine.generate(["What is 2 + 3?", "Tom has 5 apples", "yes or no"],
                                 SamplingParams(n=3, max_new_tokens=7, seed=3))
    for i, s in enumerate(samples):
        s.reward = float((i * 7) % 4)
    exp = build_experience(samples, 0)
    algo = algorithms.get("grpo", loss_agg="token-mean", kl_coef=0.0)
    exp.advantages = algo.advantages(**exp.tensors())
    exp.old_logprobs = learner.logprobs(exp, old=True, ref=False)["old_logprobs"] + 0.05  # off-policy ratios

    def grads(micro):
        learner.micro = micro
        learner.optimizer.zero_grad(set_to_none=True)
        learner.backward(exp, algo.loss, MetricSums())
        return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad}

    one, parts = grads(9), grads(2)
    for n in one:
        assert torch.allclose(one[n], parts[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("agg,attn,layers", [("token-mean", "sdpa", 0), ("seq-mean-token-mean", "sdpa", 0),
                                             ("token-mean", "eager", 0), ("token-mean", "eager", 1)])
def test_packed_and_token_budget_micro_batches_equal_one_padded_batch(tmp_path, agg, attn, layers, monkeypatch):
    """Padding-free updates: micro-batches cut by a token budget (padded, length-sorted), packed
    ones (one sequence per micro-batch, position ids restarting per row) and prompt-shared ones
    (each group's prompt run once) give the loss, the gradients and the log-probs of the whole
    batch in one padded piece, under either CPU attention backend (the main job's preset takes eager)."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    # layers=1: adapters on the last layer only, so the first layer's prompt cache needs no gradient
    learner = _learner_with_gradients(model_dir, micro_batch_size=64, attn=attn, adapter_layers=layers)
    engine = RolloutWorker("hf", str(model_dir), num_threads=1)
    samples, _, _ = engine.generate(["What is 2 + 3?", "Tom has 5 apples and 3 pears", "yes"],
                                    SamplingParams(n=3, max_new_tokens=9, seed=4))
    for i, s in enumerate(samples):  # completions of 3..9 tokens, as if some had stopped early
        cut = 3 + (i * 4) % 7
        s.completion_ids, s.logprobs, s.reward = s.completion_ids[:cut], s.logprobs[:cut], float((i * 5) % 3)
    assert len({len(s.completion_ids) for s in samples}) > 1 and len({len(s.prompt_ids) for s in samples}) > 1
    exp = build_experience(samples, 0)
    algo = algorithms.get("grpo", loss_agg=agg, kl_coef=0.0)
    exp.advantages = algo.advantages(**exp.tensors())
    exp.old_logprobs = learner.logprobs(exp, old=True, ref=False)["old_logprobs"] + 0.05

    def run(tokens, packing, shared=False):
        learner.tokens, learner.packing, learner.shared = tokens, packing, shared
        learner.optimizer.zero_grad(set_to_none=True)
        sums = MetricSums()
        learner.backward(exp, algo.loss, sums)
        lp = learner.logprobs(exp, old=True, ref=False)["old_logprobs"]
        return sums.means()["loss"], lp, {n: p.grad.clone() for n, p in learner.model.named_parameters()
                                            if p.requires_grad}

    loss, lp, grads = run(0, False)  # one padded micro-batch
    longest = int(exp.attention_mask.sum(1).max())
    completion = int(exp.attention_mask[:, exp.prompt_len:].sum(1).max()) + 1
    # prompts computed once (KV cache copied to the samples): with a token budget every prompt once per
    # update, its gradient replayed after micro-batches of rows cut by length (align/prompt_replay.py),
    # here one micro-batch, then 3 rows each (splitting the groups); without a budget, in row
    # micro-batches of 5 that split the groups of 3, each group's prompt once per micro-batch
    for tokens, packing, shared in ((2 * longest, False, False), (2 * longest, True, False), (0, True, False),
                                    (9 * longest, False, True), (3 * completion, False, True), (0, False, True)):
        learner.micro = 5 if shared and not tokens else 64
        fallbacks, replays = [], []  # prompt lengths of micro-batches that took the padded path; replays
        if shared:
            padded = align.logprobs.token_logprobs
            monkeypatch.setattr(align.logprobs, "token_logprobs",
                                lambda *a, **k: fallbacks.append(a[3]) or padded(*a, **k))
            replay = align.prompt_replay.PromptCache.backward
            monkeypatch.setattr(align.prompt_replay.PromptCache, "backward", lambda c: replays.append(1) or replay(c))
        loss2, lp2, grads2 = run(tokens, packing, shared)
        monkeypatch.undo()
        assert all(p < 2 for p in fallbacks), fallbacks  # only the 1-token prompt ("yes") has no prefix to share
        assert len(replays) == (shared and tokens > 0)
        assert abs(loss2 - loss) < 1e-5, (tokens, packing)
        mask = exp.action_mask.bool()
        assert torch.allclose(lp2[mask], lp[mask], atol=1e-5), (tokens, packing)
        for n in grads:
            assert torch.allclose(grads2[n], grads[n], atol=1e-6, rtol=1e-4), (n, tokens, packing)


def test_rows_with_zero_advantage_are_skipped_with_the_same_gradient(tmp_path, monkeypatch):
    """GRPO with no KL term: a group whose rewards are equal carries no gradient, so the update
    leaves its rows out (fewer rows through the model) with the same loss and gradients; an
    all-idle minibatch keeps one row (the optimizer still steps); a KL term keeps every row."""
    import align.learners

    model_dir = save_tiny_model(tmp_path / "tiny")
    learner = _learner_with_gradients(model_dir, micro_batch_size=64)
    engine = RolloutWorker("hf", str(model_dir), num_threads=1)
    samples, _, _ = engine.generate(["What is 2 + 3?", "Tom has 5 apples", "yes or no"],
                                    SamplingParams(n=3, max_new_tokens=6, seed=4))
    for i, s in enumerate(samples):  # groups 0 and 2 vary; group 1 is all right
        s.reward = 1.0 if s.group_id == 1 else float(i % 2)
    exp = build_experience(samples, 0)
    algo = algorithms.get("grpo", loss_agg="token-mean")
    exp.advantages = algo.advantages(**exp.tensors())
    idle = (exp.advantages.reshape(len(exp), -1) == 0).all(1)
    assert idle.sum() == 3 and not algo.zero_advantage_trains
    assert algorithms.get("grpo", kl_coef=0.1).zero_advantage_trains
    exp.old_logprobs = learner.logprobs(exp, old=True, ref=False)["old_logprobs"] + 0.05  # off-policy ratios
    seen = []
    forward = align.learners.sequence_logprobs
    monkeypatch.setattr(align.learners, "sequence_logprobs",
                        lambda m, mb, *a, **k: seen.append(len(mb)) or forward(m, mb, *a, **k))

    def run(batch, skip):
        seen.clear()
        learner.optimizer.zero_grad(set_to_none=True)
        sums = MetricSums()
        learner.backward(batch, algo.loss, sums, skip_idle=skip)
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad}
        return sum(seen), sums.means(), grads

    rows, metrics, grads = run(exp, False)
    rows2, metrics2, grads2 = run(exp, True)
    assert (rows, rows2) == (9, 6) and metrics2["idle_rows_skipped"] == pytest.approx(1 / 3)
    assert abs(metrics2["loss"] - metrics["loss"]) < 1e-6
    for n in grads:
        assert torch.allclose(grads2[n], grads[n], atol=1e-6, rtol=1e-4), n
    rows3, _, grads3 = run(exp.index(idle.nonzero().squeeze(1)), True)
    assert rows3 == 1 and all(g.abs().max() == 0 for g in grads3.values())
    assert learner.update(exp, algo)["idle_rows_skipped"] == pytest.approx(1 / 3)  # the update passes it on


def test_entropy_gradient_through_head_tiles_equals_the_one_piece_head():
    """The entropy bonus's gradient flows through the checkpointed head tiles as through one piece."""
    from align.logprobs import head_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(7, 8, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    out = []
    for tile in (10_000, 22):  # one piece; tiles of 2 rows, recomputed in backward
        lp, ent = head_logprobs(head, hidden, targets, 0.7, with_entropy=True, tile_elements=tile, entropy_grad=True)
        out.append((ent.detach(), *torch.autograd.grad((lp + 0.3 * ent).sum(), [hidden, head.weight])))
    logp = torch.log_softmax(head(hidden).detach() / 0.7, -1)
    assert torch.allclose(out[0][0], -(logp.exp() * logp).sum(-1), atol=1e-6)
    for a, b in zip(*out):
        assert torch.allclose(a, b, atol=1e-6)


def test_entropy_bonus_trains_idle_rows_and_raises_the_entropy(tmp_path):
    """With entropy_coef > 0 rows whose advantages are all 0 are not skipped and still have a
    gradient (the bonus's), and updates on such a batch raise the policy's entropy."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    learner = _learner_with_gradients(model_dir, micro_batch_size=64)
    engine = RolloutWorker("hf", str(model_dir), num_threads=1)
    samples, _, _ = engine.generate(["What is 2 + 3?", "Tom has 5 apples"], SamplingParams(n=3, max_new_tokens=6, seed=4))
    for s in samples:
        s.reward = 1.0  # every group all right: every advantage 0
    exp = build_experience(samples, 0)
    algo = algorithms.get("grpo", loss_agg="token-mean", entropy_coef=0.5)
    exp.advantages = algo.advantages(**exp.tensors())
    assert (exp.advantages == 0).all() and algo.zero_advantage_trains
    learner.optimizer.zero_grad(set_to_none=True)
    learner.backward(exp, algo.loss, MetricSums(), entropy_grad=True)
    assert max(p.grad.abs().max() for p in learner.model.parameters() if p.requires_grad) > 0
    learner.optimizer.zero_grad(set_to_none=True)
    entropies = [learner.update(exp, algo) for _ in range(4)]
    assert all("idle_rows_skipped" not in m for m in entropies)  # no row left out
    assert entropies[-1]["entropy"] > entropies[0]["entropy"] + 1e-3, [m["entropy"] for m in entropies]


def test_kl_steps_stops_the_kl_term_and_its_reference_pass_after_that_many_steps(tmp_path, monkeypatch):
    """algorithm.params.kl_steps=2 in a 4-step run: steps 1-2 ask the learner for reference
    log-probs and measure a KL, steps 3-4 ask for none and skip idle rows again (no KL term)."""
    algo = algorithms.get("grpo", kl_coef=0.05, kl_steps=2)
    assert algo.for_step(1) is algo and algo.for_step(2).kl_coef == 0 and algo.for_step(5).kl_coef == 0
    assert algo.needs.ref_logprobs and not algo.for_step(2).needs.ref_logprobs
    assert algo.zero_advantage_trains and not algo.for_step(3).zero_advantage_trains
    with pytest.raises(ValueError, match="kl_steps"):
        algorithms.get("grpo", kl_steps=-1)
    asked = []
    logprobs = PolicyLearner.logprobs
    monkeypatch.setattr(PolicyLearner, "logprobs", lambda self, exp, old, ref: asked.append(ref) or
                        logprobs(self, exp, old=old, ref=ref))
    model_dir = save_tiny_model(tmp_path / "tiny")
    rl.run(_cfg(tmp_path, model_dir, "train.debug=true", "train.max_steps=4", "data.eval_size=0",
                "algorithm.params={kl_coef: 0.05, kl_steps: 2}"))
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "time/step" in r]
    assert asked == [True, True, False, False]
    assert [("kl" in r) for r in steps] == [True, True, False, False]
    assert steps[1]["kl"] > 0


def test_dead_rollout_worker_is_restarted_and_the_step_completes(tmp_path):
    """Kill the rollout actor between steps: Ray restarts it, the driver sees its weights version
    reset, re-syncs it and re-asks for the samples; the step completes with synced weights."""
    import ray

    model_dir = save_tiny_model(tmp_path / "tiny")
    run = rl.RLRun(_cfg(tmp_path, model_dir, "train.debug=false", "train.max_steps=3"))
    try:
        run.step()
        ray.kill(run.engines.workers[0], no_restart=False)
        m = run.step()
        assert m["engine_restarts"] == 1 and run.step_no == 2
        version = ray.get(run.engines.workers[0].generate.remote(["hi"], rl._sampling(
            run.cfg.rollout, n=1, temperature=0.0, seed=0)))[2]
        assert version == run.version
        ray.kill(run.engines.workers[0], no_restart=True)  # now past its restarts
        with pytest.raises(rl.RolloutWorkerDied, match="rollout worker died and used up its train.max_actor_restarts"):
            run.step()
    finally:
        run.close()


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    run = rl.RLRun(_cfg(tmp_path, model_dir, "train.debug=true", "train.max_nonfinite=1"))
    learner = run.learner.workers[0]
    original = learner.backward

    def poisoned(mini, loss_fn, sums, correction=None, skip_idle=False, entropy_grad=False):  # a NaN loss, as an overflow would give
        def nan_loss(**kw):
            loss, m = loss_fn(**kw)
            return loss * float("nan"), m
        return original(mini, nan_loss, sums, correction, skip_idle, entropy_grad)

    try:
        before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
        learner.backward = poisoned
        m = run.step()
        assert m["skipped_updates"] == 1 and m["nonfinite_total"] == 1
        for n, p in learner.model.named_parameters():
            if p.requires_grad:
                assert torch.equal(p, before[n]), n  # the poisoned update was not applied
        with pytest.raises(FloatingPointError, match="2 updates skipped"):
            run.step()
    finally:
        run.close()


def test_two_gloo_learners_equal_one_learner_on_the_combined_batch(tmp_path):
    """Data parallelism: two learners (Ray actors, gloo) each on half the groups take the same step
    as one learner on the whole batch."""
    from align import actors
    from align.actors import ActorGroup
    from align.learners import init_group
    from align.rl import _shard

    model_dir = save_tiny_model(tmp_path / "tiny")
    exp = rollout_batch(model_dir)
    algo = algorithms.get("grpo", loss_agg="token-mean")
    exp.advantages = algo.advantages(**exp.tensors())
    args = (ModelConfig(name=str(model_dir)), PeftConfig(method="lora", r=8), 5e-2, 3)
    kw = dict(temperature=1.0, micro_batch_size=4, num_threads=1)
    actors.init_ray(num_cpus=4)  # one logical CPU per actor (they take turns on the real cores)
    one = ActorGroup(PolicyLearner, 1, *args, **kw)
    two = ActorGroup(PolicyLearner, 2, *args, **kw)
    try:
        init_group(two)
        actors.get(one.call(0, "update", exp, algo))
        actors.get([two.call(i, "update", sh, algo) for i, sh in enumerate(_shard(exp, 2))])
        want = actors.get(one.call(0, "trainable_weights"))
        got0, got1 = actors.get(two.run("trainable_weights"))
        for n in want:
            assert torch.equal(got0[n], got1[n]), n  # the two learners stay identical
            # Adam's first step is ~lr * sign(g) = 5e-2 per weight; summation order differs between
            # one and two learners, so allow 0.2 % of a step
            assert torch.allclose(got0[n], want[n], atol=1e-4), (n, (got0[n] - want[n]).abs().max())
        assert any(v.abs().max() > 0.01 for n, v in want.items() if "lora_B" in n)  # the step happened
    finally:
        one.kill()
        two.kill()


def test_two_gloo_critics_equal_one_critic_on_the_combined_batch(tmp_path):
    """PPO's critic is data-parallel like the policy: two critics (gloo), each on half the groups,
    predict the same values after a step as one critic trained on the whole batch."""
    from align import actors
    from align.actors import ActorGroup
    from align.learners import init_group
    from align.rl import _shard
    from align.learners import CriticLearner

    model_dir = save_tiny_model(tmp_path / "tiny")
    exp = rollout_batch(model_dir)
    exp.values = torch.zeros(exp.action_mask.shape)
    exp.returns = torch.arange(len(exp), dtype=torch.float)[:, None] / len(exp) * exp.action_mask  # (B, T)
    algo = algorithms.get("ppo")
    args = (ModelConfig(name=str(model_dir)), PeftConfig(method="lora", r=8), 5e-2, 3)
    kw = dict(micro_batch_size=4, num_threads=1)
    actors.init_ray(num_cpus=4)
    one = ActorGroup(CriticLearner, 1, *args, **kw)
    two = ActorGroup(CriticLearner, 2, *args, **kw)
    try:
        init_group(two)
        before = actors.get(one.call(0, "values", exp))
        m1 = actors.get(one.call(0, "update", exp, algo))
        m2 = actors.get([two.call(i, "update", sh, algo) for i, sh in enumerate(_shard(exp, 2))])
        want = actors.get(one.call(0, "values", exp))
        got0, got1 = actors.get(two.run("values", exp))
        assert torch.equal(got0, got1)  # the two critics stay identical
        assert (want - before).abs().max() > 1e-2  # the step moved the values
        assert torch.allclose(got0, want, atol=1e-4), (got0 - want).abs().max()
        assert math.isfinite(m1["critic/value_loss"]) and math.isfinite(m2[0]["critic/value_loss"])
    finally:
        one.kill()
        two.kill()


def test_several_rollout_engines_share_a_batch_in_prompt_order(tmp_path):
    """rollout.num_engines=3: the batch's prompts are dealt to three HF engines, each group comes back
    under its own prompt in row order, and each engine samples with its own noise."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    run = rl.RLRun(_cfg(tmp_path, model_dir, "rollout.num_engines=3"))
    try:
        assert len(run.engines) == 3
        rows = run.stream.take(5)
        rows = rows[:2] + [rows[0]] + rows[2:]  # one prompt twice: engines 0 and 2 get it
        samples, _ = run.generate(rows, run.sampling, group_offset=10)
        n = run.cfg.rollout.n
        assert len(samples) == len(rows) * n
        assert [s.group_id for s in samples] == [10 + r for r in range(len(rows)) for _ in range(n)]
        assert [s.prompt for s in samples] == [r["text"] for r in rows for _ in range(n)]
        same_prompt = [[s.completion for s in samples if s.group_id == g] for g in (10, 12)]
        assert same_prompt[0] != same_prompt[1]  # engines 0 and 2: different noise for one prompt
    finally:
        run.close()


def test_truncated_replies_score_the_configured_reward_in_a_run(tmp_path):
    """reward.truncated_reward reaches the run's scorer: replies cut at max_new_tokens get it as their
    total, finished ones keep the functions' sum, and both keep their components."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    run = rl.RLRun(_cfg(tmp_path, model_dir, "train.debug=true", "reward.truncated_reward=-3.0"))
    try:
        samples, _ = run.generate(run.stream.take(2), run.sampling, group_offset=0)
        samples[0].finish_reason, samples[1].finish_reason = "stop", "length"
        metrics = run.score(samples)
        assert samples[1].reward == -3.0 and samples[0].reward != -3.0
        assert samples[0].reward == pytest.approx(sum(v for v in samples[0].reward_components.values()))
        assert set(samples[1].reward_components) == {"math_accuracy", "digit_share"}
        assert metrics["reward/total/truncated"] == sum(s.truncated for s in samples) >= 1
    finally:
        run.close()


def test_dapo_finishes_when_nine_groups_in_ten_have_zero_variance(tmp_path):
    """Dynamic sampling refills with whole fresh batches and, at its round cap, trains on what it has."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    out = rl.run(_cfg(tmp_path, model_dir, "train.debug=true", "algorithm.name=dapo", "algorithm.params={max_gen_rounds: 3}",
                      "reward.functions=[{name: tests/rl_rewards.py:rare_variance}]", "reward.accuracy=null",
                      "train.eval_before=false"))
    hist = out["history"]
    assert len(hist) == 3
    assert max(h["zero_std_frac"] for h in hist) >= 0.5
    assert all(h["gen_rounds"] <= 3 for h in hist) and any(h["gen_rounds"] > 1 for h in hist)
    assert all(h["samples_generated"] == 16 * h["gen_rounds"] for h in hist)  # whole batches of 4 prompts x 4


@pytest.mark.parametrize("pipeline", ["sync", "one-step-off"])
def test_time_budget_stops_the_run_and_drives_the_lr_decay(tmp_path, pipeline):
    """train.max_time_s: a step starts only when the steps so far plus the last step's time fit the
    budget, and each step's lr is the cosine of the budget's share used before it (hand-computed from
    the logged times); max_steps stays a cap that the budget reaches first."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    first = rl.run(_cfg(tmp_path / "probe", model_dir, "train.debug=true", "train.max_steps=2", "train.eval_before=false",
                        "data.eval_size=0", f"rollout.pipeline={pipeline}"))["history"]
    budget = first[0]["time/step"] + 2.5 * first[1]["time/step"]  # the first, slower step and about three more
    hist = rl.run(_cfg(tmp_path, model_dir, "train.debug=true", "train.max_steps=50", f"train.max_time_s={budget}",
                       "train.lr_scheduler=cosine", "train.eval_before=false", f"rollout.pipeline={pipeline}"))["history"]
    assert 1 <= len(hist) < 50
    before = [0.0] + [h["time/train"] for h in hist]  # the steps' time before each step, and after the last
    last = [0.0] + [h["time/step"] for h in hist]  # the time of the step before each step
    n = len(hist)
    if pipeline == "sync":  # a step runs when one more step as long as the last fits
        assert all(before[k] + last[k] <= budget for k in range(n)) and before[n] + last[n] > budget
    else:  # the next step is decided when its generation would start, during a step: when two more fit
        assert all(before[k - 1] + 2 * last[k - 1] <= budget for k in range(1, n))
        assert before[n - 1] + 2 * max(last[n - 1], last[n]) > budget  # (the step's time so far counts too)
        assert all(h["rollout/staleness"] == 1 for h in hist[1:])  # every later step was generated one step off
    assert [h["lr"] for h in hist] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * min(b / budget, 1.0)))
                                                     for b in before[:-1]])
    assert hist[-1]["time/train"] == pytest.approx(sum(h["time/step"] for h in hist))


def test_over_sampled_rounds_train_on_prompts_per_step_groups(tmp_path):
    """rollout.gen_prompts_per_step 6 over 4 prompts a step, one step off: every round (the prefetched
    ones included) generates 6 groups and the ranked selection keeps 4."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    out = rl.run(_cfg(tmp_path, model_dir, "train.debug=true", "rollout.gen_prompts_per_step=6",
                      "rollout.pipeline=one-step-off", "algorithm.params={kl_coef: 0.05, selection: ranked, filter_metric: digit_share}",
                      "train.eval_before=false", "data.eval_size=0"))
    hist = out["history"]
    assert [(h["samples_generated"], h["samples_trained"], h["kept_groups"]) for h in hist] == [(24, 16, 4.0)] * 3
    assert all(0 <= h["kept_varied_frac"] <= 1 for h in hist)
    with pytest.raises(ValueError, match="keeps every group: set algorithm.params.selection"):
        rl.RLRun(_cfg(tmp_path / "b", model_dir, "train.debug=true", "rollout.gen_prompts_per_step=6"))
    with pytest.raises(ValueError, match=r"gen_prompts_per_step \(3\) must be 0 or >= rollout.prompts_per_step \(4\)"):
        rl.RLRun(_cfg(tmp_path / "c", model_dir, "train.debug=true", "rollout.gen_prompts_per_step=3"))
    with pytest.raises(ValueError, match="filter_metric='acc' is neither 'reward' nor a reward function"):
        rl.RLRun(_cfg(tmp_path / "d", model_dir, "train.debug=true",
                      "algorithm.params={selection: ranked, filter_metric: acc}"))


@pytest.mark.parametrize("dtype,tiny_gap", [("float32", True), ("bfloat16", False)])
def test_engine_learner_mismatch_is_measured(tmp_path, dtype, tiny_gap):
    """The engine's logprobs are kept and compared with the learner's every step: float noise for an
    fp32 HF engine, clearly more for a bf16 one (whose run turns TIS on by default)."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    cfg = _cfg(tmp_path, model_dir, "train.debug=true", f"rollout.dtype={dtype}", "train.max_steps=2",
               "algorithm.params={}", "train.eval_before=false")
    out = rl.run(cfg)
    gap = [h["rollout/logprob_diff_abs"] for h in out["history"]]
    assert all(g < 1e-4 for g in gap) if tiny_gap else all(g > 1e-4 for g in gap), gap
    assert ("rollout/is_weight_mean" in out["history"][-1]) == (not tiny_gap)  # auto: TIS only where they differ


def test_chat_templated_prompts_get_one_bos(tmp_path):
    """A Llama-3-style template writes the BOS itself: prompts are tokenised once, without adding
    special tokens again, and the engines generate from exactly those ids."""
    from tokenizers.processors import TemplateProcessing

    from align.tiny import CHAT_TEMPLATE, tiny_tokenizer

    tok = tiny_tokenizer()
    bos = "<|endoftext|>"
    tok.bos_token = bos
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds a BOS by default
    cfg = _cfg(tmp_path, "unused", "data.train_size=4", "data.eval_size=2")
    train, _ = rl.load_prompts(cfg, tok)
    for row in train:
        assert row["ids"][:2].count(tok.bos_token_id) == 1, row["ids"][:3]
    model_dir = save_tiny_model(tmp_path / "tiny")
    worker = RolloutWorker("hf", str(model_dir), num_threads=1)
    samples, _, _ = worker.generate([train[0]["text"]], SamplingParams(max_new_tokens=2, seed=0), 0, None, [train[0]["ids"]])
    assert samples[0].prompt_ids == train[0]["ids"]


def test_a_nonfinite_critic_update_is_skipped_and_counted(tmp_path):
    from align.learners import CriticLearner

    model_dir = save_tiny_model(tmp_path / "tiny")
    exp = rollout_batch(model_dir)
    exp.values = torch.zeros(exp.action_mask.shape)
    exp.returns = torch.full(exp.action_mask.shape, float("nan"))  # a NaN target: NaN loss and gradient
    critic = CriticLearner(ModelConfig(name=str(model_dir)), PeftConfig(method="lora", r=8), 1e-2, 3, num_threads=1)
    before = {n: p.detach().clone() for n, p in critic.model.named_parameters() if p.requires_grad}
    m = critic.update(exp, algorithms.get("ppo"))
    assert m["critic/skipped_updates"] == 1
    for n, p in critic.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n  # the update was not applied


def test_overlapped_generation_is_one_step_off_policy_and_corrected(tmp_path):
    """rollout.pipeline=one-step-off: step 1 is the synchronous step exactly; from step 2 the batch was sampled
    with the weights one update behind the learner (staleness 1: the engine's log-probs now differ
    from the learner's) and the rollout-correction weights are applied; sync keeps staleness 0."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    runs = {}
    for name, mode, first in (("sync", "sync", 0), ("one-step-off", "one-step-off", 0), ("late", "one-step-off", 2)):
        cfg = _cfg(tmp_path / name, model_dir, "train.debug=true", f"rollout.pipeline={mode}", "train.eval_before=false",
                   "data.eval_size=0", "algorithm.params={kl_coef: 0.0}", f"rollout.sync_steps={first}")
        runs[name] = rl.run(cfg)["history"]
    off, on, late = runs["sync"], runs["one-step-off"], runs["late"]
    assert [h["rollout/staleness"] for h in off] == [0, 0, 0]
    assert [h["rollout/staleness"] for h in on] == [0, 1, 1]
    # rollout.sync_steps=2: two synchronous steps (the sync run's, exactly), then the overlap
    assert [h["rollout/staleness"] for h in late] == [0, 0, 1]
    for key in ("reward", "loss", "grad_norm"):
        assert [h[key] for h in late[:2]] == pytest.approx([h[key] for h in off[:2]], abs=1e-6), key
    for key in ("reward", "loss", "grad_norm", "response_length/mean"):
        assert on[0][key] == pytest.approx(off[0][key], abs=1e-6), key
    # fp32 HF engine: in sync the engine's log-probs are the learner's; one step behind they are not
    assert max(h["rollout/logprob_diff_abs"] for h in off) < 1e-4
    assert on[1]["rollout/logprob_diff_abs"] > 1e-3 and "rollout/is_weight_mean" in on[1]


def test_a_checkpoint_during_one_step_off_keeps_the_stream_before_the_prefetch(tmp_path):
    """The next step's prompts are taken from the stream while this step trains; a checkpoint must
    record the stream where a synchronous run would be, so a resumed run asks for those prompts again."""
    from align import checkpoint

    model_dir = save_tiny_model(tmp_path / "tiny")
    where = {}
    for mode in ("sync", "one-step-off"):
        run = rl.RLRun(_cfg(tmp_path / mode, model_dir, "train.debug=true", f"rollout.pipeline={mode}",
                            "data.eval_size=0"))
        try:
            run.step()
            path = run.save(tmp_path / mode)
            where[mode] = (checkpoint.load(path, to_dict(run.cfg))[1]["stream"], [run.stream.epoch, run.stream.pos])
        finally:
            run.close()
    (sync_saved, sync_now), (off_saved, off_now) = where["sync"], where["one-step-off"]
    assert off_saved == sync_saved == sync_now
    assert off_now != off_saved  # the prefetch did advance the live stream


def test_engine_log_probs_as_the_old_policy_skip_the_recompute_and_equal_it(tmp_path, monkeypatch):
    """algorithm.old_policy=engine: with two minibatches (off-policy updates) the learner computes no
    old log-probs, and with an fp32 HF engine in sync (the engine's log-probs are the learner's up to
    float noise) the run equals the one that recomputes them; an explicit correction mode is refused."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    calls, spied = [], PolicyLearner.logprobs

    def spy(self, exp, old, ref):
        calls.append(old)
        return spied(self, exp, old, ref)

    monkeypatch.setattr(PolicyLearner, "logprobs", spy)
    runs = {}
    for source in ("learner", "engine"):
        calls.clear()
        cfg = _cfg(tmp_path / source, model_dir, "train.debug=true", "algorithm.minibatches=2", "train.eval_before=false",
                   f"algorithm.old_policy={source}", "data.eval_size=0", "algorithm.params={kl_coef: 0.0}")
        runs[source] = rl.run(cfg)["history"], list(calls)
    (recomputed, old_calls), (engine, engine_calls) = runs["learner"], runs["engine"]
    assert old_calls == [True] * 3 and engine_calls == [False] * 3
    for a, b in zip(recomputed, engine):
        for key in ("reward", "loss", "approx_kl_old", "clip_frac_high"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert max(h["approx_kl_old"] for h in engine) > 0  # the second minibatch is off-policy
    bad = _cfg(tmp_path / "bad", model_dir, "algorithm.old_policy=engine", "algorithm.rollout_correction=token-mask")
    with pytest.raises(ValueError, match="old_policy=engine"):
        rl.rollout_correction(bad, model_dir)


def test_row_micro_batches_are_cut_where_the_padded_tokens_are_fewest():
    """plan_rows (align/prompt_replay.py) by hand: completions 64, 20, 19, 18, 15 under a 200-token
    budget with 64 tokens per micro-batch: the long row alone (65 + 64) and the four short ones
    (4 x 21 + 64) cost 277; all five would be 325 tokens, over the budget; [64, 20] + the rest 318."""
    from align.prompt_replay import plan_rows

    assert plan_rows([20, 64, 18, 19, 15], 200, overhead=64) == [[1], [0, 3, 2, 4]]
    # within a 400 budget: one micro-batch costs 325 + 200, two 149 + 400 with 200 a micro-batch
    assert plan_rows([20, 64, 18, 19, 15], 400, overhead=200) == [[1, 0, 3, 2, 4]]
    assert plan_rows([300, 5], 100, overhead=0) == [[0], [1]]  # a row over the budget goes alone
