"""`align eval` on tiny models: accuracy and pass@k against a hand count of the written outputs,
greedy outputs equal to plain `generate`, a checkpoint equal to final/, a reward model's and a
DPO policy's pairwise accuracy equal to their own stage's eval, and lm-eval on a local task."""
import json

import pytest
import torch

from align.cli import main
from align.config import load_config
from align.evaluate import pass_at_k
from align.tiny import save_tiny_model, tiny_model
from conftest import write_jsonl
from tests.rl_rewards import starts_with_vowel
from test_rm import _pairs, _score_model

REWARD = ["reward.functions=[{name: 'tests.rl_rewards:starts_with_vowel'}]", "reward.accuracy=starts_with_vowel"]


def _rows(n):
    return [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]


def _outputs(out):
    return [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]


def test_generate_accuracy_and_pass_at_k_match_a_hand_count(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    prompts = write_jsonl(tmp_path / "p.jsonl", _rows(8))
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), f"data.path={prompts}", *REWARD, "eval.samples=4", "eval.temperature=1.0",
                 "rollout.max_new_tokens=6", f"eval.output_dir={out}", "eval.num_threads=1", "log.progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    recs = _outputs(out)
    greedy = [r for r in recs if r["kind"] == "greedy"]
    sampled = [r for r in recs if r["kind"] == "sampled"]
    assert len(greedy) == 8 and len(sampled) == 32
    # the hand count: the reward function applied again to the written completions
    hand = starts_with_vowel(None, [r["completion"] for r in greedy])
    assert summary["accuracy"] == pytest.approx(sum(hand) / 8)
    correct = [0] * 8
    for r, v in zip(sampled, starts_with_vowel(None, [r["completion"] for r in sampled])):
        correct[r["group"]] += int(v)
    assert summary["pass@1"] == pytest.approx(sum(c / 4 for c in correct) / 8)
    assert summary["pass@4"] == pytest.approx(sum(c > 0 for c in correct) / 8)
    assert summary["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in correct) / 8)
    assert summary["pass@4"] >= summary["pass@2"] >= summary["pass@1"]
    assert 0 < summary["pass@4"] and summary["pass@1"] < 1  # the counts above are not vacuous
    # greedy outputs are what plain transformers greedy decoding gives
    model, tok = tiny_model()
    ids = tok(greedy[3]["prompt"], return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**ids, do_sample=False, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == greedy[3]["completion"]


def test_pass_at_k_estimator():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)


def test_checkpoint_and_final_give_the_same_outputs(tmp_path):
    from align import sft
    from align.config import SFTConfig

    base = save_tiny_model(tmp_path / "base")
    demos = write_jsonl(tmp_path / "d.jsonl", [{"prompt": r["prompt"], "completion": "a " + r["answer"]}
                                               for r in _rows(16)])
    run = tmp_path / "run"
    cfg = load_config(SFTConfig, None, [f"model.name={base}", f"data.path={demos}", f"train.output_dir={run}",
                                        "train.max_steps=2", "train.save_every=2", "train.lr=5e-2", "peft.r=4",
                                        "log.progress=false", "train.num_threads=1"])
    sft.run(cfg)
    prompts = write_jsonl(tmp_path / "p.jsonl", _rows(4))
    outs = []
    for target in (run / "checkpoints" / "step-2", run / "final", base):
        out = tmp_path / target.name
        assert main(["eval", str(target), f"data.path={prompts}", *REWARD, "rollout.max_new_tokens=6",
                     f"eval.output_dir={out}", "log.progress=false"]) == 0
        outs.append([r["completion"] for r in _outputs(out)])
    assert outs[0] == outs[1]  # the checkpoint's weights rebuilt on the run's base = the saved adapter
    assert outs[1] != outs[2]  # and training changed what the model says


def test_reward_model_pairwise_accuracy_equals_the_stage_eval(tmp_path):
    from align import rm

    train = write_jsonl(tmp_path / "train.jsonl", _pairs(48, 0))
    evals = write_jsonl(tmp_path / "eval.jsonl", _pairs(24, 1))
    run = tmp_path / "run"
    cfg = load_config(rm.RMConfig, None, [
        f"data.path={train}", f"data.eval_path={evals}", f"train.output_dir={run}", "train.max_steps=6",
        "train.batch_size=8", "train.lr=5e-3", "log.progress=false", "peft.r=8", "train.warmup_ratio=0"])
    model, tok = _score_model(tmp_path)
    stage = rm.run(cfg, model, tok).result.eval_history[-1]["eval/accuracy"]
    out = tmp_path / "out"
    assert main(["eval", str(run), "eval.task=reward_model", f"pairs.path={evals}", f"eval.output_dir={out}",
                 "log.progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(stage, abs=1e-6)
    recs = _outputs(out)
    assert len(recs) == 24 and sum(r["correct"] for r in recs) / 24 == pytest.approx(summary["accuracy"])


def test_preference_accuracy_equals_dpo_eval(tmp_path):
    from align import preference

    base = save_tiny_model(tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(32, 0))
    evals = write_jsonl(tmp_path / "eval.jsonl", _pairs(16, 1))
    run = tmp_path / "run"
    cfg = load_config(preference.PreferenceConfig, None, [
        f"model.name={base}", f"data.path={train}", f"data.eval_path={evals}", f"train.output_dir={run}",
        "train.max_steps=4", "train.batch_size=8", "train.lr=5e-3", "log.progress=false", "peft.r=8",
        "algorithm.name=dpo", "algorithm.params={beta: 0.1}"])
    ev = preference.run(cfg).result.eval_history[-1]
    out = tmp_path / "out"
    assert main(["eval", str(run / "final"), "eval.task=preference", f"pairs.path={evals}", "eval.beta=0.1",
                 f"eval.reference={base}", f"eval.output_dir={out}", "log.progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(ev["eval/rewards/accuracy"], abs=1e-6)
    assert summary["margin"] == pytest.approx(ev["eval/rewards/margins"], rel=1e-3, abs=1e-5)


def test_lm_eval_local_task_matches_hand_loglikelihoods(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    rows = [{"question": f"Is {i} even?", "choices": [" yes", " no"], "label": i % 2} for i in range(6)]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy_mc.yaml").write_text(
        f"task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n")
    out = tmp_path / "out"
    assert main(["eval", str(model_dir), "data.path=", "eval.lm_eval_tasks=[toy_mc]",
                 f"eval.lm_eval_include={tmp_path / 'tasks'}", f"eval.output_dir={out}", "log.progress=false"]) == 0
    acc = json.loads((out / "summary.json").read_text())["lm_eval/toy_mc/acc"]
    model, tok = tiny_model()
    hits = 0
    with torch.no_grad():
        for r in rows:
            ctx = tok(r["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in r["choices"]:
                cont = tok(choice, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0, :-1], -1)
                scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
            hits += int(max(range(2), key=scores.__getitem__) == r["label"])
    assert acc == pytest.approx(hits / len(rows))


def test_sft_generation_eval_every_n_steps_equals_align_eval(tmp_path):
    from align import sft
    from align.config import SFTConfig
    from align.tracking import read_metrics

    base = save_tiny_model(tmp_path / "base")
    demos = write_jsonl(tmp_path / "d.jsonl", [{"prompt": r["prompt"], "completion": "a " + r["answer"]}
                                               for r in _rows(16)])
    prompts = write_jsonl(tmp_path / "p.jsonl", _rows(6))
    run = tmp_path / "run"
    cfg = load_config(SFTConfig, None, [
        f"model.name={base}", f"data.path={demos}", f"train.output_dir={run}", "train.max_steps=3", "train.lr=5e-2",
        "peft.r=4", "log.progress=false", "train.num_threads=1", "generate_eval.every=2",
        f"generate_eval.data.path={prompts}", "generate_eval.max_new_tokens=6", "generate_eval.log_samples=4",
        *[f"generate_eval.{kv}" for kv in REWARD]])
    sft.run(cfg)
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and after the last
    assert len((run / "samples" / "step_00002.jsonl").read_text().splitlines()) == 4
    out = tmp_path / "out"
    assert main(["eval", str(run), f"data.path={prompts}", *REWARD, "rollout.max_new_tokens=6",
                 f"eval.output_dir={out}", "log.progress=false"]) == 0
    assert json.loads((out / "summary.json").read_text())["accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])
    written = [json.loads(x)["completion"] for x in (run / "samples" / "step_00003.jsonl").read_text().splitlines()]
    assert written == [r["completion"] for r in _outputs(out)][:4]
