"""`align board [RUNS_DIR]`: a local web app over a directory of runs (as LLaMA-Factory's LlamaBoard).

    align board runs --port 7860            # then open http://127.0.0.1:7860
    http://127.0.0.1:7860/?run=main-async-s1,tools/grpo&metrics=eval/accuracy,reward   # a shared view

It reads what the stages already write and never changes a run: every directory under RUNS_DIR
holding `metrics.jsonl` or `config.yaml` is a run (a sweep's trials included). The page shows the
runs with their status, the curves of several runs overlaid, the evaluation samples
(`samples/step_N.jsonl`) and multi-turn episodes (`episodes/step_N.jsonl`) of a step, the run's
config, a sweep's `results.csv`, and can start a new run from a preset in examples/.

Curves are matplotlib PNGs (gr.Plot), not Vega charts: a PNG renders the same in every browser,
headless ones included, and a test can read its pixels; Vega draws to a canvas a test cannot read.
The server binds to localhost unless `--host` says otherwise: the page can start processes.
"""
from __future__ import annotations

import functools
import html
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr  # the board is an optional extra: `pip install align[board]`
import pandas as pd
import yaml

RUNNING_WINDOW_S = 120.0  # a run whose metrics.jsonl changed this recently (and has no final/) is running
REFRESH_S = 5.0  # the page re-reads the runs this often while auto-refresh is on
MAX_SHOWN = 50  # samples or episodes shown for one step (the files can hold hundreds)
DEFAULT_METRICS = ("eval/accuracy", "reward", "accuracy", "loss", "eval/loss", "kl")
TIME_PANEL = "time/*"  # one panel with every time/ key: where a step's seconds go
_ARTIFACTS = {"checkpoints", "final", "plots", "samples", "episodes", "tune", "reference-cache", "wandb",
              "__pycache__", "node_modules"}  # directories inside runs that never hold a run
PRESETS_DIR = Path(__file__).resolve().parents[1] / "examples"
STAGE_NAMES = ("rl", "sft", "rm", "preference")


# ----------------------------------------------------------------------------- reading run dirs
@dataclass
class Run:
    """What the board knows of one run directory."""

    name: str  # path relative to the board's root, e.g. "tools/grpo"
    path: Path
    status: str  # running, finished or stopped
    step: int  # the last logged step (0 before any)
    max_steps: int | None  # train.max_steps of its config, when set
    last: dict[str, float]  # the newest finite value of each metric
    updated: float  # mtime of metrics.jsonl (or config.yaml)


def _number(v: Any) -> float | None:
    """A metric value as a float; non-finite values (logged as strings) and non-numbers give None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line being written (cut short) or corrupt is skipped."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a mapping ({} when missing or unreadable)."""
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def run_status(run_dir: Path, step: int, max_steps: int | None, updated: float, now: float | None = None,
               window: float = RUNNING_WINDOW_S) -> str:
    """finished when final/ exists; running when metrics were written in the last `window` s;
    finished when the last step reached max_steps; else stopped. In that order: a run still saving
    final/ (or a last evaluation) after its last step is running."""
    if (run_dir / "final").is_dir():
        return "finished"
    if (now if now is not None else time.time()) - updated < window:
        return "running"
    return "finished" if max_steps and step >= max_steps else "stopped"


@functools.lru_cache(maxsize=1024)
def _summary(path: str, mtime_ns: int, size: int) -> tuple[int, dict[str, float]]:
    """(last step, newest finite value of each metric) of a metrics.jsonl; cached by mtime and size,
    so a refresh re-reads only the runs that logged since (a long run's file is megabytes)."""
    last: dict[str, float] = {}
    step = 0
    for rec in read_records(Path(path)):
        if (s := _number(rec.get("step"))) is not None:
            step = max(step, int(s))
        for k, v in rec.items():
            if k not in ("step", "time") and (f := _number(v)) is not None:
                last[k] = f
    return step, last


def load_run(root: Path, run_dir: Path, now: float | None = None) -> Run:
    """Read one run directory."""
    metrics = run_dir / "metrics.jsonl"
    stamp = metrics if metrics.exists() else run_dir / "config.yaml"
    st = stamp.stat() if stamp.exists() else None
    step, last = _summary(str(metrics), st.st_mtime_ns, st.st_size) if stamp == metrics and st else (0, {})
    train = read_config(run_dir).get("train")
    max_steps = _number(train.get("max_steps")) if isinstance(train, dict) else None
    max_steps = int(max_steps) if max_steps else None
    updated = st.st_mtime if st else 0.0
    return Run(run_dir.relative_to(root).as_posix(), run_dir,
               run_status(run_dir, step, max_steps, updated, now), step, max_steps, last, updated)


