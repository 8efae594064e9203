"""The reward-model stage on a tiny model: held-out pairwise accuracy rises on a learnable set,
the HH-RLHF transcript shape splits at the shared prompt, and the saved model scores as a reward."""
import json
import random

import pytest
import torch

from align import rm
from align.config import DataConfig, load_config
from align.pairs import encode_pairs, split_transcripts
from align.tiny import tiny_model
from conftest import write_jsonl

WORDS = "cat dog red blue green yes no the quick fox lazy".split()


MARKERS = [("good", "bad"), ("yes", "no"), ("happy", "sad"), ("like", "not"), ("red", "blue"), ("cat", "dog")]


def _pairs(n, seed):
    """Chosen answers start with the first word of a marker pair, rejected with the second:
    learnable from one token, while a random model's preferences over the six pairs are six
    independent coin flips (held-out accuracy near 50 % before training)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good, bad = MARKERS[i % len(MARKERS)]
        q = " ".join(rng.choices(WORDS, k=4))
        tail = " ".join(rng.choices(WORDS, k=3))
        rows.append({"prompt": f"Tell me about {q}", "chosen": f"{good} {tail}", "rejected": f"{bad} {tail}"})
    return rows


def _score_model(tmp_path=None):
    """A tiny one-output classifier; saved and re-loaded when `tmp_path` is given, so a saved
    adapter knows where its base model lives."""
    from transformers import LlamaForSequenceClassification

    base, tok = tiny_model()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(base.config.__class__(**{**base.config.to_dict(), "num_labels": 1}))
    if tmp_path is not None:
        model.save_pretrained(tmp_path / "base")
        model = LlamaForSequenceClassification.from_pretrained(tmp_path / "base")
    return model, tok


def test_rm_training_raises_heldout_pairwise_accuracy(tmp_path, method="lora"):
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(96, 0))
    evals = write_jsonl(tmp_path / "eval.jsonl", _pairs(32, 1))
    cfg = load_config(rm.RMConfig, None, [
        f"data.path={train}", f"data.eval_path={evals}", f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=30", "train.batch_size=8", "train.lr=5e-3", "log.progress=false",
        f"peft.method={method}", "peft.r=8", "train.warmup_ratio=0"])
    model, tok = _score_model(tmp_path)
    pairs, _ = encode_pairs(_pairs(32, 1), cfg.data, tok)
    batch = rm._collate(pairs, tok.pad_token_id)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        r = rm.sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    acc_before = (r[:32] > r[32:]).float().mean().item()
    loss_before = -torch.nn.functional.logsigmoid(r[:32] - r[32:]).mean().item()
    out = rm.run(cfg, model, tok)
    acc_after = out.result.eval_history[-1]["eval/accuracy"]
    loss_after = out.result.eval_history[-1]["eval/loss"]
    assert acc_after >= 0.95 and acc_after > acc_before, (acc_before, acc_after)
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert out.result.eval_history[-1]["eval/margin"] > 0
    # The saved model loads as a reward function and prefers the chosen answers.
    scorer = rm.RewardModelScorer(tmp_path / "run" / "final")
    prompts = [tok.apply_chat_template([{"role": "user", "content": "Tell me about cat dog"}],
                                       add_generation_prompt=True, tokenize=False)] * 2
    scores = scorer(prompts * 3, ["good red fox", "bad red fox", "yes red fox", "no red fox",
                                  "happy red fox", "sad red fox"])
    assert scores[0] > scores[1] and scores[2] > scores[3] and scores[4] > scores[5]
    # The same model through the rewards registry, served by a Ray actor, scores identically.
    import rewards
    from align.actors import init_ray

    init_ray(num_cpus=4)  # shared by the session's Ray tests (conftest shuts it down)
    remote = rewards.get("reward_model", path=str(tmp_path / "run" / "final"), ray_actor=True)
    try:
        got = remote(prompts * 3, ["good red fox", "bad red fox", "yes red fox", "no red fox",
                                   "happy red fox", "sad red fox"])
        assert got == pytest.approx(scores, abs=1e-5)
    finally:
        remote.close()


def test_bt_margin_column_is_used(tmp_path):
    rows = [dict(r, margin=2.0) for r in _pairs(4, 0)]
    _, tok = tiny_model()
    pairs, _ = encode_pairs(rows, DataConfig(), tok)
    assert all(p.margin == 2.0 for p in pairs)
    model, tok = _score_model()
    model.config.pad_token_id = tok.pad_token_id
    batch = rm._collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        with_margin, _ = rm.rm_loss(model, dict(batch), rm.RewardConfig())
        without, _ = rm.rm_loss(model, dict(batch), rm.RewardConfig(use_margin=False))
        r = rm.sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    d = r[:4] - r[4:]
    assert torch.allclose(with_margin, -torch.nn.functional.logsigmoid(d - 2.0).sum(), atol=1e-5)
    assert torch.allclose(without, -torch.nn.functional.logsigmoid(d).sum(), atol=1e-5)


def test_hh_rlhf_transcripts_split_at_the_shared_prompt():
    chosen = "\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour and water."
    rejected = "\n\nHuman: how do I bake bread?\n\nAssistant: Move away."
    p, c, r = split_transcripts(chosen, rejected)
    assert p == "\n\nHuman: how do I bake bread?\n\nAssistant:"
    assert (c, r) == (" Mix flour and water.", " Move away.")
    _, tok = tiny_model()
    (pair,), _ = encode_pairs([{"chosen": chosen, "rejected": rejected}], DataConfig(), tok)
    assert tok.decode(pair.prompt_ids) == p
    assert tok.decode(pair.chosen_ids) == " Mix flour and water.<|im_end|>"


def test_chat_message_pairs_share_the_prompt():
    _, tok = tiny_model()
    conv = [{"role": "user", "content": "hi"}]
    row = {"chosen": conv + [{"role": "assistant", "content": "yes"}],
           "rejected": conv + [{"role": "assistant", "content": "no"}]}
    (pair,), _ = encode_pairs([row], DataConfig(), tok)
    assert tok.decode(pair.prompt_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(pair.chosen_ids) == "yes<|im_end|>\n"


def test_pair_rows_missing_fields_are_named():
    from align.data import DataError

    _, tok = tiny_model()
    with pytest.raises(DataError, match=r"data row 1: missing or empty field\(s\) \['rejected'\]"):
        encode_pairs([{"prompt": "a", "chosen": "b"}], DataConfig(), tok)
    with pytest.raises(DataError, match=r"row 2: missing or empty field\(s\) \['chosen'\]"):
        encode_pairs([{"chosen": "a", "rejected": "b"}, {"chosen": None, "rejected": "b"}], DataConfig(), tok)


def test_rm_stage_names_the_file_line_fields_and_shapes_of_a_bad_row(tmp_path):
    """A row without 'rejected' on line 5 of the file (after a blank line and an eval split that
    reorders rows) is reported by file and line, with the missing field and the accepted shapes."""
    from align.data import DataError

    rows = _pairs(6, 0)
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in rows[:3]] + [""] + [json.dumps({"prompt": "q", "chosen": "a", "answer": "b"})]
    path.write_text("\n".join(lines + [json.dumps(r) for r in rows[3:]]) + "\n")
    cfg = load_config(rm.RMConfig, None, [f"data.path={path}", f"train.output_dir={tmp_path / 'run'}",
                                          "log.progress=false", "data.eval_fraction=0.3"])
    model, tok = _score_model()
    with pytest.raises(DataError) as info:
        rm.run(cfg, model, tok)
    msg = str(info.value)
    assert f"{path}:5: missing or empty field(s) ['rejected']" in msg, msg
    assert "{'prompt': ..., 'chosen': ..., 'rejected': ...}" in msg and "whole transcripts" in msg
    assert "this row has: ['answer', 'chosen', 'prompt']" in msg
