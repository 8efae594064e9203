"""`align board`: the run-directory readers, and the served page in a real headless Chromium.

The browser test needs Debian's chromium (`apt-get install -y chromium`) and the `playwright` Python
package (driving that chromium; `playwright install` is never needed). It fails, not skips, without
them: a board nobody has seen render is not tested.
"""
import base64
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from align import board

CHROMIUM = os.environ.get("ALIGN_CHROMIUM", "/usr/bin/chromium")
COMPLETION = "The total is 2436 apples, zebra-quartz-17."  # a string no other page text contains
EVAL_ACC = {0: 0.13, 2: 0.47, 4: 0.81}  # the distinctive eval/accuracy curve


def _rl_run(run: Path, max_steps: int = 4) -> None:
    """A realistic RL run directory as align rl writes it (config, metrics, samples, checkpoint)."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"model:\n  name: smollm2-135m-instruct\nalgorithm:\n  name: grpo\n"
        f"train:\n  output_dir: {run}\n  max_steps: {max_steps}\n  lr: 0.0005\n")
    recs = [{"step": 0, "time": 0.0, "eval/reward": 0.2, "eval/n": 100, "eval/accuracy": EVAL_ACC[0]}]
    for s in range(1, max_steps + 1):
        recs.append({"step": s, "time": 10.0 * s, "reward": 0.1 * s, "accuracy": 0.1 * s, "loss": 0.5 / s,
                     "kl": "nan" if s == 3 else 0.01 * s, "lr": 5e-4, "time/generate": 4.0,
                     "time/update": 5.0, "time/sync": 0.5, "time/step": 9.5})
        if s in EVAL_ACC:
            recs.append({"step": s, "time": 10.0 * s + 1, "eval/accuracy": EVAL_ACC[s], "eval/n": 100})
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (run / "metrics.jsonl").write_text(text)
    (run / "samples").mkdir()
    rows = [{"prompt": "Lucas packs 29 stickers into each of 84 boxes. How many?", "completion": COMPLETION,
             "reward": 1.0, "reward_components": {"math_accuracy": 1.0, "format": 0.0}, "answer": "2436"},
            {"prompt": "What is 3 + 4?", "completion": "<b>8</b>", "reward": 0.0,
             "reward_components": {"math_accuracy": 0.0}, "answer": "7"}]
    (run / "samples" / "step_00002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "checkpoints" / "step-4").mkdir(parents=True)


@pytest.fixture
def runs(tmp_path):
    """A runs directory: an RL run, a multi-turn run with episodes, and a finished sweep."""
    root = tmp_path / "runs"
    _rl_run(root / "rl-demo")
    tools = root / "tools" / "grpo"
    tools.mkdir(parents=True)
    (tools / "metrics.jsonl").write_text('{"step": 1, "time": 1.0, "reward": 0.5}\n{"step": 2, "ti')  # cut short
    (tools / "episodes").mkdir()
    ep = {"group": 0, "reward": 1.0, "reward_components": {"math_accuracy": 1.0}, "finish_reason": "stop",
          "turns": 2, "tool_calls": 1, "messages": [
              {"role": "user", "content": "29 * 84?"},
              {"role": "assistant", "content": "<tool_call>{\"name\": \"calculator\"}</tool_call>"},
              {"role": "tool", "content": "2436"}, {"role": "assistant", "content": "2436"}]}
    (tools / "episodes" / "step_00005.jsonl").write_text(json.dumps(ep) + "\n")
    sweep = root / "sweep"
    (sweep / "runs" / "00000-lr=0.001").mkdir(parents=True)
    (sweep / "runs" / "00000-lr=0.001" / "metrics.jsonl").write_text('{"step": 1, "eval/loss": 0.7}\n')
    (sweep / "sweep.yaml").write_text("stage: preference\nmetric: eval/loss\n")
    (sweep / "results.csv").write_text("trial,status,train.lr,eval/loss\n00000-lr=0.001,TERMINATED,0.001,0.7\n")
    return root


def test_runs_status_and_curves(runs):
    """Runs are found recursively with their status; curves skip non-finite values and cut lines."""
    found = {r.name: r for r in board.find_runs(runs)}
    assert set(found) == {"rl-demo", "tools/grpo", "sweep/runs/00000-lr=0.001"}
    assert found["rl-demo"].step == 4 and found["rl-demo"].max_steps == 4
    assert found["rl-demo"].last["eval/accuracy"] == EVAL_ACC[4]
    assert found["rl-demo"].status == "running"  # just written, no final/
    old = time.time() - 3600
    assert board.run_status(runs / "rl-demo", 4, 4, old) == "finished"  # reached max_steps
    assert board.run_status(runs / "rl-demo", 2, 4, old) == "stopped"
    (runs / "rl-demo" / "final").mkdir()
    assert board.run_status(runs / "rl-demo", 2, 4, time.time()) == "finished"
    assert found["tools/grpo"].step == 1  # the half-written line is skipped

    keys = board.metric_keys([runs / "rl-demo"])
    assert keys[:4] == ["eval/accuracy", "reward", "accuracy", "loss"] and board.TIME_PANEL in keys
    frame = board.curves_frame(runs, ["rl-demo"], ["eval/accuracy", "kl", board.TIME_PANEL])
    acc = frame[frame.metric == "eval/accuracy"]
    assert dict(zip(acc.step, acc.value)) == EVAL_ACC
    assert sorted(frame[frame.metric == "kl"].step) == [1, 2, 4]  # "nan" at step 3 left out
    assert {"time/generate", "time/update", "time/sync", "time/step"} <= set(frame.metric)
    fig = board.plot_curves(frame, ["eval/accuracy", "kl", board.TIME_PANEL])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["eval/accuracy", "kl", board.TIME_PANEL]


def test_samples_episodes_and_sweep(runs):
    """Samples and episodes render escaped, by step; the sweep's results.csv is its table."""
    files = board.step_files(runs / "rl-demo")
    assert list(files) == ["samples @ step 2"]
    page = board.render_step_file(files["samples @ step 2"])
    assert COMPLETION in page and "&lt;b&gt;8&lt;/b&gt;" in page and "math_accuracy 1" in page
    ep = board.render_step_file(board.step_files(runs / "tools" / "grpo")["episodes @ step 5"])
    assert "<b>tool</b>" in ep and "&lt;tool_call&gt;" in ep and "turns: 2" in ep
    assert board.find_sweeps(runs) == ["sweep"]
    table = board.sweep_frame(runs / "sweep")
    assert list(table.columns) == ["trial", "status", "train.lr", "eval/loss"] and table["eval/loss"][0] == 0.7
    (runs / "sweep" / "results.csv").unlink()  # a sweep still running: its trials' last metric
    assert board.sweep_frame(runs / "sweep")["eval/loss"].tolist() == [0.7]
    assert board.preset_stage(board.PRESETS_DIR / "sft.yaml") == "sft"
    assert "name" in board.launch(runs, "sft.yaml", "sft", "../outside", "")  # refused: nothing started
    assert "already holds a run" in board.launch(runs, "grpo_arithmetic.yaml", "rl", "rl-demo", "")


