"""`align STAGE [CONFIG.yaml] [key=value ...]`: one entry point for every stage.

    align sft examples/sft.yaml train.max_steps=50
    align rm examples/rm.yaml data.path=pairs.jsonl
    align rl examples/grpo_arithmetic.yaml algorithm.name=dapo
    align preference examples/preference.yaml algorithm.name=simpo
    align sweep examples/sweep_preference.yaml base.train.max_steps=5
    align eval runs/rl eval.samples=8                 # held-out accuracy, pass@k, outputs.jsonl
    align merge runs/sft/final runs/sft/merged

The offline stages (sft, rm, preference) run data-parallel under torchrun, one process per GPU;
train.batch_size is then per process (align/distributed.py):

    torchrun --nproc_per_node=4 -m align.cli sft examples/sft.yaml
"""
from __future__ import annotations

import argparse
import logging
import sys

from align.config import ConfigError, SFTConfig, load_config


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, overrides): the first argument is a config unless it has '='."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _sft(args: list[str]) -> None:
    from align import sft

    path, overrides = _split(args)
    sft.run(load_config(SFTConfig, path, overrides))


def _rm(args: list[str]) -> None:
    from align import rm

    path, overrides = _split(args)
    rm.run(load_config(rm.RMConfig, path, overrides))


def _rl(args: list[str]) -> None:
    from align import rl
    from align.rl_config import RLConfig

    path, overrides = _split(args)
    out = rl.run(load_config(RLConfig, path, overrides))
    b, a = out["before"].get("eval/accuracy"), out["after"].get("eval/accuracy")
    if a is not None:
        print(f"[align] held-out accuracy: {b if b is not None else float('nan'):.1%} before -> {a:.1%} after")


def _preference(args: list[str]) -> None:
    from align import preference

    path, overrides = _split(args)
    out = preference.run(load_config(preference.PreferenceConfig, path, overrides))
    ev = next((e for e in reversed(out.result.eval_history) if "eval/rewards/accuracy" in e), {})
    if "eval/rewards/accuracy" in ev:
        print(f"[align] held-out reward accuracy {ev['eval/rewards/accuracy']:.1%}, "
              f"margin {ev.get('eval/rewards/margins', float('nan')):.3f}; model in {out.run_dir / 'final'}")


def _sweep(args: list[str]) -> None:
    from align import sweep

    path, overrides = _split(args)
    if path is None:
        raise ConfigError("align sweep needs a sweep YAML (e.g. examples/sweep_preference.yaml)")
    res = sweep.run_sweep(path, overrides)
    if any(r.status != "TERMINATED" for r in res.rows):
        raise SystemExit(1)


def _eval(args: list[str]) -> None:
    """`align eval TARGET [CONFIG.yaml] [key=value ...]`: a run's own prompts and rewards by default."""
    from align import evaluate

    if not args or "=" in args[0]:
        raise ConfigError("align eval needs what to evaluate first: a model name or directory, an adapter, "
                          "RUN/final, RUN/checkpoints/step-N or a run directory")
    target, (path, overrides) = args[0], _split(args[1:])
    base, _ = evaluate.run_config_for(target)
    if path is not None and path.endswith((".yaml", ".yml")) and __import__("os").path.isfile(path):
        import yaml

        loaded = yaml.safe_load(open(path)) or {}
        stage_keys = set(loaded) - {f.name for f in __import__("dataclasses").fields(evaluate.EvalConfig)}
        if isinstance(loaded, dict) and stage_keys:  # another stage's config (a run's config.yaml): its prompts and rewards
            base, path = {**base, **evaluate.eval_sections(loaded)}, None
    cfg = load_config(evaluate.EvalConfig, path, overrides, base=base)
    cfg.eval.target = target
    summary = evaluate.run(cfg)
    print(evaluate.summary_table(summary))
    print(f"[align] per-sample outputs in {cfg.eval.output_dir}/outputs.jsonl, summary in "
          f"{cfg.eval.output_dir}/summary.json")


