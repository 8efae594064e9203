"""Multi-turn episodes: exact tokens and masks with both engines, tools in the sandbox, limits, and
a multi-turn GRPO run that learns."""
import dataclasses
import importlib.util
import json
import time

import pytest
import torch
from safetensors.torch import load_file

import algorithms
from align import rl
from align.config import load_config
from align.envs import EnvStep, ToolEnv, env_factory
from align.episodes import EpisodeLimits, EpisodeRunner, episode_metrics
from align.experience import build_experience
from align.logprobs import token_logprobs
from align.rl_config import RLConfig
from align.sandbox import ToolRunner
from align.tiny import save_tiny_model, tiny_model
from align.tools import Tool, ToolCall, format_tool_call, get_tool, parse_tool_calls
from align.types import Sample
from rollout import SamplingParams
from rollout.hf import HFEngine
from rl_envs import Endless, Scripted

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
ROW = {"columns": {"answer": "5"}, "messages": QUESTION}


def _engine_generate(engine):
    """The runner's `generate` over one in-process engine."""
    return lambda texts, ids, sampling: (engine.generate(texts, sampling, prompt_ids=ids), 0.0)


def _eos_prone(model, tok):
    """EOS likely at every step (tests/test_rollout.py explains the numbers): turns of both kinds."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        model.lm_head.weight[tok.eos_token_id, 0] = 0.19
    return model


def _check_three_turns(engine, tok):
    """Run the scripted 3-turn episode; rebuild the expected ids by hand: each model turn replayed on
    its exact prefix (same seed), the environment's messages written out in ChatML."""
    runner = EpisodeRunner(tok, Scripted, [], EpisodeLimits(max_turns=5, max_tokens=200))
    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=11)
    [s], _ = runner.run([ROW], sampling, _engine_generate(engine))
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert s.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]
    expected, mask, prefix = [], [], list(s.prompt_ids)
    env_texts = ["\n<|im_start|>tool\n19<|im_end|>\n<|im_start|>assistant\n",
                 "\n<|im_start|>user\ngood<|im_end|>\n<|im_start|>assistant\n"]
    for k in range(3):
        turn_sampling = dataclasses.replace(sampling, seed=11 + 104_729 * k)
        turn = engine.generate([""], turn_sampling, prompt_ids=[prefix])[0].completion_ids
        expected += turn
        mask += [1] * len(turn)
        if k < 2:
            closed = turn and turn[-1] == tok.eos_token_id
            env = tok(("" if closed else "<|im_end|>") + env_texts[k], add_special_tokens=False)["input_ids"]
            expected += env
            mask += [0] * len(env)
        prefix = s.prompt_ids + expected
    assert s.completion_ids == expected
    assert s.completion_mask == mask
    assert len(s.logprobs) == len(expected) and all(lp == 0.0 for lp, m in zip(s.logprobs, mask) if not m)
    assert all(lp < 0.0 for lp, m in zip(s.logprobs, mask) if m)
    ep = s.episode
    assert s.columns == {"answer": "5"}  # the row's columns reach the reward functions
    assert ep["turns"] == 3 and ep["env_reward"] == 0.5
    last_closed = expected[-1] == tok.eos_token_id  # else the last reply was cut at max_new_tokens
    assert ep["truncated"] == (None if last_closed else "turn token limit")
    assert s.finish_reason == ("stop" if last_closed else "length")
    assert [m["role"] for m in ep["messages"]] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    exp = build_experience([s], tok.pad_token_id)
    assert exp.action_mask[0, exp.prompt_len:].tolist() == mask
    return s


def test_three_turn_episode_has_exact_tokens_and_masks_hf():
    model, tok = tiny_model(seed=0)
    engine = HFEngine(_eos_prone(model, tok), tok, num_threads=1)
    s = _check_three_turns(engine, tok)
    # both ways a turn ends occur over seeds; this seed's run has at least one environment segment
    assert 0 in s.completion_mask


needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@needs_vllm
@pytest.mark.vllm
def test_three_turn_episode_has_exact_tokens_and_masks_vllm(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.vllm_engine import VLLMEngine

    path = save_tiny_model(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    _eos_prone(AutoModelForCausalLM.from_pretrained(path), tok).save_pretrained(path)
    engine = VLLMEngine(path, dtype="float32", max_model_len=256, num_threads=1, seed=0, block_size=32)
    try:
        _check_three_turns(engine, tok)
    finally:
        engine.close()


def test_environment_tokens_get_no_gradient():
    """The loss trains on model tokens only: d loss / d logprob is 0 at environment tokens, and
    changing environment tokens after the last model turn changes no parameter's gradient."""
    model, tok = tiny_model(seed=0)
    prompt = tok("What is 2 + 3?")["input_ids"]
    comp, mask = [5, 6, 7, 8, 9, 10, 11, 12], [1, 1, 0, 0, 1, 1, 0, 0]

    def grads(completion):
        s = Sample(prompt="q", prompt_ids=prompt, completion="", completion_ids=completion,
                   logprobs=[-1.0] * 8, completion_mask=mask, reward=1.0)
        t = Sample(prompt="q", prompt_ids=prompt, completion="", completion_ids=completion[:6] + [13, 14],
                   logprobs=[-1.0] * 8, completion_mask=mask, reward=0.0)
        exp = build_experience([s, t], tok.pad_token_id)
        algo = algorithms.get("grpo")
        exp.advantages = algo.advantages(**exp.tensors())
        model.zero_grad()
        lp, _ = token_logprobs(model, exp.input_ids, exp.attention_mask, exp.prompt_len)
        lp.retain_grad()
        loss, _ = algo.loss(**{**exp.tensors(), "logprobs": lp, "old_logprobs": lp.detach()})
        loss.backward()
        return lp.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_lp, g1 = grads(comp)
    P = len(prompt)
    env_cols = [P + i for i, m in enumerate(mask) if not m]
    model_cols = [P + i for i, m in enumerate(mask) if m]
    assert g_lp[:, env_cols].abs().sum() == 0 and g_lp[:, model_cols].abs().sum() > 0
    _, g2 = grads(comp[:6] + [20, 21])  # other environment tokens after the last model turn
    assert all(torch.equal(g1[n], g2[n]) for n in g1)


class _Policy:
    """A scripted policy: turn k of every episode replies `replies[k]` (tokenised, EOS-ended)."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.calls = tok, replies, 0

    def __call__(self, texts, ids, sampling):
        reply = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        out_ids = self.tok(reply, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return [Sample(prompt=t, prompt_ids=i, completion=reply, completion_ids=out_ids, logprobs=[-0.5] * len(out_ids))
                for t, i in zip(texts, ids) for _ in range(sampling.n)], 0.01


def _hang(seconds: int) -> str:
    """Sleep far too long.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "late"


def _boom(x: int) -> str:
    """Always raise.

    Args:
        x: anything
    """
    raise ZeroDivisionError("no")


def test_a_hanging_and_a_raising_tool_each_cost_one_error_and_the_batch_completes():
    _, tok = tiny_model(seed=0)
    tools = [Tool.from_function(_hang), Tool.from_function(_boom), get_tool("calculator")]
    runner = ToolRunner(tools, workers=2, timeout=1.0)
    episodes = EpisodeRunner(tok, ToolEnv, tools, EpisodeLimits(max_turns=3, max_tokens=400), runner=runner)
    reply = (format_tool_call("_hang", {"seconds": 60}) + format_tool_call("_boom", {"x": 1})
             + format_tool_call("calculator", {"expression": "23 * 47"}))
    t0 = time.perf_counter()
    samples, _ = episodes.run([ROW, ROW], SamplingParams(n=2, max_new_tokens=100), _Policy(tok, [reply, "It is 1081."]))
    took = time.perf_counter() - t0
    try:
        assert len(samples) == 4 and took < 20  # one deadline per hanging call (4 calls on 2 workers), not 60 s
        for s in samples:
            ep = s.episode
            assert ep["turns"] == 2 and ep["tool_calls"] == 3 and ep["tool_errors"] == 2 and ep["truncated"] is None
            tool_msgs = [m["content"] for m in ep["messages"] if m["role"] == "tool"]
            assert tool_msgs[0].startswith("Error: the tool did not finish within 1 s")
            assert tool_msgs[1] == "Error: ZeroDivisionError: no" and tool_msgs[2] == "1081"
            assert s.completion == "It is 1081."
        m = episode_metrics(samples)
        assert m["episode/tool_calls"] == 3 and m["episode/tool_error_rate"] == pytest.approx(2 / 3)
        assert runner.timeouts == 4 and runner.errors == 8
        # the workers killed at the deadline were replaced: the runner still answers
        assert runner.run([ToolCall("calculator", {"expression": "2 + 2"})])[0].text == "4"
    finally:
        episodes.close()


def test_an_episode_at_the_turn_limit_is_truncated():
    _, tok = tiny_model(seed=0)
    episodes = EpisodeRunner(tok, Endless, [], EpisodeLimits(max_turns=2, max_tokens=400))
    [s], _ = episodes.run([ROW], SamplingParams(n=1, max_new_tokens=20), _Policy(tok, ["hello"]))
    assert s.episode["turns"] == 2 and s.episode["truncated"] == "turn limit" and s.finish_reason == "length"
    assert build_experience([s], tok.pad_token_id).truncated.tolist() == [True]
    # the token limit: no room for the environment's next message
    episodes = EpisodeRunner(tok, Endless, [], EpisodeLimits(max_turns=10, max_tokens=12))
    [s], _ = episodes.run([ROW], SamplingParams(n=1, max_new_tokens=20), _Policy(tok, ["hello"]))
    assert s.episode["truncated"] == "token limit" and len(s.completion_ids) <= 12


def test_sandboxed_tools_refuse_network_files_and_processes(monkeypatch):
    runner = ToolRunner([get_tool("python"), get_tool("calculator")], workers=1, timeout=5.0, max_output=100)
    try:
        codes = {"network": "import socket; socket.create_connection(('127.0.0.1', 9))",
                 "file": "open('/etc/hostname').read()", "process": "import os; os.system('true')",
                 "scratch": "open('a.txt', 'w').write('ok'); print(open('a.txt').read())",
                 "huge": "print('x' * 5000)", "expression": "sum(range(10))",
                 "rename out": "open('b', 'w').write('x'); import os; os.rename('b', '/tmp/align-escaped')",
                 "frames": "try:\n    1 / 0\nexcept Exception as e:\n    print(e.__traceback__.tb_frame.f_back)",
                 "secrets": "import os; print(os.environ.get('ALIGN_TEST_SECRET'))",
                 "leftovers": "import os; print(os.listdir('.'))"}
        monkeypatch.setenv("ALIGN_TEST_SECRET", "s3cret")
        res = dict(zip(codes, runner.run([ToolCall("python", {"code": c}) for c in codes.values()])))
        for k in ("network", "file", "process", "rename out", "frames"):
            assert not res[k].ok and "not allowed" in res[k].text, res[k]
        assert res["scratch"].ok and res["scratch"].text == "ok\n"
        assert not res["huge"].ok and "too long" in res["huge"].text
        assert res["expression"].text == "45\n"
        assert res["secrets"].text == "None\n"  # the environment (tokens, keys) is hidden from the tool
        assert res["leftovers"].text == "[]\n"  # each call starts with an empty scratch directory
        calc = runner.run([ToolCall("calculator", {"expression": "(23 + 2) * 4 / 5"}),
                           ToolCall("calculator", {"expression": "__import__('os')"})])
        assert calc[0].text == "20" and not calc[1].ok
    finally:
        runner.close()


def test_tool_calls_are_parsed_from_the_hermes_format():
    text = ("Let me compute. " + format_tool_call("calculator", {"expression": "1+1"})
            + '<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call><tool_call>{oops</tool_call>')
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error is None) for c in calls[:2]] == [("calculator", {"expression": "1+1"}, True),
                                                                           ("f", {"a": 1}, True)]
    assert calls[2].error and "JSON" in calls[2].error
    assert parse_tool_calls("no call here") == []


