"""The preference stage on tiny models: reference log-probs (precomputed = on the fly = a plain
per-sequence computation), length bucketing, each algorithm learning a learnable set, every PEFT
method starting from the reference, exact resume with the cached reference, KTO's mismatched
pairs, and config errors that name the bad key."""
import copy
import math
import random

import pytest


import torch

from align import preference as P
from align import preference_data as PD
from align.preference_logps import sequence_logps
from align.preference_reference import attach_reference, reference_context
from align.config import ConfigError, load_config
from align.tiny import tiny_model
from align.tracking import read_metrics
from align.tuning import apply_tuning
from conftest import write_jsonl

WORDS = "cat dog red blue green yes no the quick fox lazy".split()
MARKERS = [("good", "bad"), ("yes", "no"), ("happy", "sad"), ("like", "not"), ("red", "blue"), ("cat", "dog")]


def _pairs(n, seed):
    """Chosen answers start with the first word of a marker pair, rejected with the second:
    learnable from one token, while a random model's preferences over the six pairs are six
    independent coin flips (about 50 % before training). Prompts and tails vary in length, so
    batches need padding."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good, bad = MARKERS[i % len(MARKERS)]
        q = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
        tail = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        rows.append({"prompt": f"Tell me about {q}", "chosen": f"{good} {tail}", "rejected": f"{bad} {tail}"})
    return rows


def _cfg(tmp_path, *overrides, train_rows=96):
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(train_rows, 0))
    evals = write_jsonl(tmp_path / "eval.jsonl", _pairs(36, 1))
    return load_config(P.PreferenceConfig, None, [
        f"data.path={train}", f"data.eval_path={evals}", f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=30", "train.batch_size=8", "train.lr=5e-3", "train.warmup_ratio=0", "log.progress=false",
        "log.plot=false", "peft.r=8", *overrides])


def _plain_logps(model, prompt, completion):
    """Summed completion log-prob of one sequence, the textbook way: full logits, log_softmax, loop."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))


def _eval_metrics(model, cfg, tok, examples):
    """Eval metrics of `model` on `examples` through the stage's own collate and loss."""
    algo = P.build_algorithm(cfg.algorithm)
    batch = PD.collate(examples, tok.pad_token_id, kto=cfg.algorithm.name == "kto")
    with torch.no_grad():
        _, m = P.preference_loss(model, batch, algo, cfg.algorithm.reference)
    return {k: v / len(examples) for k, v in m.items()}


# ----------------------------------------------------------------------------- reference log-probs
@pytest.mark.parametrize("share", [True, False])
def test_precomputed_reference_equals_on_the_fly_and_plain(tmp_path, share):
    cfg = _cfg(tmp_path, "peft.method=lora")
    base, tok = tiny_model()
    plain = copy.deepcopy(base)
    rows = _pairs(20, 3)
    examples, _ = PD.encode_examples(rows, cfg.data, tok, kto=False, block=8)
    model = apply_tuning(base, cfg.peft)
    with torch.no_grad():  # a trained-looking adapter, so that "adapter disabled" is not a no-op
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    # precomputed (length-sorted batches, one cache file), loaded back from the cache
    assert not attach_reference(model, examples, tok.pad_token_id, tmp_path / "cache", "key", share_prompt=share)
    pre = torch.tensor([ex.ref for ex in examples])  # (20, 2)
    again = copy.deepcopy(examples)
    assert attach_reference(model, again, tok.pad_token_id, tmp_path / "cache", "key", share_prompt=share)
    assert torch.equal(torch.tensor([ex.ref for ex in again]), pre)
    # on the fly: the training collate (bucketed chunks) with the adapter disabled
    batch = PD.collate([dataclass_without_ref(ex) for ex in examples], tok.pad_token_id, kto=False, share_prompt=share)
    assert {type(ch) for ch in batch["chunks"]} == {PD.PairChunk if share else PD.Chunk}
    with torch.no_grad(), reference_context(model):
        fly, lengths = sequence_logps(model, batch["chunks"])  # (40,)
    assert torch.allclose(fly, torch.cat([pre[:, 0], pre[:, 1]]), atol=1e-5, rtol=0)
    # the textbook computation on the untouched base model, one sequence at a time
    want = torch.tensor([[_plain_logps(plain, *ex.seqs[k]) for k in range(2)] for ex in examples])
    assert torch.allclose(pre, want, atol=1e-5, rtol=0)
    assert lengths.tolist() == [len(ex.seqs[0][1]) for ex in examples] + [len(ex.seqs[1][1]) for ex in examples]
    # the adapter is really on in training: the policy's log-probs differ from the reference
    with torch.no_grad():
        policy, _ = sequence_logps(model, batch["chunks"])
    assert (policy - fly).abs().max() > 1e-2


def dataclass_without_ref(ex):
    """A copy of an example with no precomputed reference (so the collate carries none)."""
    return PD.PrefExample(ex.seqs, ex.label, None)


