"""Every fine-tuning method: only the intended parameters change, frozen ones stay bit-identical,
adapters save and reload, merged exports reproduce the adapter model's logits."""
import pytest
import torch

from align.config import ConfigError, PeftConfig, SFTConfig, from_dict
from align.tiny import tiny_model
from align.tuning import apply_tuning, count_parameters, export_merged, fix_bnb_cpu_backward, merged_model

ALL_METHODS = ["full", "freeze", "bitfit", "lora", "qlora", "dora", "adalora", "ia3", "prefix", "prompt", "ptuning"]


def _build(method, **peft_kw):
    """A tiny model with `method` applied (QLoRA: the base re-loaded in 4-bit from a saved copy)."""
    model, tok = tiny_model(seed=0)
    cfg = PeftConfig(method=method, r=4, alpha=8, num_virtual_tokens=4, freeze_trainable_layers=1,
                     adalora_target_r=2, **peft_kw)
    if method == "qlora":
        import tempfile

        from transformers import AutoModelForCausalLM

        from align.config import ModelConfig
        from align.tuning import quantization_config

        d = tempfile.mkdtemp()
        model.save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(
            d, quantization_config=quantization_config(cfg, ModelConfig()), device_map={"": "cpu"})
    return apply_tuning(model, cfg, total_steps=20), tok


def _batch(tok):
    enc = tok(["What is 12 + 7? The answer is 19.", "Tom has 5 apples and buys 3 more."],
              return_tensors="pt", padding=True)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc


def _train(model, tok, steps=3, lr=1e-2):
    """A few AdamW steps on a fixed batch (AdaLoRA's rank allocation called as the trainer does)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = _batch(tok)
    model.train()
    for step in range(steps):
        model(**batch).loss.backward()
        opt.step()
        if hasattr(model, "base_model") and hasattr(model.base_model, "update_and_allocate"):
            model.base_model.update_and_allocate(step)
        opt.zero_grad()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_only_intended_parameters_change(method):
    model, tok = _build(method)
    trainable, total = count_parameters(model)
    assert 0 < trainable <= total
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_names = {n for n, p in model.named_parameters() if p.requires_grad}
    _train(model, tok)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    frozen_changed = changed - grad_names
    assert not frozen_changed, f"{method}: frozen parameters changed: {sorted(frozen_changed)[:5]}"
    # Every trainable tensor moved. AdaLoRA's pruning may zero some of E: those moved too.
    unchanged = grad_names - changed
    assert not unchanged, f"{method}: trainable parameters did not change: {sorted(unchanged)[:5]}"
    if method == "full":
        assert trainable == total
    if method in ("lora", "dora", "qlora", "adalora"):
        assert all("lora_" in n for n in grad_names)
    if method == "freeze":
        assert grad_names and all(n.startswith("model.layers.1.") for n in grad_names)
    if method == "bitfit":
        assert grad_names and all(n.endswith(".bias") for n in grad_names)


def test_bitfit_adds_zero_biases_that_preserve_the_base_model():
    base, tok = tiny_model(seed=0)
    batch = _batch(tok)
    with torch.no_grad():
        ref = base(**batch).logits
    model, _ = _build("bitfit")
    assert model.config.attention_bias and model.config.mlp_bias
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)


def test_qlora_every_lora_module_gets_a_gradient_after_eval_forward():
    """The AVX512-BF16 trap: an eval-mode no-grad forward must not cut gradients afterwards."""
    model, tok = _build("qlora")
    batch = _batch(tok)
    model.eval()
    with torch.no_grad():
        model(**batch)  # the rollout pattern: generate first ...
    model.train()
    model(**batch).loss.backward()  # ... then train
    # lora_B: lora_A's gradient is zero at the first step by construction (B starts at zero).
    # Layer 0's B only gets a gradient if it flows back through layer 1's 4-bit base weights.
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora) == 14  # 7 linear layers x 2 decoder layers
    no_grad = [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, f"LoRA modules without gradient: {no_grad}"


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adalora", "qlora"])
def test_merged_export_reproduces_adapter_logits(method, tmp_path):
    model, tok = _build(method)
    _train(model, tok, steps=3)
    model.eval()
    batch = _batch(tok)
    with torch.no_grad():
        ref = model(**batch).logits
        plain = merged_model(model)
        assert not hasattr(plain, "peft_config")
        got = plain(**batch).logits
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    export_merged(model, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, ref, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "ptuning", "ia3"])
def test_adapter_saves_and_reloads(method, tmp_path):
    import peft

    model, tok = _build(method)
    _train(model, tok, steps=2)
    model.eval()
    batch = _batch(tok)
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    fresh, _ = tiny_model(seed=0)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, ref, atol=1e-6)


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_prompt_learning_cannot_merge_and_says_so(method, tmp_path):
    model, _ = _build(method)
    with pytest.raises(ValueError, match="cannot be merged"):
        export_merged(model, tmp_path)


def test_bitfit_export_reloads_as_plain_model(tmp_path):
    model, tok = _build("bitfit")
    _train(model, tok, steps=2)
    model.eval()
    batch = _batch(tok)
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(**batch).logits, ref)


def test_fix_bnb_counts_nothing_on_float_models():
    model, _ = tiny_model()
    assert fix_bnb_cpu_backward(model) == 0


def test_peft_config_is_part_of_the_typed_config():
    cfg = from_dict(SFTConfig, {"peft": {"method": "dora", "r": 8}})
    assert cfg.peft.method == "dora" and cfg.peft.r == 8


@pytest.mark.parametrize("method,n,layer", [("lora", 1, 1), ("dora", -1, 0), ("adalora", 1, 1)])
def test_adapter_layers_puts_adapters_on_those_layers_only_and_stops_the_backward_below(method, n, layer):
    """peft.adapter_layers=1 adapts the last decoder layer only (-1: the first); the adapters train,
    and with the last layer alone the first layer's output needs no gradient (the backward stops)."""
    model, tok = _build(method, adapter_layers=n)
    grad_names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert grad_names and all(f"layers.{layer}." in name and "lora_" in name for name in grad_names)
    seen = []
    layers = model.base_model.model.model.layers
    hook = layers[0].register_forward_hook(lambda m, i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    _train(model, tok, steps=2)
    hook.remove()
    assert seen[0].requires_grad == (layer == 0)
    assert all(not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters() if p.requires_grad)


def test_adapter_layers_errors_name_the_field():
    with pytest.raises(ConfigError, match="peft.adapter_layers"):
        _build("ia3", adapter_layers=1)
    with pytest.raises(ConfigError, match="peft.adapter_layers=5"):
        _build("lora", adapter_layers=5)
