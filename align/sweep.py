"""Sweeps: a search space over any fields of a stage config, run as Ray Tune trials.

    align sweep examples/sweep_preference.yaml            # runs, or resumes, the sweep
    align sweep examples/sweep_preference.yaml base.train.max_steps=5 output_dir=runs/quick

The YAML holds the stage (`preference`, `sft` or `rm`), a `base:` config of that stage (a mapping,
or the path of a stage YAML), and a `search:` space over dotted fields of it:

    search:
      train.lr: {loguniform: [1.0e-5, 1.0e-3]}               # random: uniform, loguniform, choice
      algorithm.params.beta: {grid: [0.1, 0.5]}              # grid: every value
      algorithm: {grid: [{name: dpo}, {name: simpo, params: {beta: 2.0}}]}   # whole sub-configs

Grid keys multiply; random keys are drawn `num_samples` times per grid point (Ray Tune's rule).
A mapping value is merged into the base section (its other fields stay); parents are applied
before their children, so `algorithm` variants combine with `algorithm.params.beta`.

Each trial is a normal run directory `OUTPUT_DIR/runs/NNNNN-<values>/` (config, metrics,
checkpoints, final/); the trainable runs the stage with `train.resume=true`, so a trial that Tune
starts again continues from its last checkpoint. Trials run in parallel as far as the CPUs (and
GPUs) allow: each asks `cpus_per_trial` and sets its torch threads to that (ENVIRONMENT.md: two
processes each using every core ran 4-24x slower). Ray is started on localhost with no dashboard.
Preference trials share one cache of precomputed reference log-probs (`OUTPUT_DIR/reference-cache`),
so trials over the same data and model compute it once.

At the end, `results.csv`, `results.md` and `results.png` (the metric per trial) are written to
OUTPUT_DIR. An interrupted sweep (Ctrl-C, a crash, failed trials) resumes with Tune's own restore
(`Tuner.restore(..., resume_errored=True)`): finished trials are not run again.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from align.config import ConfigError, _set_dotted, from_dict, redact, save_config, to_dict

SAMPLERS = ("grid", "uniform", "loguniform", "choice")  # the keys a search entry may use


@dataclass
class SweepConfig:
    """A sweep: a base stage config, a search space, and how to run the trials."""

    stage: Literal["preference", "sft", "rm"] = "preference"  # which stage every trial runs
    base: dict[str, Any] = field(default_factory=dict)  # the stage config all trials start from
    search: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted field -> {sampler: values}
    num_samples: int = 1  # Tune's num_samples: random draws per grid point (with only grids: repeats)
    metric: str = "eval/loss"  # the reported metric that ranks trials
    mode: Literal["min", "max"] = "min"  # whether a lower or higher metric is better
    output_dir: str = "runs/sweep"  # the sweep directory: trial runs, Tune state, result tables
    cpus_per_trial: int = 1  # CPUs (and torch threads) per trial
    gpus_per_trial: float = 0.0  # GPUs per trial (fractions share a GPU)
    num_cpus: int = 0  # CPUs Ray may use (0 = all cores)
    max_concurrent: int = 0  # trials at once (0 = as many as the resources allow)
    seed: int = 0  # seeds the random draws of the search space
    max_failures: int = 0  # retries of a failed trial within one run of the sweep
    resume: bool = True  # restore an interrupted sweep found in output_dir (else refuse to overwrite it)
    verbose: int = 1  # Tune's console output: 0 silent, 1 status, 2 every result


# ----------------------------------------------------------------------------- stages and configs
def _stage(name: str) -> tuple[type, Callable]:
    """(config class, run function) of a stage, imported lazily."""
    if name == "preference":
        from align import preference

        return preference.PreferenceConfig, preference.run
    if name == "sft":
        from align import sft
        from align.config import SFTConfig

        return SFTConfig, sft.run
    from align import rm

    return rm.RMConfig, rm.run


def _merge(node: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in `node`; a mapping value is merged into an existing mapping there."""
    keys = dotted.split(".")
    parent = node
    for k in keys[:-1]:
        parent = parent.setdefault(k, {})
    old = parent.get(keys[-1])
    if isinstance(value, dict) and isinstance(old, dict):
        merged = copy.deepcopy(old)
        for k, v in value.items():
            _merge(merged, k, v)
        parent[keys[-1]] = merged
    else:
        parent[keys[-1]] = copy.deepcopy(value)