def find_runs(root: Path) -> list[Run]:
    """Every run under `root` (a directory with metrics.jsonl or config.yaml), newest first."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _ARTIFACTS and not d.startswith("."))
        evaluation = "summary.json" in filenames and "metrics.jsonl" not in filenames  # `align eval` output
        if ("metrics.jsonl" in filenames or "config.yaml" in filenames) and not evaluation:
            found.append(load_run(root, Path(dirpath)))
    return sorted(found, key=lambda r: (-r.updated, r.name))


def runs_frame(runs: list[Run]):
    """The run list as a table: status, steps, when it last logged, and the headline metrics."""
    rows = []
    for r in runs:
        row = {"run": r.name, "status": r.status,
               "step": f"{r.step}/{r.max_steps}" if r.max_steps else str(r.step),
               "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.updated))}
        for k in ("eval/accuracy", "reward", "loss", "eval/loss"):
            row[k] = f"{r.last[k]:.4g}" if k in r.last else ""
        rows.append(row)
    cols = ["run", "status", "step", "updated", "eval/accuracy", "reward", "loss", "eval/loss"]
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- curves
def metric_keys(run_dirs: list[Path]) -> list[str]:
    """The numeric metric keys logged by these runs, the usual ones first, then time/* and the rest."""
    keys: set[str] = set()
    for d in run_dirs:
        if (d / "metrics.jsonl").is_file():
            st = (d / "metrics.jsonl").stat()
            keys.update(_summary(str(d / "metrics.jsonl"), st.st_mtime_ns, st.st_size)[1])
    first = [k for k in DEFAULT_METRICS + ("lr",) if k in keys]
    timing = [TIME_PANEL] if any(k.startswith("time/") for k in keys) else []
    return first + timing + sorted(keys - set(first))


def curves_frame(root: Path, names: list[str], metrics: list[str]):
    """Long table (run, metric, step, value) of the chosen metrics of the chosen runs; `time/*`
    stands for every time/ key."""
    rows = []
    for name in names:
        for rec in read_records(Path(root) / name / "metrics.jsonl"):
            step = _number(rec.get("step"))
            for k, v in rec.items():
                wanted = k in metrics or (TIME_PANEL in metrics and k.startswith("time/"))
                if wanted and step is not None and (f := _number(v)) is not None:
                    rows.append((name, k, step, f))
    return pd.DataFrame(rows, columns=["run", "metric", "step", "value"])


def plot_curves(frame, metrics: list[str]):
    """One panel per metric, the runs overlaid in each (same colour per run in every panel)."""
    from matplotlib.figure import Figure  # no pyplot: no global state across the server's threads
    from matplotlib.ticker import MaxNLocator

    panels = [m for m in metrics if (frame["metric"] == m).any()
              or (m == TIME_PANEL and frame["metric"].str.startswith("time/").any())]
    cols = 1 if len(panels) <= 1 else 2
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(11, 3.2 * rows), dpi=100)
    if not panels:
        fig.text(0.5, 0.5, "no data for these runs and metrics", ha="center", va="center")
        return fig
    runs = list(dict.fromkeys(frame["run"]))
    colours = {r: f"C{i % 10}" for i, r in enumerate(runs)}
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, panels):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == TIME_PANEL:
            _time_panel(ax, frame, runs)
        else:
            for run in runs:
                pts = frame[(frame["run"] == run) & (frame["metric"] == metric)].sort_values("step")
                if len(pts):
                    ax.plot(pts["step"], pts["value"], color=colours[run], label=run,
                            marker="o" if len(pts) < 40 else None, markersize=3)
            ax.legend(fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _time_panel(ax, frame, runs: list[str]) -> None:
    """Seconds per step of each time/ key: one colour per key, one line style per run."""
    sub = frame[frame["metric"].str.startswith("time/")]
    styles = ["-", "--", ":", "-."]
    for j, key in enumerate(sorted(set(sub["metric"]))):
        labelled = False
        for i, run in enumerate(runs):
            pts = sub[(sub["run"] == run) & (sub["metric"] == key)].sort_values("step")
            if len(pts):
                ax.plot(pts["step"], pts["value"], color=f"C{j % 10}", linestyle=styles[i % 4],
                        label=None if labelled else key[len("time/"):])
                labelled = True
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7, ncol=2)
    if len(runs) > 1:  # the legend names the keys; the line styles name the runs
        ax.set_xlabel("step;  " + ",  ".join(f"{styles[i % 4]} {r}" for i, r in enumerate(runs)))


# ----------------------------------------------------------------------------- samples and episodes
def step_files(run_dir: Path) -> dict[str, Path]:
    """{label: file} of the run's evaluation samples and episodes, newest step first."""
    found = []
    for kind in ("samples", "episodes"):
        for f in (Path(run_dir) / kind).glob("step_*.jsonl"):
            m = re.fullmatch(r"step_(\d+)\.jsonl", f.name)
            if m:
                found.append((int(m.group(1)), kind, f))
    return {f"{kind} @ step {step}": f for step, kind, f in sorted(found, key=lambda t: (-t[0], t[1]))}


def _pre(text: Any) -> str:
    """Text shown verbatim (escaped, wrapped)."""
    return f"<pre style='white-space:pre-wrap;margin:4px 0'>{html.escape(str(text))}</pre>"


def _header(i: int, rec: dict[str, Any]) -> str:
    """'#i reward 0.85 (math_accuracy 1, format 0.2) ...' of a sample or an episode."""
    parts = [f"<b>#{i}</b>"]
    if (r := _number(rec.get("reward"))) is not None:
        parts.append(f"reward <b>{r:.3g}</b>")
    comps = rec.get("reward_components") or {}
    if isinstance(comps, dict) and comps:
        parts.append("(" + ", ".join(f"{html.escape(str(k))} {v:.3g}" if _number(v) is not None
                                     else f"{html.escape(str(k))} {html.escape(str(v))}"
                                     for k, v in comps.items()) + ")")
    for k in ("answer", "finish_reason", "turns", "tool_calls", "group"):
        if rec.get(k) is not None:
            parts.append(f"{k}: {html.escape(str(rec[k]))}")
    return " &nbsp; ".join(parts)


def render_step_file(path: Path | None) -> str:
    """HTML of one samples/ or episodes/ file: each sample's prompt and completion, or each
    episode's messages."""
    if path is None or not Path(path).is_file():
        return "<p><i>No evaluation samples or episodes in this run.</i></p>"
    recs = read_records(Path(path))
    out = [f"<p>{len(recs)} records in <code>{html.escape(str(path))}</code>"
           + (f", the first {MAX_SHOWN} shown" if len(recs) > MAX_SHOWN else "") + "</p>"]
    for i, rec in enumerate(recs[:MAX_SHOWN]):
        body = []
        if isinstance(rec.get("messages"), list):
            for msg in rec["messages"]:
                role = msg.get("role", "?") if isinstance(msg, dict) else "?"
                content = msg.get("content", "") if isinstance(msg, dict) else msg
                if role == "system":  # the same long tool instructions in every episode: folded
                    body.append(f"<details><summary>system</summary>{_pre(content)}</details>")
                else:
                    body.append(f"<div><b>{html.escape(str(role))}</b>{_pre(content)}</div>")
        else:
            body.append(f"<details><summary>prompt</summary>{_pre(rec.get('prompt', ''))}</details>")
            body.append(f"<div><b>completion</b>{_pre(rec.get('completion', ''))}</div>")
        out.append("<div style='border:1px solid #ccc;border-radius:6px;padding:6px 10px;margin:6px 0'>"
                   f"{_header(i, rec)}{''.join(body)}</div>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- sweeps and launching
def find_sweeps(root: Path) -> list[str]:
    """Sweep directories under `root` (those with the sweep's results.csv or sweep.yaml)."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _ARTIFACTS and not d.startswith("."))
        if "results.csv" in filenames or "sweep.yaml" in filenames:
            out.append(Path(dirpath).relative_to(root).as_posix() or ".")
    return out


def sweep_frame(sweep_dir: Path):
    """The sweep's results.csv (align/sweep.py writes it at the end); while the sweep still runs,
    each trial's status, step and last value of the sweep's metric."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "results.csv").is_file():
        return pd.read_csv(sweep_dir / "results.csv")
    try:
        metric = (yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) or {}).get("metric", "eval/loss")
    except (OSError, yaml.YAMLError):
        metric = "eval/loss"
    trials = [load_run(sweep_dir, d) for d in sorted((sweep_dir / "runs").glob("*")) if d.is_dir()]
    return pd.DataFrame([{"trial": t.name, "status": t.status, "step": t.step, metric: t.last.get(metric)}
                         for t in trials], columns=["trial", "status", "step", metric])


def preset_stage(preset: Path) -> str:
    """The stage a preset is for, read from its launch line (`align rl examples/...`); rl if none."""
    try:
        m = re.search(r"\balign (\w+) ", Path(preset).read_text())
    except OSError:
        m = None
    return m.group(1) if m and m.group(1) in STAGE_NAMES else "rl"


def launch(root: Path, preset: str, stage: str, name: str, overrides: str) -> str:
    """Start `align STAGE PRESET overrides train.output_dir=ROOT/NAME` in the background; its output
    goes to ROOT/NAME/launch.log. Returns a line saying what was started."""
    name = name.strip().strip("/")
    if not name or ".." in Path(name).parts:
        return "Give the new run a name (a directory under the runs directory)."
    out = Path(root) / name
    if (out / "metrics.jsonl").exists():
        return f"{out} already holds a run; pick another name."
    out.mkdir(parents=True, exist_ok=True)
    args = [a for a in re.split(r"[\n]+", overrides) if a.strip()]
    cmd = [sys.executable, "-m", "align.cli", stage, str(PRESETS_DIR / preset), *[a.strip() for a in args],
           f"train.output_dir={out}"]
    with open(out / "launch.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return f"Started pid {proc.pid}: `align {' '.join(cmd[3:])}` (output in {out / 'launch.log'})"


# ----------------------------------------------------------------------------- the app
class Handlers:
    """The page's event handlers over one runs directory (kept apart from the layout in build_app)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def curves(self, sel: list[str], metrics: list[str]):
        """The figure of these runs' metrics."""
        sel = [s for s in (sel or []) if (self.root / s).is_dir()]
        return plot_curves(curves_frame(self.root, sel, metrics or []), metrics or [])

    def metrics_for(self, sel: list[str], wanted: list[str]) -> tuple[list[str], list[str]]:
        """(the metric choices of these runs, the wanted ones among them or the usual ones)."""
        keys = metric_keys([self.root / s for s in sel or []])
        return keys, [m for m in wanted or [] if m in keys] or [m for m in DEFAULT_METRICS if m in keys][:4]

    def steps(self, run: str | None, current: str | None = None):
        """(the step dropdown, the HTML of the chosen step: `current` if still there, else the newest)."""
        files = step_files(self.root / run) if run else {}
        value = current if current in files else next(iter(files), None)
        return gr.update(choices=list(files), value=value), render_step_file(files.get(value))

    def config_text(self, run: str | None) -> str:
        """The run's config.yaml as written."""
        path = self.root / run / "config.yaml" if run else None
        return path.read_text() if path and path.is_file() else "# no config.yaml in this run"

    def seen_now(self, runs: list[Run], run: str | None) -> dict[str, Any]:
        """What the page is drawn from: each run's metrics mtime and status, the run's step files."""
        return {"stamps": {r.name: r.updated for r in runs}, "table": [(r.name, r.status, r.step) for r in runs],
                "steps": list(step_files(self.root / run)) if run else []}

    def on_load(self, request: gr.Request):
        """The page opened: `?run=a,b&metrics=x,y` picks the runs and metrics, else the newest run."""
        runs = find_runs(self.root)
        names = [r.name for r in runs]
        params = dict(request.query_params) if request is not None else {}
        sel = [s for s in params.get("run", "").split(",") if s in names] or names[:1]
        keys, metrics = self.metrics_for(sel, params.get("metrics", "").split(","))
        run = sel[0] if sel else None
        sweeps = find_sweeps(self.root)
        return (runs_frame(runs), gr.update(choices=names, value=run), gr.update(choices=names, value=sel),
                gr.update(choices=keys, value=metrics), self.curves(sel, metrics), *self.steps(run),
                self.config_text(run), gr.update(choices=sweeps, value=sweeps[0] if sweeps else None),
                sweep_frame(self.root / sweeps[0]) if sweeps else None, self.seen_now(runs, run))

    def pick(self, run: str | None, metrics: list[str]):
        """A run picked: it alone on the plot (more can be added), its config, samples and episodes."""
        sel = [run] if run else []
        keys, metrics = self.metrics_for(sel, metrics)
        return (run, sel, gr.update(choices=keys, value=metrics), self.curves(sel, metrics),
                self.config_text(run), *self.steps(run))

    def pick_row(self, metrics: list[str], evt: gr.SelectData):
        """A row of the run table clicked: pick its run."""
        return self.pick(evt.row_value[0] if evt.row_value else None, metrics)

    def on_sel(self, sel: list[str], metrics: list[str]):
        """Runs added to or removed from the plot: their metric choices and the redrawn plot."""
        keys, metrics = self.metrics_for(sel, metrics)
        return gr.update(choices=keys, value=metrics), self.curves(sel, metrics)

    def on_tick(self, run, sel, metrics, step, seen):
        """Re-read the runs; redraw only what changed since the page was drawn (a plot costs CPU)."""
        runs = find_runs(self.root)
        now, seen = self.seen_now(runs, run), seen or {}
        grown = any(now["stamps"].get(s) != seen.get("stamps", {}).get(s) for s in sel or [])
        names = [r.name for r in runs]
        new_runs = sorted(names) != sorted(t[0] for t in seen.get("table", []))
        choices = gr.update(choices=names) if new_runs else gr.skip()  # not while someone types in them
        return (runs_frame(runs) if now["table"] != seen.get("table") else gr.skip(), choices, choices,
                self.curves(sel, metrics) if grown else gr.skip(),
                *(self.steps(run, step) if now["steps"] != seen.get("steps") else (gr.skip(), gr.skip())), now)


def build_app(root: Path):
    """The board's gradio.Blocks over the runs under `root`."""
    root = Path(root)
    h = Handlers(root)
    presets = sorted(p.name for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []
    with gr.Blocks(title="align board", analytics_enabled=False) as app:
        gr.Markdown(f"## align board &nbsp; <small>{html.escape(str(root.resolve()))}</small>")
        with gr.Row():
            auto = gr.Checkbox(value=True, label=f"auto-refresh every {REFRESH_S:g} s", scale=1)
            refresh = gr.Button("Refresh now", scale=0)
        table = gr.Dataframe(label="runs", interactive=False, wrap=True, max_height=300)
        with gr.Row():
            run = gr.Dropdown(label="run (its samples and config below)", scale=1)
            sel = gr.Dropdown(label="runs on the plot", multiselect=True, scale=2)
            metrics = gr.Dropdown(label="metrics", multiselect=True, scale=2)
        plot = gr.Plot(label="curves", format="png", elem_id="curves")
        gr.Markdown("### Evaluation samples and episodes")
        step = gr.Dropdown(label="step")
        samples = gr.HTML(elem_id="samples")
        with gr.Accordion("config.yaml", open=False):
            config = gr.Code(language="yaml", interactive=False, max_lines=40)
        with gr.Accordion("sweeps", open=bool(find_sweeps(root))):
            sweep = gr.Dropdown(label="sweep directory")
            sweep_table = gr.Dataframe(interactive=False, wrap=True)
        with gr.Accordion("start a run from a preset", open=False):
            with gr.Row():
                preset = gr.Dropdown(presets, value=presets[0] if presets else None, label="preset (examples/)")
                stage = gr.Dropdown(list(STAGE_NAMES), label="stage",
                                    value=preset_stage(PRESETS_DIR / presets[0]) if presets else "rl")
                new_name = gr.Textbox(label="run name (directory under the runs directory)")
            overrides = gr.Textbox(label="overrides, one key=value a line", lines=3,
                                   placeholder="train.max_steps=20\nalgorithm.name=dapo")
            start = gr.Button("Start")
            started = gr.Markdown()
        timer = gr.Timer(REFRESH_S)
        seen = gr.State({})  # what the page was drawn from, so a tick redraws only what changed

        app.load(h.on_load, None, [table, run, sel, metrics, plot, step, samples, config, sweep, sweep_table, seen])
        tick_ins, tick_outs = [run, sel, metrics, step, seen], [table, run, sel, plot, step, samples, seen]
        timer.tick(h.on_tick, tick_ins, tick_outs, show_progress="hidden")
        refresh.click(lambda *a: h.on_tick(*a[:-1], {}), tick_ins, tick_outs)
        auto.change(lambda on: gr.Timer(active=on), auto, timer)
        picked = [run, sel, metrics, plot, config, step, samples]
        run.input(h.pick, [run, metrics], picked)
        table.select(h.pick_row, [metrics], picked)
        sel.input(h.on_sel, [sel, metrics], [metrics, plot])
        metrics.input(h.curves, [sel, metrics], plot)
        step.input(lambda r, s: render_step_file(step_files(root / r).get(s) if r else None), [run, step], samples)
        sweep.input(lambda s: sweep_frame(root / s) if s else None, sweep, sweep_table)
        preset.input(lambda p: preset_stage(PRESETS_DIR / p), preset, stage)
        start.click(lambda p, s, n, o: launch(root, p, s, n, o), [preset, stage, new_name, overrides], started)
    return app


def serve(root: Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Serve the board; with block=False return the running app (close it with app.close())."""
    app = build_app(Path(root))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up probes, one line each
    # system fonts: the default theme fetches Google Fonts, which a closed network never answers
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    app.queue().launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       ssr_mode=False, theme=theme, footer_links=[], quiet=not block)
    return app
