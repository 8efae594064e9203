"""Sweeps on Ray Tune with tiny preference runs: a 2x2 grid writes its table and plot, and after an
interruption (two trials fail: their data file is missing) it resumes without re-running the
finished trials. Plus the search-space validation that stops a bad sweep before Ray starts."""
import csv
import json
import random

import pytest



from align.config import ConfigError
from align.sweep import load_sweep, run_sweep, trial_config
from align.tiny import save_tiny_model
from conftest import write_jsonl

MARKERS = [("good", "bad"), ("yes", "no"), ("happy", "sad"), ("like", "not")]


def _pairs(n, seed):
    rng = random.Random(seed)
    words = "cat dog red blue green the quick fox".split()
    return [{"prompt": "Tell me about " + " ".join(rng.choices(words, k=3)),
             "chosen": f"{MARKERS[i % 4][0]} {rng.choice(words)}",
             "rejected": f"{MARKERS[i % 4][1]} {rng.choice(words)}"}
            for i in range(n)]


def _sweep(tmp_path, model_dir):
    return {
        "stage": "preference",
        "output_dir": str(tmp_path / "sweep"),
        "metric": "eval/rewards/accuracy", "mode": "max", "cpus_per_trial": 1, "verbose": 0,
        "base": {"model": {"name": str(model_dir)}, "peft": {"method": "lora", "r": 4},
                 "data": {"eval_fraction": 0.25, "max_length": 64},
                 "train": {"max_steps": 3, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0},
                 "log": {"plot": False}},
        "search": {"data.path": {"grid": [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]},
                   "algorithm.params.beta": {"grid": [0.1, 0.5]}},
    }


def _attempts(sweep_dir):
    """Trial run directory name -> how many times the trial started."""
    return {d.name: len((d / "attempts.jsonl").read_text().splitlines()) for d in (sweep_dir / "runs").iterdir()}


def test_grid_sweep_writes_tables_and_resumes_without_rerunning_finished_trials(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    write_jsonl(tmp_path / "a.jsonl", _pairs(16, 0))  # b.jsonl is missing: its two trials fail
    spec = _sweep(tmp_path, model_dir)
    first = run_sweep(spec)
    sweep = tmp_path / "sweep"
    assert sorted(r.status for r in first.rows) == ["ERROR", "ERROR", "TERMINATED", "TERMINATED"]
    assert not first.restored
    assert all("b.jsonl" in r.values["data.path"] and "data file not found" in r.error
               for r in first.rows if r.status == "ERROR")
    before = _attempts(sweep)
    assert sorted(before.values()) == [1, 1, 1, 1]
    # fix the cause, run the same command again: Tune restores and runs only the failed trials
    write_jsonl(tmp_path / "b.jsonl", _pairs(16, 1))
    second = run_sweep(spec)
    assert second.restored
    assert [r.status for r in second.rows] == ["TERMINATED"] * 4
    after = _attempts(sweep)
    assert after.keys() == before.keys()
    for name, n in after.items():
        want = 2 if "b.jsonl" in json.loads((sweep / "runs" / name / "attempts.jsonl").read_text().splitlines()[0])[
            "values"]["data.path"] else 1
        assert n == want, (name, n)
    # a third run finds every trial finished and runs nothing
    run_sweep(spec)
    assert _attempts(sweep) == after
    # the table: one row per trial with the searched values and the metric, best first
    with open(sweep / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4
    assert {(r["data.path"].endswith("a.jsonl"), r["algorithm.params.beta"]) for r in table} == {
        (True, "0.1"), (True, "0.5"), (False, "0.1"), (False, "0.5")}
    accs = [float(r["eval/rewards/accuracy"]) for r in table]
    assert accs == sorted(accs, reverse=True)
    md = (sweep / "results.md").read_text()
    assert md.count("| TERMINATED |") == 4 and "eval/rewards/accuracy" in md
    assert (sweep / "results.png").stat().st_size > 1000
    # each trial is a normal run directory; the trials shared one reference cache
    for name in after:
        run = sweep / "runs" / name
        assert (run / "config.yaml").is_file() and (run / "final" / "adapter_model.safetensors").is_file()
    assert len(list((sweep / "reference-cache").glob("reference-*.safetensors"))) == 4  # 2 data sets x train/eval


def test_trial_configs_merge_variants_and_bad_search_stops_early(tmp_path):
    base = {"algorithm": {"name": "dpo", "params": {"beta": 0.3}, "reference": "adapter"}}
    cfg = trial_config("preference", base, {"algorithm": {"name": "simpo", "params": {"gamma": 0.5}},
                                            "algorithm.params.beta": 2.0, "train.lr": 1e-3})
    assert (cfg.algorithm.name, cfg.algorithm.params, cfg.algorithm.reference) == (
        "simpo", {"beta": 2.0, "gamma": 0.5}, "adapter")
    assert cfg.train.lr == 1e-3
    spec = {"stage": "preference", "output_dir": str(tmp_path), "base": {}, "search": {}}
    with pytest.raises(ConfigError, match="search: empty"):
        load_sweep(spec)
    with pytest.raises(ConfigError, match=r"search\.train\.lr: expected one of \{grid, uniform"):
        load_sweep(dict(spec, search={"train.lr": {"grdi": [1]}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'"):
        load_sweep(dict(spec, search={"train.lrr": {"grid": [1e-4]}}))
    with pytest.raises(ConfigError, match=r"algorithm\.params\.gamma.*\[dpo\]"):
        load_sweep(dict(spec, search={"algorithm.params.gamma": {"grid": [1.0]}}))
    with pytest.raises(ConfigError, match=r"loguniform: bounds must be > 0"):
        load_sweep(dict(spec, search={"train.lr": {"loguniform": [0, 1e-3]}}))
    ok = load_sweep(dict(spec, search={"train.lr": {"loguniform": [1e-5, 1e-3]}}), ["base.train.max_steps=5"])
    assert ok.base["train"]["max_steps"] == 5