def _merge(args: list[str]) -> None:
    """Merge a saved adapter into its base model and save a plain Hugging Face model."""
    p = argparse.ArgumentParser(prog="align merge", description=_merge.__doc__)
    p.add_argument("adapter", help="a directory written by save_pretrained of a peft model (e.g. RUN/final)")
    p.add_argument("out", help="where to write the merged model")
    ns = p.parse_args(args)
    import peft
    from transformers import AutoTokenizer

    from align.tuning import export_merged

    model = peft.AutoPeftModelForCausalLM.from_pretrained(ns.adapter)
    export_merged(model, __import__("pathlib").Path(ns.out))
    AutoTokenizer.from_pretrained(ns.adapter).save_pretrained(ns.out)
    print(f"[align] merged model written to {ns.out}")


def _export(args: list[str]) -> None:
    """Export a model or adapter as GGUF + Ollama Modelfile (checked by loading it back), or merged HF."""
    p = argparse.ArgumentParser(prog="align export", description=_export.__doc__)
    p.add_argument("src", help="a model directory, an adapter directory (e.g. RUN/final) or smollm2-135m-instruct")
    p.add_argument("out", help="the output directory")
    p.add_argument("--format", choices=("gguf", "hf"), default="gguf",
                   help="hf: an adapter merged into a plain HF model, as align merge")
    p.add_argument("--outtype", choices=("f16", "q8_0", "f32"), default="f16", help="GGUF weight type (default f16)")
    p.add_argument("--no-check", action="store_true", help="skip reading the GGUF back and comparing")
    ns = p.parse_args(args)
    if ns.format == "hf":
        return _merge([ns.src, ns.out])
    import time

    from align import gguf_export

    start = time.time()
    try:
        model, tok, name = gguf_export.load_source(ns.src)
        path = gguf_export.export_gguf(model, ns.out, ns.outtype, tokenizer=tok, name=name)
    except gguf_export.GGUFExportError as exc:
        raise ConfigError(str(exc)) from None
    print(f"[align] wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) and {path.parent / 'Modelfile'} "
          f"in {time.time() - start:.1f}s")
    if ns.no_check:
        return
    start = time.time()
    r = gguf_export.check_gguf(path, model, tok, gguf_export.DEFAULT_PROMPTS)
    m = r["divergence_margins"]  # where greedy outputs part, how close the reference's top two were
    ties = f" ({len(m)} part at near-ties: the reference's top two logits {max(m):.3g} apart at most)" if m else ""
    print(f"[align] read back by transformers ({time.time() - start:.1f}s): tokenizer ids equal on "
          f"{r['tokenizer_ids_equal']}/{r['tokenizer_strings']} strings (decoding on {r['decode_equal']}), chat template "
          f"{'equal' if r['chat_template_equal'] else 'DIFFERS'}, greedy outputs equal on {r['greedy_equal']}/"
          f"{r['prompts']} prompts{ties}, max |logit diff| {r['max_abs_logit_diff']:.3g} "
          f"({r['max_rel_logit_diff']:.2%} of the largest logit)")
    if min(r["tokenizer_ids_equal"], r["decode_equal"]) < r["tokenizer_strings"] or not r["chat_template_equal"]:
        raise SystemExit(1)


def _board(args: list[str]) -> None:
    """Serve the web board over a directory of runs (curves, samples, episodes, configs, sweeps)."""
    p = argparse.ArgumentParser(prog="align board", description=_board.__doc__)
    p.add_argument("runs_dir", nargs="?", default="runs", help="the directory of runs (default: runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; the page can start runs, "
                   "so anything but localhost exposes that (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    ns = p.parse_args(args)
    from align import board

    print(f"[align] board over {ns.runs_dir} at http://{ns.host}:{ns.port}")
    board.serve(__import__("pathlib").Path(ns.runs_dir), host=ns.host, port=ns.port)


STAGES = {"sft": _sft, "rm": _rm, "rl": _rl, "preference": _preference, "sweep": _sweep, "eval": _eval, "merge": _merge, "export": _export, "board": _board}


def main(argv: list[str] | None = None) -> int:
    """Run a stage; config and data errors print one clear line and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print(f"usage: align {{{','.join(STAGES)}}} [CONFIG.yaml] [key=value ...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from align.data import DataError
    from align.models import ModelNotFoundError
    from align.checkpoint import ResumeError

    import algorithms
    import rewards
    from align import distributed

    try:
        STAGES[argv[0]](argv[1:])
    except (ConfigError, DataError, ModelNotFoundError, ResumeError, algorithms.AlgorithmConfigError,
            rewards.RewardConfigError) as exc:
        print(f"align {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()  # a no-op without torchrun
    return 0


if __name__ == "__main__":
    sys.exit(main())