def trial_config(stage: str, base: dict[str, Any], values: dict[str, Any]) -> Any:
    """The stage config of one trial: `base` with the trial's `values` (dotted keys) applied."""
    cls, _ = _stage(stage)
    data = copy.deepcopy(base)
    for key in sorted(values, key=lambda k: k.count(".")):  # parents before children
        _merge(data, key, values[key])
    cfg = from_dict(cls, data)
    if stage == "preference":
        from align.preference import build_algorithm

        build_algorithm(cfg.algorithm)  # hyper-parameters checked now, not in a trial
    return cfg


def _check_search(cfg: SweepConfig) -> None:
    """Every search entry has one known sampler and every value builds a valid stage config."""
    if not cfg.search:
        raise ConfigError("search: empty; give at least one dotted field, e.g. train.lr: {grid: [1e-4, 1e-3]}")
    for key, spec in cfg.search.items():
        where = f"search.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(SAMPLERS)}}} with its values, got {spec!r}")
        kind, arg = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{where}.{kind}: expected a non-empty list of values")
            samples = arg
        else:
            if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg)):
                raise ConfigError(f"{where}.{kind}: expected [low, high]")
            if kind == "loguniform" and min(arg) <= 0:
                raise ConfigError(f"{where}.loguniform: bounds must be > 0")
            samples = [float(arg[0]), float(arg[1])]
        for v in samples:
            try:
                trial_config(cfg.stage, cfg.base, {key: v})
            except ConfigError as exc:
                raise ConfigError(f"{where} = {v!r}: {exc}") from None


def load_sweep(path_or_cfg: str | Path | SweepConfig | dict, overrides: list[str] = ()) -> SweepConfig:
    """The sweep config from a YAML path, a mapping or a SweepConfig, with `key=value` overrides
    (`base.train.max_steps=5` reaches into the base config); validated before anything runs."""
    if isinstance(path_or_cfg, SweepConfig):
        data = to_dict(path_or_cfg)
        root = Path.cwd()
    elif isinstance(path_or_cfg, dict):
        data, root = copy.deepcopy(path_or_cfg), Path.cwd()
    else:
        path = Path(path_or_cfg)
        if not path.is_file():
            raise ConfigError(f"sweep file not found: {path}")
        data, root = yaml.safe_load(path.read_text()) or {}, path.parent
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    if isinstance(data.get("base"), str):  # a stage YAML, relative to the sweep file
        base_path = Path(data["base"]) if Path(data["base"]).is_file() else root / data["base"]
        if not base_path.is_file():
            raise ConfigError(f"base: stage config file not found: {data['base']}")
        data["base"] = yaml.safe_load(base_path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. base.train.lr=1e-4)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    cfg = from_dict(SweepConfig, data)
    _stage(cfg.stage)[0]  # import check
    trial_config(cfg.stage, cfg.base, {})  # the base alone must be a valid stage config
    _check_search(cfg)
    return cfg


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """The search space as Ray Tune samplers, keyed by the dotted field names."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a)}
    return {key: make[kind](arg) for key, spec in cfg.search.items() for kind, arg in spec.items()}


# ----------------------------------------------------------------------------- one trial
def _short(value: Any) -> str:
    """A compact text form of a search value for directory names and table labels."""
    if isinstance(value, dict):
        return "-".join(_short(v) for v in value.values())
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, str) and "/" in value:  # a path: its file name
        return Path(value).name
    return str(value)


def trial_label(values: dict[str, Any]) -> str:
    """`beta=0.1,name=dpo`-style label of a trial's values (the last part of each key)."""
    return ",".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items())


