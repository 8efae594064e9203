"""The SFT stage on tiny models: loss falls, exact resume, packing, the run directory, bad input."""
import json

import pytest
import torch

from align import sft
from align.checkpoint import ResumeError
from align.config import ConfigError, SFTConfig, load_config
from align.data import DataError
from align.models import ModelNotFoundError, load_tokenizer
from align.config import ModelConfig
from align.tiny import tiny_model
from align.tracking import read_metrics
from conftest import write_jsonl


def _cfg(tmp_path, data_path, *overrides):
    return load_config(SFTConfig, None, [
        f"data.path={data_path}", f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8",
        "train.lr=3e-3", "train.max_steps=12", "log.progress=false", "peft.r=8", *overrides])


@pytest.mark.parametrize("method,ratio,final_file", [
    ("full", 0.6, "final/model.safetensors"),  # a random tiny model learns the pattern fast
    ("lora", 0.9, "final/adapter_model.safetensors"),  # rank 8 on hidden 64 learns less, but learns
])
def test_sft_loss_falls_and_run_dir_is_complete(tmp_path, sft_rows, method, ratio, final_file):
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    model, tok = tiny_model()
    out = sft.run(_cfg(tmp_path, path, "data.eval_fraction=0.2", "train.max_steps=25", "train.warmup_ratio=0",
                       f"peft.method={method}", "train.lr=5e-3"), model, tok)
    losses = [r["loss"] for r in out.result.history]
    assert sum(losses[-3:]) / 3 < ratio * sum(losses[:3]) / 3, losses
    ev = out.result.eval_history[-1]["eval/loss"]
    assert ev < losses[0]
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", final_file, "final/tokenizer.json",
              "plots/loss.png"):
        assert (run / f).exists(), f
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 26))
    assert all(r["tokens_per_s"] > 0 for r in recs if "loss" in r)


def test_loraplus_moves_the_b_matrices_ratio_times_as_far(tmp_path, sft_rows):
    """LoRA+ (peft.loraplus_lr_ratio): AdamW's first step moves every parameter with a gradient by
    about lr (its update is m / sqrt(v) = sign(g)); the B matrices start at 0, so after one step
    their largest entry is lr, or ratio x lr with LoRA+."""
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    largest = {}
    for ratio in (0, 16):
        model, tok = tiny_model()
        out = sft.run(_cfg(tmp_path / str(ratio), path, "train.max_steps=1", "train.warmup_ratio=0",
                           "train.scheduler=constant", "train.lr=1e-4", f"peft.loraplus_lr_ratio={ratio}"), model, tok)
        largest[ratio] = max(p.abs().max().item() for n, p in out.model.named_parameters() if "lora_B" in n)
    assert largest[0] == pytest.approx(1e-4, rel=1e-3)
    assert largest[16] == pytest.approx(16e-4, rel=1e-3)


def test_loraplus_needs_a_lora_method(tmp_path, sft_rows):
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    model, tok = tiny_model()
    with pytest.raises(ConfigError, match="peft.loraplus_lr_ratio"):
        sft.run(_cfg(tmp_path, path, "peft.method=full", "peft.loraplus_lr_ratio=16"), model, tok)


def test_completion_only_loss_masks_the_prompt(tmp_path):
    _, tok = tiny_model()
    from align.config import DataConfig
    from align.data import encode_sft

    rows = [{"prompt": "What is 1 + 2?", "completion": "3"}]
    (ex,), _ = encode_sft(rows, DataConfig(), tok)
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ex.loss_mask[:prompt_len] == [0] * prompt_len
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert tok.decode(trained).startswith("3<|im_end|>")
    (full,), _ = encode_sft(rows, DataConfig(completion_only_loss=False), tok)
    assert all(full.loss_mask)


def test_messages_train_on_every_assistant_turn():
    _, tok = tiny_model()
    from align.config import DataConfig
    from align.data import encode_sft

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "no"}]
    (ex,), _ = encode_sft([{"messages": msgs}], DataConfig(), tok)
    assert ex.input_ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained.replace("\n", "") == "yes<|im_end|>no<|im_end|>"


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_reaches_the_same_parameters(tmp_path, sft_rows, method):
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    common = ["train.max_steps=6", "train.save_every=2", "peft.dropout=0.1", f"peft.method={method}",
              "train.grad_accum=2", "train.batch_size=4"]
    model, tok = tiny_model()
    full = sft.run(_cfg(tmp_path / "a", path, *common), model, tok)
    want = _params(full.model)

    class Crash(Exception):
        pass

    def crash_at_4(step, record):
        if step == 4:
            raise Crash

    model, tok = tiny_model()
    with pytest.raises(Crash):
        sft.run(_cfg(tmp_path / "b", path, *common), model, tok, callbacks=[crash_at_4])
    model, tok = tiny_model()
    resumed = sft.run(_cfg(tmp_path / "b", path, *common, "train.resume=true"), model, tok)
    got = _params(resumed.model)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(want[n], got[n]), n
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_a_different_config_says_what_differs(tmp_path, sft_rows):
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    model, tok = tiny_model()
    sft.run(_cfg(tmp_path, path, "train.max_steps=2"), model, tok)
    model, tok = tiny_model()
    with pytest.raises(ResumeError, match=r"train.lr: checkpoint 0.003, now 0.001"):
        sft.run(_cfg(tmp_path, path, "train.max_steps=3", "train.lr=1e-3", "train.resume=true"), model, tok)