def test_shared_prompt_forward_matches_whole_sequences_in_value_and_gradient():
    """One prompt forward whose key/value cache serves both completions computes exactly what two
    whole-sequence forwards compute, gradients included (they flow back through the cache)."""
    model, tok = tiny_model()
    cfg = _cfg_data()
    rows = _pairs(12, 5) + [{"prompt": "", "chosen": "good", "rejected": "bad"}]  # an empty prompt: plain chunk
    examples, _ = PD.encode_examples(rows, cfg, tok, kto=False, block=8)
    grads = []
    for share in (True, False):
        model.zero_grad()
        batch = PD.collate(examples, tok.pad_token_id, kto=False, share_prompt=share)
        logps, lengths = sequence_logps(model, batch["chunks"])
        (logps * torch.linspace(0.5, 1.5, len(logps))).sum().backward()
        grads.append((logps.detach(), lengths, {n: p.grad.clone() for n, p in model.named_parameters()}))
        if share:
            assert sum(isinstance(ch, PD.Chunk) for ch in batch["chunks"]) == 1  # the empty-prompt pair
            shared_tokens = batch["num_tokens"]
        else:
            assert batch["num_tokens"] > shared_tokens  # the prompts went through twice
    (a, la, ga), (b, lb, gb) = grads
    assert torch.allclose(a, b, atol=1e-5, rtol=0) and torch.equal(la, lb)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


def _cfg_data():
    return PD.PreferenceDataConfig(template="none")  # raw text: an empty prompt stays empty


def test_length_buckets_group_by_length_and_cover_every_sequence():
    # overhead 0: padding alone decides; two short and two long sequences form two groups
    assert PD.length_buckets([10, 2, 10, 2], overhead=0) == [[0, 2], [1, 3]]
    # a large per-forward overhead keeps them in one group (16 + 3 * overhead > 40 + overhead)
    assert PD.length_buckets([10, 2, 10, 2], overhead=100) == [[0, 2, 1, 3]]
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(16)]
    groups = PD.length_buckets(lengths)
    assert sorted(i for g in groups for i in g) == list(range(16))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert sum(lengths) <= padded < 16 * max(lengths)