def final_metrics(result: Any) -> dict[str, float]:
    """The numbers a trial reports: its last training record and its last eval."""
    out: dict[str, float] = {}
    if result.history:
        out.update({k: v for k, v in result.history[-1].items() if isinstance(v, (int, float))})
    if result.eval_history:
        out.update({k: v for k, v in result.eval_history[-1].items() if k != "step" and isinstance(v, (int, float))})
    out["steps"] = result.step
    return out


def _trainable(values: dict[str, Any], stage: str, base: dict[str, Any], sweep_dir: str, cwd: str, cpus: int,
               metric: str) -> None:
    """One Tune trial: build the stage config, run it in its own run directory, report metrics."""
    from ray import tune

    os.chdir(cwd)  # relative data paths in the config mean what they meant where the sweep started
    ctx = tune.get_context()
    number = ctx.get_trial_id().rsplit("_", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", f"{number}-{trial_label(values)}")[:100]
    run_dir = Path(sweep_dir) / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "attempts.jsonl", "a") as fh:  # one line per start: shows what a resume re-ran
        fh.write(json.dumps({"trial_id": ctx.get_trial_id(), "values": redact(values)}) + "\n")
    cfg = trial_config(stage, base, values)
    cfg.train.output_dir, cfg.train.resume, cfg.log.progress = str(run_dir), True, False
    cfg.train.num_threads = cfg.train.num_threads or cpus
    if stage == "preference" and cfg.algorithm.reference_cache is None:
        cfg.algorithm.reference_cache = str(Path(sweep_dir) / "reference-cache")
    out = _stage(stage)[1](cfg)
    metrics = final_metrics(out.result)
    if metric not in metrics:
        raise ValueError(f"sweep metric {metric!r} was not reported by this run (reported: {sorted(metrics)}); "
                         "set `metric` to one of them (eval/* needs eval data)")
    tune.report({**metrics, "run_dir": str(run_dir)})


# ----------------------------------------------------------------------------- tables and plot
@dataclass
class TrialRow:
    """One line of the results table."""

    name: str  # the trial's run directory name
    status: str  # TERMINATED (finished) or ERROR
    values: dict[str, Any]  # the searched fields' values
    metrics: dict[str, Any]  # what the trial reported (empty when it failed)
    error: str = ""  # the first line of the error, when it failed


def collect(results: Any, cfg: SweepConfig) -> list[TrialRow]:
    """Rows from a Tune ResultGrid, best first (failed trials last)."""
    rows = []
    for r in results:
        values = {k: r.config.get(k) for k in cfg.search}
        metrics = dict(r.metrics or {})
        run_dir = metrics.get("run_dir")
        name = Path(run_dir).name if run_dir else Path(r.path).name
        err = str(r.error).strip().splitlines()[-1][:200] if r.error else ""
        rows.append(TrialRow(name, "ERROR" if r.error else "TERMINATED", values, metrics, err))
    sign = -1 if cfg.mode == "max" else 1

    def key(row: TrialRow):
        v = row.metrics.get(cfg.metric)
        ok = row.status == "TERMINATED" and isinstance(v, (int, float)) and math.isfinite(v)
        return (0, sign * v, row.name) if ok else (1, 0.0, row.name)

    return sorted(rows, key=key)


def _columns(rows: list[TrialRow], cfg: SweepConfig) -> list[str]:
    """The metric first, then loss and every eval metric any trial reported, then time."""
    seen = {k for r in rows for k in r.metrics}
    extra = ["loss"] + sorted(k for k in seen if k.startswith("eval/"))
    return [cfg.metric] + [k for k in extra if k in seen and k != cfg.metric] + ["time_total_s"]