def test_packing_blocks_attention_between_examples(tmp_path):
    """A packed row gives each example the same logits it gets alone."""
    from align.data import Encoded, collate

    model, tok = tiny_model()
    model.eval()
    a = Encoded(tok("What is 1 + 2? 3")["input_ids"], [1] * 9)
    b = Encoded(tok("Tom has 5 apples")["input_ids"], [1] * 5)
    a.loss_mask = [1] * len(a.input_ids)
    b.loss_mask = [1] * len(b.input_ids)
    packed = collate([[a, b]], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"]).logits[0]
        alone = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    n = len(a.input_ids)
    assert torch.allclose(logits[n:n + len(b.input_ids)], alone, atol=1e-5)


def test_packing_run_trains(tmp_path, sft_rows):
    path = write_jsonl(tmp_path / "d.jsonl", sft_rows)
    model, tok = tiny_model()
    out = sft.run(_cfg(tmp_path, path, "data.packing=true", "data.max_length=128", "train.batch_size=2",
                       "train.max_steps=8"), model, tok)
    assert out.result.history[-1]["loss"] < out.result.history[0]["loss"]


# ----------------------------------------------------------------------------- bad input
def test_malformed_jsonl_names_file_and_line(tmp_path, sft_rows):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(sft_rows[0]) + "\n" + json.dumps(sft_rows[1]) + "\n{not json\n")
    model, tok = tiny_model()
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        sft.run(_cfg(tmp_path, p), model, tok)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_row_without_required_fields_names_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "only"}])
    model, tok = tiny_model()
    with pytest.raises(DataError, match=r"d.jsonl:2: missing or empty field\(s\) \['completion'\]"):
        sft.run(_cfg(tmp_path, path), model, tok)


def test_empty_dataset_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    model, tok = tiny_model()
    with pytest.raises(DataError, match="empty"):
        sft.run(_cfg(tmp_path, p), model, tok)


def test_overlong_examples_are_truncated_or_skipped_and_counted(tmp_path):
    _, tok = tiny_model()
    from align.config import DataConfig
    from align.data import encode_sft

    rows = [{"prompt": "hi", "completion": "ok"}, {"prompt": "hi", "completion": "word " * 80},
            {"prompt": "long " * 100, "completion": "x"}]
    out, stats = encode_sft(rows, DataConfig(max_length=40, overlong="truncate"), tok)
    assert len(out) == 2 and stats.truncated == 2 and stats.skipped == 1
    assert all(len(e.input_ids) <= 40 for e in out)
    out, stats = encode_sft(rows, DataConfig(max_length=40, overlong="skip"), tok)
    assert len(out) == 1 and stats.skipped == 2 and stats.reasons == {"too long": 2}
    with pytest.raises(DataError, match="no usable example"):
        encode_sft(rows[2:], DataConfig(max_length=40), tok)


def test_rows_without_the_needed_fields_are_named_with_file_line_and_shapes(tmp_path, sft_rows):
    """The issue's case: rows in another shape stop the run naming the file, the 1-based line (blank
    lines counted), the missing fields and the shapes SFT accepts, not 'no usable example left'."""
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in sft_rows[:3]] + ["", json.dumps({"question": "1 + 1?", "answer": "2"})]
    path.write_text("\n".join(lines + [json.dumps(r) for r in sft_rows[3:]]) + "\n")
    model, tok = tiny_model()
    with pytest.raises(DataError) as info:
        sft.run(_cfg(tmp_path, path, "data.eval_fraction=0.2"), model, tok)  # the split reorders rows
    msg = str(info.value)
    assert f"{path}:5: missing or empty field(s) ['prompt', 'completion']" in msg, msg
    assert "{'messages': [{'role': ..., 'content': ...}, ...]} or {'prompt': ..., 'completion': ...}" in msg
    assert "this row has: ['answer', 'question']" in msg and "no usable example" not in msg


def test_null_or_empty_fields_are_missing_and_null_columns_are_absent():
    from align.config import DataConfig
    from align.data import encode_sft

    _, tok = tiny_model()
    for bad in ({"prompt": "hi", "completion": None}, {"prompt": "hi", "completion": ""}, {"prompt": None, "completion": "x"}):
        with pytest.raises(DataError, match=r"data row 2: missing or empty field"):
            encode_sft([{"prompt": "a", "completion": "b"}, bad], DataConfig(template="none"), tok)
    # Parquet and `datasets` rows carry every column, None where a row has none: not a conversation
    (ex,), _ = encode_sft([{"messages": None, "prompt": "a", "completion": "b"}], DataConfig(), tok)
    assert sum(ex.loss_mask) > 0


def test_missing_model_path_is_named():
    with pytest.raises(ModelNotFoundError, match="/no/such/model does not exist"):
        load_tokenizer(ModelConfig(name="/no/such/model"))


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'"):
        load_config(SFTConfig, None, ["train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"did you mean 'train.max_steps'"):
        load_config(SFTConfig, None, ["train.max_step=4"])
    with pytest.raises(ConfigError, match=r"peft.method: got 'lorra', which is not one of 'full'"):
        load_config(SFTConfig, None, ["peft.method=lorra"])
    with pytest.raises(ConfigError, match=r"train.batch_size: got 'eight', which is not int"):
        load_config(SFTConfig, None, ["train.batch_size=eight"])
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1e-4\nmodle:\n  name: x\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'modle'; did you mean 'model'"):
        load_config(SFTConfig, y)
    cfg = load_config(SFTConfig, None, ["train.lr=1e-4", "peft.target_modules=q_proj"])
    assert cfg.train.lr == 1e-4 and cfg.peft.target_modules == ["q_proj"]
