"""Metrics sinks: `metrics.jsonl` in the run directory, a progress bar, wandb, TensorBoard,
trackio, and PNG plots.

Every backend is local unless the user asks otherwise: wandb runs offline (no key is ever written
to the run directory: wandb reads it from the environment, and the run's config reaches it
redacted, as config.yaml is), TensorBoard writes event files into the run directory, trackio keeps
its SQLite store under $TRACKIO_DIR (default ~/.cache/huggingface/trackio) and is never pointed at
a Space by align.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from align.config import LogConfig, redact


def _plain(v: Any) -> Any:
    """A JSON-safe scalar (tensors and numpy numbers become floats)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class Tracker:
    """Writes one JSON line per log call and mirrors it to the progress bar and wandb."""

    def __init__(self, run_dir: Path, cfg: LogConfig, total_steps: int, start_step: int = 0,
                 config: dict | None = None, desc: str = "train"):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.path = self.run_dir / "metrics.jsonl"
        self._truncate_after(start_step)  # a resumed run continues the numbering with no repeats
        self._file = open(self.path, "a", encoding="utf-8")
        self._bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self._wandb = None
        if cfg.wandb and cfg.wandb_mode != "disabled":
            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            import wandb

            self._wandb = wandb.init(project=cfg.project, name=cfg.run_name or self.run_dir.name,
                                     dir=str(self.run_dir), config=redact(config or {}), resume="allow",
                                     id=self._wandb_id())
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run's events past its checkpoint are dropped, as in metrics.jsonl
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self._trackio = None
        if cfg.trackio:
            import trackio

            self._trackio = trackio.init(project=cfg.project, name=cfg.run_name or self.run_dir.name,
                                         config=redact(config or {}), resume="allow", embed=False)
        self._t0 = time.time()

    def _wandb_id(self) -> str:
        """A stable wandb run id stored in the run directory, so a resumed run appends to the same run."""
        f = self.run_dir / ".wandb_id"
        if not f.exists():
            import uuid

            f.write_text(uuid.uuid4().hex[:12])
        return f.read_text().strip()

    def _truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint we resume from)."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, step: int, metrics: dict[str, Any], advance: int = 0, show: tuple[str, ...] = ()) -> None:
        """Record `metrics` at `step`; advance the bar by `advance` steps and show the `show` keys."""
        rec = {"step": step, "time": round(time.time() - self._t0, 3)}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()  # the board and `tensorboard` read while the run goes on
        if self._trackio is not None:
            self._trackio.log({k: v for k, v in numbers.items() if k != "time"}, step=step)  # trackio keeps its own time
        if self._bar is not None:
            if show:
                self._bar.set_postfix({k: f"{rec[k]:.4g}" for k in show if isinstance(rec.get(k), (int, float))},
                                      refresh=False)
            self._bar.update(advance)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self, plots: dict[str, list[str]] | None = None) -> None:
        """Close sinks and draw `plots` ({file stem: [metric keys]}) into plots/."""
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
        if self._trackio is not None:
            self._trackio.finish()
        if plots and self.cfg.plot:
            plot_metrics(self.path, self.run_dir / "plots", plots)


def plot_metrics(metrics_path: Path, out_dir: Path, plots: dict[str, list[str]]) -> list[Path]:
    """One PNG per entry: each listed metric against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, keys in plots.items():
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                    markersize=3, label=k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