def _fmt(v: Any) -> str:
    """Numbers to 4 significant digits, the rest as text."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[TrialRow], cfg: SweepConfig, out: Path) -> tuple[Path, Path, Path]:
    """results.csv, results.md and results.png (the metric per finished trial) in `out`."""
    cols = _columns(rows, cfg)
    header = ["trial", "status", *cfg.search, *cols, "error"]
    table = [[r.name, r.status, *[_short(r.values.get(k)) for k in cfg.search],
              *[r.metrics.get(c) for c in cols], r.error] for r in rows]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(table)
    md = [f"# Sweep: {cfg.stage}, {len(rows)} trials, ranked by {cfg.metric} ({cfg.mode})", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(v).replace("|", "/") for v in line) + " |" for line in table]
    (out / "results.md").write_text("\n".join(md) + "\n")
    _plot(rows, cfg, out / "results.png")
    return out / "results.csv", out / "results.md", out / "results.png"


def _plot(rows: list[TrialRow], cfg: SweepConfig, path: Path) -> None:
    """A horizontal bar per finished trial: its metric, the best one highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.status == "TERMINATED" and isinstance(r.metrics.get(cfg.metric), (int, float))]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(done), 2) + 1.2))
    labels = [trial_label(r.values) or r.name for r in done]
    vals = [r.metrics[cfg.metric] for r in done]
    ax.barh(range(len(done)), vals, color=["tab:orange" if i == 0 else "tab:blue" for i in range(len(done))])
    ax.set_yticks(range(len(done)), labels, fontsize=8)
    ax.invert_yaxis()  # best (first) at the top
    ax.set_xlabel(f"{cfg.metric} ({'higher' if cfg.mode == 'max' else 'lower'} is better)")
    ax.set_title(f"{cfg.stage} sweep: {len(done)} finished of {len(rows)} trials")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.4g}", va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    """What `run_sweep` returns."""

    rows: list[TrialRow]  # the table, best first
    sweep_dir: Path  # results.csv / .md / .png, runs/, tune/
    restored: bool  # True when an interrupted sweep was resumed


def run_sweep(path_or_cfg: str | Path | SweepConfig | dict, overrides: list[str] = ()) -> SweepResult:
    """Run (or resume) the sweep; write and return the results table."""
    from ray import tune

    from align.actors import init_ray

    cfg = load_sweep(path_or_cfg, overrides)
    sweep_dir = Path(cfg.output_dir).resolve()
    exp = sweep_dir / "tune"
    saved = sweep_dir / "sweep.yaml"
    restoring = tune.Tuner.can_restore(str(exp))
    if restoring and not cfg.resume:
        raise ConfigError(f"{exp} holds a sweep already; set resume=true to continue it, or use a new output_dir")
    if restoring and saved.is_file():
        before = yaml.safe_load(saved.read_text())
        if before.get("search") != redact(to_dict(cfg))["search"] or before.get("stage") != cfg.stage:
            raise ConfigError(f"{sweep_dir} holds a sweep with another stage or search space; Tune would resume "
                              "that one. Use a new output_dir (or delete the old one)")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    init_ray(num_cpus=cfg.num_cpus or None)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, stage=cfg.stage, base=cfg.base, sweep_dir=str(sweep_dir), cwd=os.getcwd(),
                             cpus=cfg.cpus_per_trial, metric=cfg.metric),
        dict(cpu=cfg.cpus_per_trial, gpu=cfg.gpus_per_trial))
    if restoring:
        print(f"[align] resuming the sweep in {sweep_dir} (finished trials are kept)", flush=True)
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_errored=True)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent or None,
                search_alg=BasicVariantGenerator(random_state=cfg.seed),
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
            run_config=tune.RunConfig(name=exp.name, storage_path=str(sweep_dir), verbose=cfg.verbose,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))
    results = tuner.fit()
    rows = collect(results, cfg)
    paths = write_tables(rows, cfg, sweep_dir)
    failed = [r for r in rows if r.status != "TERMINATED"]
    print(f"[align] sweep: {len(rows) - len(failed)} of {len(rows)} trials finished; "
          f"table {paths[1]}, plot {paths[2]}", flush=True)
    for r in failed:
        print(f"[align]   failed: {r.name}: {r.error} (run `align sweep` again to resume it)", flush=True)
    return SweepResult(rows, sweep_dir, restoring)