def test_tools_reach_the_prompt_through_the_template_or_the_system_message():
    _, tok = tiny_model(seed=0)
    calc = get_tool("calculator")
    plain = EpisodeRunner(tok, ToolEnv, [calc], EpisodeLimits(), runner=None)
    text, _ = plain.chat.prompt(QUESTION)  # the tiny ChatML template has no `tools`: a system message offers them
    assert text.startswith("<|im_start|>system\nYou can call tools") and '"name": "calculator"' in text
    tok.chat_template = ("{% if tools %}{{ '<|im_start|>system\nTOOLS:' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
                         + tok.chat_template)
    native = EpisodeRunner(tok, ToolEnv, [calc], EpisodeLimits(), runner=None)
    text, _ = native.chat.prompt(QUESTION)
    assert text.startswith("<|im_start|>system\nTOOLS:[") and "You can call tools" not in text
    with pytest.raises(ValueError, match="unknown environment"):
        env_factory("nope")
    with pytest.raises(ValueError, match="unknown tool"):
        get_tool("nope")


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_multi_turn_run_changes_weights_and_its_reward_rises(tmp_path, algo):
    model_dir = save_tiny_model(tmp_path / "tiny")
    cfg = load_config(RLConfig, None, [
        f"model.name={model_dir}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "data.train_size=64",
        "data.eval_size=16", "rollout.prompts_per_step=8", "rollout.n=4", "rollout.max_new_tokens=6",
        "rollout.temperature=1.0", "train.debug=true", "log.progress=false", "rollout.num_threads=1",
        "train.num_threads=1", "train.lr=3e-2", "peft.method=full", "env.name=rl_envs:TwoTurns",
        "env.max_turns=2", "reward.functions=[{name: tests/rl_rewards.py:starts_with_vowel}]", "reward.accuracy=null",
        f"algorithm.name={algo}", "critic.lr=3e-2"])
    out = rl.run(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "time/step" in r]
    assert len(steps) == 3 and all(r["episode/turns"] == 2 for r in steps) and "time/env" in steps[0]
    # the held-out reward (greedy, second turns): sampled step rewards of 32 episodes are too noisy over 3 steps
    if algo == "grpo":
        assert out["after"]["eval/reward"] > out["before"]["eval/reward"] + 0.2, (out["before"], out["after"])
    else:  # PPO: the critic learned over episodes whose environment tokens sit between the turns
        assert all("critic/value_loss" in r for r in steps)
    assert out["after"]["eval/episode/turns"] == 2
    eps = [json.loads(x) for x in (tmp_path / "run" / "episodes" / "step_00003.jsonl").read_text().splitlines()]
    assert len(eps) == 4 and eps[0]["turns"] == 2 and eps[0]["messages"][2]["content"] == "Say more."
    after = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    before = tiny_model(seed=0)[0].state_dict()
    assert any(not torch.equal(before[k], v) for k, v in after.items() if k in before)


def test_an_openenv_tool_environment_runs_through_the_adapter():
    pytest.importorskip("openenv.core")
    _, tok = tiny_model(seed=0)
    make = env_factory("openenv", {"env": "rl_openenv:AddEnv", "action": "rl_openenv:AnswerAction",
                                   "observation_field": "prompt"})
    episodes = EpisodeRunner(tok, make, [], EpisodeLimits(max_turns=3, max_tokens=400))
    row = {"columns": {"a": 2, "b": 3}, "messages": [{"role": "user", "content": "unused"}]}
    policy = _Policy(tok, [format_tool_call("add", {"a": 2, "b": 3}), "The answer is 5"])
    [s], _ = episodes.run([row], SamplingParams(n=1, max_new_tokens=50), policy)
    msgs = s.episode["messages"]
    assert msgs[0] == {"role": "user", "content": "What is 2 + 3? Use the add tool, then answer."}
    assert msgs[2] == {"role": "tool", "content": "5"} and msgs[3]["content"] == "The answer is 5"
    assert s.episode["env_reward"] == 1.0 and s.episode["turns"] == 2 and s.episode["truncated"] is None