# ----------------------------------------------------------------------------- algorithms learn
@pytest.mark.parametrize("name,params", [
    ("dpo", []), ("dpo", ["algorithm.params.loss_type=ipo"]), ("orpo", ["algorithm.params.beta=0.5"]),
    ("simpo", []), ("kto", []),
])
def test_each_algorithm_raises_reward_accuracy(tmp_path, name, params):
    cfg = _cfg(tmp_path, f"algorithm.name={name}", "peft.method=lora", "train.max_steps=12", *params)
    model, tok = tiny_model()
    evals, _ = PD.encode_examples(_pairs(36, 1), cfg.data, tok, kto=False, block=8)
    if name in ("orpo", "simpo"):  # reference-free: the random model's own preference, about 50 %
        before = _eval_metrics(model, cfg, tok, evals)["rewards/accuracy"]
        assert 0.2 <= before <= 0.8, before
    out = P.run(cfg, model, tok)
    ev = out.result.eval_history[-1]
    for key in ("eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins",
                "eval/logps/chosen", "eval/logps/rejected", "eval/rewards/accuracy"):
        assert math.isfinite(ev[key]), key
    train_keys = set(out.result.history[-1])
    assert {"loss", "rewards/accuracy", "rewards/margins", "logps/chosen", "logps/rejected"} <= train_keys
    if name == "kto":
        # KTO trains on unpaired rows; judge it on the pairs: implicit reward (policy - reference)
        for ex in evals:
            ex.ref = None
        batch = PD.collate(evals, tok.pad_token_id, kto=False)
        with torch.no_grad():
            lp, _ = sequence_logps(out.model, batch["chunks"])
            with reference_context(out.model):
                ref, _ = sequence_logps(out.model, batch["chunks"])
        r = lp - ref
        acc = (r[:36] > r[36:]).float().mean().item()
        assert acc >= 0.9, acc
        assert ev["eval/rewards/chosen"] > ev["eval/rewards/rejected"]
    else:
        assert ev["eval/rewards/accuracy"] >= 0.9, ev
        assert ev["eval/rewards/margins"] > 0
    if name in ("orpo", "simpo"):
        assert ev["eval/rewards/accuracy"] > before + 0.2
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method,reference", [
    ("lora", "precompute"), ("dora", "adapter"), ("ia3", "precompute"),
    ("bitfit", "model"), ("freeze", "precompute"), ("full", "precompute"),
    ("prefix", "adapter"), ("prompt", "precompute"), ("ptuning", "adapter"), ("adalora", "precompute"),
])
def test_every_peft_method_trains_from_the_reference(tmp_path, method, reference):
    cfg = _cfg(tmp_path, f"peft.method={method}", f"algorithm.reference={reference}", "train.max_steps=3",
               "train.batch_size=4", "peft.freeze_trainable_layers=1", "peft.num_virtual_tokens=4", "peft.adalora_target_r=4",
               "data.eval_path=null", train_rows=12)
    model, tok = tiny_model()
    out = P.run(cfg, model, tok)
    losses = [h["loss"] for h in out.result.history]
    assert all(math.isfinite(x) for x in losses)
    if method not in ("prefix", "prompt", "ptuning"):
        # these methods start as the base model: policy == reference, so the first DPO loss is log 2
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5), losses
        assert out.result.history[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert losses[-1] != losses[0]  # the trainable parameters moved


# ----------------------------------------------------------------------------- resume, cache
def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_reaches_the_same_parameters_and_reuses_the_reference(tmp_path):
    common = ["train.max_steps=6", "train.save_every=2", "train.batch_size=4", "train.grad_accum=2",
              "algorithm.params.beta=0.5"]
    model, tok = tiny_model()
    want = _params(P.run(_cfg(tmp_path / "a", *common), model, tok).model)

    class Crash(Exception):
        pass

    def crash_at_4(step, record):
        if step == 4:
            raise Crash

    model, tok = tiny_model()
    with pytest.raises(Crash):
        P.run(_cfg(tmp_path / "b", *common), model, tok, callbacks=[crash_at_4])
    model, tok = tiny_model()
    resumed = P.run(_cfg(tmp_path / "b", *common, "train.resume=true"), model, tok)
    assert resumed.reference_cached  # the precomputed reference came from the run directory
    got = _params(resumed.model)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(want[n], got[n]), n
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- KTO data
def test_kto_mismatched_pairs_follow_trl_and_pairs_unpair(tmp_path):
    _, tok = tiny_model()
    cfg = _cfg(tmp_path, "algorithm.name=kto", "data.template=none")
    rows = [{"prompt": f"p{i} ", "completion": f"c{i}", "label": i % 2 == 0} for i in range(5)]
    ex, _ = PD.encode_kto(rows, cfg.data, tok, block=2)

    def text(ids):
        return tok.decode(ids)

    # blocks of 2 in data order: [0, 1], [2, 3], [4]; row i's completion with row i+1's prompt
    assert [(text(e.seqs[1][0]), text(e.seqs[1][1])) for e in ex] == [
        ("p1 ", "c0<|im_end|>"), ("p0 ", "c1<|im_end|>"), ("p3 ", "c2<|im_end|>"), ("p2 ", "c3<|im_end|>"),
        ("p4 ", "c4<|im_end|>")]
    assert [e.label for e in ex] == [True, False, True, False, True]
    assert [text(e.seqs[0][1]) for e in ex] == [f"c{i}<|im_end|>" for i in range(5)]
    pairs = [{"prompt": "a ", "chosen": "good", "rejected": "bad"}, {"prompt": "b ", "chosen": "yes", "rejected": "no"}]
    ex, _ = PD.encode_kto(pairs, cfg.data, tok, block=8)
    assert [(text(e.seqs[0][1]), e.label) for e in ex] == [
        ("good<|im_end|>", True), ("yes<|im_end|>", True), ("bad<|im_end|>", False), ("no<|im_end|>", False)]
    with pytest.raises(Exception, match=r"row 1: missing field\(s\) \['label'\]"):
        PD.encode_kto([{"prompt": "a", "completion": "b"}], cfg.data, tok, block=2)


# ----------------------------------------------------------------------------- config errors
def test_bad_algorithm_keys_and_values_are_named(tmp_path):
    model, tok = tiny_model()
    with pytest.raises(ConfigError, match=r"algorithm\.params\.betta'; did you mean 'algorithm\.params\.beta'"):
        P.run(_cfg(tmp_path, "algorithm.params.betta=0.1"), model, tok)
    with pytest.raises(ConfigError, match=r"algorithm\.params\.gamma.*valid here: beta, loss_type"):
        P.run(_cfg(tmp_path, "algorithm.params.gamma=1.0"), model, tok)  # a SimPO field given to DPO
    with pytest.raises(ConfigError, match=r"unknown DPO loss_type 'sigmoidd'"):
        P.run(_cfg(tmp_path, "algorithm.params.loss_type=sigmoidd"), model, tok)
    with pytest.raises(ConfigError, match=r"algorithm\.params\.beta: got 'high'"):
        P.run(_cfg(tmp_path, "algorithm.params.beta=high"), model, tok)
    with pytest.raises(ConfigError, match=r"algorithm\.reference=adapter needs a peft adapter"):
        P.run(_cfg(tmp_path, "algorithm.reference=adapter", "peft.method=full"), model, tok)
    with pytest.raises(ConfigError, match=r"peft\.adalora_target_r=8; the target must be smaller than r"):
        P.run(_cfg(tmp_path, "peft.method=adalora"), model, tok)  # r=8: nothing to prune
    with pytest.raises(ConfigError, match=r"algorithm\.name"):
        load_config(P.PreferenceConfig, None, ["algorithm.name=grpo"])
    with pytest.raises(ConfigError, match=r"algorithm\.name='simppo'; did you mean 'simpo'\? .*dpo, kto, orpo, simpo"):
        load_config(P.PreferenceConfig, None, ["algorithm.name=simppo"])
