"""Config hygiene: secrets never reach a run directory, and a mistyped name is named with its fix."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import algorithms
from align import checkpoint
from align.config import ConfigError, LogConfig, REDACTED, load_config, redact, save_config, to_dict
from align.rl_config import RLConfig
from align.tracking import Tracker

LITERAL = "literal-secret-5f3a"  # written into the config by hand (should not be, but users do)
FROM_ENV = "env-secret-9c1d"  # read from the environment through "${env:ALIGN_TEST_JUDGE_TOKEN}"


def _secret_reward(url: str = "http://127.0.0.1:9/score") -> str:
    """A `remote` reward entry whose headers hold one literal secret and one from the environment."""
    return ("reward.functions=[{name: remote, on_error: none, kwargs: {url: '" + url + "', retries: 0, "
            "headers: {X-Api-Key: " + LITERAL + ", Authorization: 'Bearer ${env:ALIGN_TEST_JUDGE_TOKEN}'}}}]")


def _files_holding(root: Path, *secrets: str) -> list[str]:
    """Every file under `root` whose bytes contain one of `secrets`."""
    return [str(p) for p in root.rglob("*") if p.is_file() and any(s.encode() in p.read_bytes() for s in secrets)]


def test_redact_hides_secret_keys_and_keeps_everything_else():
    cfg = {"reward": {"functions": [{"name": "remote", "kwargs": {
        "url": "http://judge/score", "timeout": 3.0, "api_key": "k1", "X-API-Key": "k2", "openai_api_key": "k3",
        "hf_token": "k4", "Password": "k5", "auth_token": None, "bearer": "${env:TOKEN}",
        "headers": {"Authorization": "Bearer xyz", "Cookie": ["a", "b"], "X-Ref": "Bearer ${env:TOKEN}"}}}]},
        "rollout": {"max_new_tokens": 8}, "peft": {"num_virtual_tokens": 8}, "train": {"lr": 1e-4}}
    before = json.dumps(cfg)
    out = redact(cfg)
    kw = out["reward"]["functions"][0]["kwargs"]
    assert json.dumps(cfg) == before  # the input is not changed
    assert {k: kw[k] for k in ("api_key", "X-API-Key", "openai_api_key", "hf_token", "Password")} == dict.fromkeys(
        ("api_key", "X-API-Key", "openai_api_key", "hf_token", "Password"), REDACTED)
    assert kw["headers"] == {"Authorization": REDACTED, "Cookie": [REDACTED, REDACTED], "X-Ref": "Bearer ${env:TOKEN}"}
    assert kw["auth_token"] is None and kw["url"] == "http://judge/score" and kw["timeout"] == 3.0
    assert out["rollout"] == {"max_new_tokens": 8} and out["peft"] == {"num_virtual_tokens": 8}


def test_no_secret_reaches_config_yaml_fingerprint_or_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_JUDGE_TOKEN", FROM_ENV)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(RLConfig, None, [_secret_reward(), f"train.output_dir={tmp_path / 'run'}"])
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    checkpoint.save(run / "checkpoints", 1, {"w": torch.zeros(2)}, {"step": 1}, to_dict(cfg))
    tracker = Tracker(run, LogConfig(wandb=True, wandb_mode="offline", progress=False, plot=False), 1,
                      config=to_dict(cfg))
    tracker.log(1, {"reward": 0.5})
    tracker.close()
    assert _files_holding(run / "wandb", "127.0.0.1:9/score"), "wandb holds no config: nothing was checked"
    assert _files_holding(run, LITERAL, FROM_ENV) == []
    assert REDACTED in (run / "config.yaml").read_text()
    assert "${env:ALIGN_TEST_JUDGE_TOKEN}" in (run / "config.yaml").read_text()  # the reference stays
    assert cfg.reward.functions[0].kwargs["headers"]["X-Api-Key"] == LITERAL  # the live config keeps it


class _Judge(BaseHTTPRequestHandler):
    """Scores 1.0 per completion when both secret headers arrived, else answers 401."""

    seen: list[bool] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = self.headers.get("X-Api-Key") == LITERAL and self.headers.get("Authorization") == f"Bearer {FROM_ENV}"
        self.seen.append(ok)
        data = json.dumps({"rewards": [1.0] * len(body["completions"])} if ok else {"error": "no"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_an_rl_run_with_a_secret_header_writes_it_nowhere(tmp_path, monkeypatch):
    """A whole `align rl` run (debug mode, tiny model, wandb offline, a checkpoint every step) whose
    remote judge checks both secrets: they reach the judge and no file of the run directory."""
    from align import rl
    from align.tiny import save_tiny_model

    monkeypatch.setenv("ALIGN_TEST_JUDGE_TOKEN", FROM_ENV)
    monkeypatch.setenv("WANDB_MODE", "offline")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
        cfg = load_config(RLConfig, None, [
            f"model.name={save_tiny_model(tmp_path / 'tiny')}", f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=1", "train.save_every=1", "train.debug=true", "data.train_size=8", "data.eval_size=2",
            "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=4", "rollout.num_threads=1",
            "train.num_threads=1", "peft.r=4", "log.progress=false", "log.wandb=true", "reward.accuracy=null",
            "train.eval_before=false", "train.save_final=false",
            _secret_reward(url).replace("on_error: none", "on_error: raise")])
        rl.run(cfg)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _Judge.seen and all(_Judge.seen)  # the judge got both secrets on every call
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and list(run.glob("checkpoints/step-1/fingerprint.json"))
    assert _files_holding(run / "wandb", url)  # wandb got the config (its debug.log and run file hold it)
    assert _files_holding(run, LITERAL, FROM_ENV) == []


def test_mistyped_algorithm_parameter_and_name_are_named_with_the_closest_one():
    with pytest.raises(ValueError, match=r"unknown parameter 'clip_hihg' for algorithm 'grpo'; "
                                         r"did you mean 'clip_high'\? \(valid: clip_low, clip_high, "):
        algorithms.get("grpo", clip_hihg=0.28)
    with pytest.raises(algorithms.AlgorithmConfigError, match=r"'bta' for algorithm 'dpo'; did you mean 'beta'"):
        algorithms.get("dpo", bta=0.1)
    with pytest.raises(ValueError, match=r"unknown algorithm 'grpoo'; did you mean 'grpo'\? \(valid names: "):
        algorithms.get("grpoo")
    with pytest.raises(KeyError):  # still a KeyError for code that caught the old error
        algorithms.get("nope")
    with pytest.raises(algorithms.AlgorithmConfigError, match="'_rng'"):  # init=False fields are not parameters
        algorithms.get("dupo", _rng=None)
    assert "kl_coef" in algorithms.params(algorithms.get_class("ppo"))


def test_an_override_indexes_a_list_and_names_a_bad_index():
    preset = Path(__file__).parents[1] / "examples" / "grpo_arithmetic.yaml"
    cfg = load_config(RLConfig, preset, ["reward.functions.2.kwargs.exclude_prompt_numbers=true",
                                         "reward.functions.0.weight=2"])
    assert [f.weight for f in cfg.reward.functions][:3] == [2.0, 0.2, 0.5]  # the others as written
    assert cfg.reward.functions[2].kwargs == {"exclude_prompt_numbers": True}
    assert cfg.reward.functions[1].kwargs["pattern"].startswith("[^\\n=]")  # untouched
    with pytest.raises(ConfigError, match=r"'4' is not an index of the 4-item list 'reward.functions'"):
        load_config(RLConfig, preset, ["reward.functions.4.weight=1"])
    with pytest.raises(ConfigError, match=r"'lr' is not a section"):
        load_config(RLConfig, preset, ["train.lr.x=1"])