def _free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curve_pixels(src: str) -> tuple[tuple[int, int], int]:
    """(size, pixels in the first run's line colour) of the plot image the page shows."""
    import numpy as np
    from PIL import Image

    assert src.startswith("data:image/png;base64,"), src[:60]
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    c0 = np.array([31, 119, 180])  # matplotlib's C0, the first run's colour
    n = int((np.abs(np.asarray(img, dtype=int) - c0).sum(axis=-1) < 40).sum())
    return img.size, n


@pytest.mark.timeout(180)  # a browser that hangs fails the test instead of stalling the suite
def test_board_in_headless_chromium(runs, tmp_path):
    """The served page, rendered by Chromium, shows the run, its curve and its sample completion."""
    if not Path(CHROMIUM).exists() or not shutil.which(CHROMIUM):
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install -y chromium (or set ALIGN_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test drives chromium with playwright: pip install playwright "
                    "(no `playwright install`: it uses the system chromium)")
    port = _free_port()
    app = board.serve(runs, port=port, block=False)
    shot = tmp_path / "board.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-proxy-server",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/?run=rl-demo&metrics=eval/accuracy,reward", timeout=30_000)
            page.wait_for_selector("#curves img", timeout=30_000)
            page.wait_for_function("t => document.querySelector('#samples')?.innerText.includes(t)",
                                   arg=COMPLETION, timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            text = page.inner_text("body")
            src = page.get_attribute("#curves img", "src")
            box = page.locator("#curves img").bounding_box()
            browser.close()
    finally:
        app.close()
    print(f"board screenshot: {shot}")
    assert "rl-demo" in text and "tools/grpo" in text  # the run list
    assert "running" in text and "4/4" in text  # status and steps
    assert COMPLETION in text and "math_accuracy" in text  # the step-2 evaluation samples
    assert "eval/accuracy" in text and "reward" in text  # the chosen metrics
    (w, h), line = _curve_pixels(src)
    assert w >= 600 and h >= 250 and box["width"] >= 400 and box["height"] >= 150, (w, h, box)
    assert line >= 200, f"only {line} pixels of the curve's colour: is the curve drawn? see {shot}"
    assert shot.stat().st_size > 20_000
