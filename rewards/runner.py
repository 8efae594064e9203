"""Run a weighted set of reward functions over one batch and combine them.

`RewardRunner(specs)(prompts, completions, columns) -> RewardResult`. The functions run
concurrently in threads (the slow ones wait on processes or the network: math-verify's own pool,
an HTTP scorer, a reward-model actor), and the total is the weighted sum of the components.

A None component (cannot be scored) is *left out* of that sum by default (`missing="skip"`):
e.g. math accuracy None because the gold does not parse, plus a format reward of 1.0, gives a
total of `w_format * 1.0`. With `missing="propagate"` any None component makes the total None.
Either way the total is None when every component is None, and None totals are left out of the
group statistics downstream (DESIGN.md, Rewards).

With `truncated_reward` set, a reply cut at the token limit (the caller passes `truncated`) gets
that total whatever its components say: it has no final answer, and partial-credit rewards would
otherwise pay it for whatever number it happened to reach before the cut.

A reward function that raises is reported with its name and the failing row (index and the start
of its prompt and completion). To find that row the runner calls the function again row by row,
unless the exception says it concerns the whole batch (attribute `whole_batch = True`, as
`RemoteRewardError` does). Then, per spec, `on_error="raise"`
stops the run with a `RewardError`, and `on_error="none"` scores the failing rows None (rows that
succeed when called alone keep their scores) and counts them in the metrics.

Every call has a deadline (`RewardSpec.timeout`, 300 s by default; the row-by-row search above
runs inside it). A call that misses it fails the whole batch as `on_error` says (a RewardError
naming the reward and the deadline, or every row None) and is counted in
`reward/<name>/deadline_missed`. A thread cannot be killed, so each call runs in its own daemon
thread: one stuck past its deadline is left behind (`reward/<name>/stuck` counts those still
running) and holds up neither the next step nor the interpreter's exit, as a pool's worker threads
would (they are joined at exit). The next call starts a fresh thread, even while a stuck one runs.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from rewards.registry import RewardFn, get

_EXCERPT = 80  # characters of prompt / completion quoted in error messages


class RewardError(RuntimeError):
    """A reward function failed; the message names it and the failing row."""

    def __init__(self, message: str, name: str, row: int | None) -> None:
        super().__init__(message)
        self.name = name  # the reward spec's name
        self.row = row  # index of the failing row in the batch, None for a whole-batch failure


@dataclass
class RewardSpec:
    """One reward of a run: a function, its weight in the total, and what to do when it raises."""

    name: str  # label in components and metrics; also the registry name when `fn` is None
    fn: RewardFn | str | None = None  # a callable, a registry name / 'module:function' spec, or None
    weight: float = 1.0  # multiplier in the total
    on_error: str = "raise"  # "raise": fail the step with RewardError; "none": score failed rows None
    kwargs: dict[str, Any] = field(default_factory=dict)  # factory arguments when fn is a name
    timeout: float | None = 300.0  # seconds one call (the whole batch) may take; None: no deadline

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "none"):
            raise ValueError(f"reward {self.name!r}: on_error must be 'raise' or 'none', "
                             f"got {self.on_error!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"reward {self.name!r}: timeout must be > 0 seconds or None, "
                             f"got {self.timeout!r}")
        if self.fn is None or isinstance(self.fn, str):
            self.fn = get(self.fn or self.name, **self.kwargs)
        elif self.kwargs:
            raise ValueError(f"reward {self.name!r}: kwargs are for building fn from a name")
        if not callable(self.fn):
            raise TypeError(f"reward {self.name!r}: fn is not callable ({type(self.fn).__name__})")


@dataclass
class RewardResult:
    """Rewards of one batch."""

    total: list[float | None]  # (B,) weighted sum of the components, None where unscored
    components: dict[str, list[float | None]]  # name -> (B,) unweighted component scores
    # reward/<name>/{mean,none,errors,deadline_missed,stuck,seconds,<counter>}, reward/total/*
    metrics: dict[str, float]


def _excerpt(text: Any) -> str:
    text = str(text)
    return repr(text if len(text) <= _EXCERPT else text[:_EXCERPT] + "...")


class RewardRunner:
    """Calls each spec's function on the batch, concurrently, and combines them with weights.

    Example:
        >>> runner = RewardRunner([
        ...     RewardSpec("format", weight=0.2, kwargs={"ends_with_number": True}),
        ...     RewardSpec("math_accuracy", weight=1.0, on_error="none")])
        >>> res = runner(["2+2?", "3+3?"], ["It is 4", "six"], {"answer": ["4", "6"]})
        >>> res.total, res.components["format"]
        ([1.2, 0.0], [1.0, 0.0])
        >>> runner.close()
    """

    def __init__(self, specs: Sequence[RewardSpec | Mapping[str, Any]], missing: str = "skip",
                 truncated_reward: float | None = None) -> None:
        self.specs = [s if isinstance(s, RewardSpec) else RewardSpec(**s) for s in specs]
        if not self.specs:
            raise ValueError("RewardRunner needs at least one reward")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        if missing not in ("skip", "propagate"):
            raise ValueError(f"missing must be 'skip' or 'propagate', got {missing!r}")
        self.missing = missing  # how a None component enters the total (module docstring)
        self.truncated_reward = truncated_reward  # the total of a reply cut at the token limit (None: scored)
        self._stuck: dict[str, list[Future]] = {s.name: [] for s in self.specs}  # abandoned calls

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None,
                 truncated: Sequence[bool] | None = None) -> RewardResult:
        """Score one batch; `columns` maps a name to a list aligned with the completions, `truncated`
        marks the replies cut at the token limit (their total is `truncated_reward` where that is set)."""
        prompts, completions = list(prompts), list(completions)
        columns = {k: list(v) for k, v in (columns or {}).items()}
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions")
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} rows, expected {n}")
        start = time.monotonic()
        futures = [_start(f"reward-{s.name}", self._run_one, s, prompts, completions, columns)
                   for s in self.specs]
        components: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        for spec, future in zip(self.specs, futures):
            left = None if spec.timeout is None else max(0.0, start + spec.timeout - time.monotonic())
            try:
                scores, spec_metrics = future.result(timeout=left)  # a RewardError propagates here
            except FutureTimeout:
                self._stuck[spec.name].append(future)
                scores, spec_metrics = self._timed_out(spec, n, time.monotonic() - start)
            self._stuck[spec.name] = [f for f in self._stuck[spec.name] if not f.done()]
            spec_metrics[f"reward/{spec.name}/stuck"] = float(len(self._stuck[spec.name]))
            components[spec.name] = scores
            metrics.update(spec_metrics)
        total = self._combine(components, n)
        if self.truncated_reward is not None and truncated is not None:
            if len(truncated) != n:
                raise ValueError(f"{len(truncated)} truncated flags but {n} completions")
            # The components stay as scored (accuracy is still reported); only the total is replaced.
            total = [self.truncated_reward if cut else t for t, cut in zip(total, truncated)]
            metrics["reward/total/truncated"] = float(sum(bool(c) for c in truncated))
        scored = [t for t in total if t is not None]
        metrics["reward/total/mean"] = sum(scored) / len(scored) if scored else float("nan")
        metrics["reward/total/none"] = float(n - len(scored))
        return RewardResult(total=total, components=components, metrics=metrics)

    def _combine(self, components: dict[str, list[float | None]], n: int) -> list[float | None]:
        total: list[float | None] = []
        for i in range(n):
            parts = [(s.weight, components[s.name][i]) for s in self.specs]
            present = [w * v for w, v in parts if v is not None]
            if not present or (self.missing == "propagate" and len(present) < len(parts)):
                total.append(None)
            else:
                total.append(math.fsum(present))
        return total

    # ------------------------------------------------------------------ one reward function

    def _run_one(self, spec: RewardSpec, prompts: list[str], completions: list[str],
                 columns: dict[str, list[Any]]) -> tuple[list[float | None], dict[str, float]]:
        before = _counters(spec.fn)
        start = time.perf_counter()
        errors = 0
        try:
            scores = _check(spec.fn(prompts, completions, **columns), len(completions))
        except Exception as exc:  # noqa: BLE001 - reported with the failing row below
            scores, errors = self._on_failure(spec, exc, prompts, completions, columns)
        seconds = time.perf_counter() - start
        after = _counters(spec.fn)
        values = [v for v in scores if v is not None]
        prefix = f"reward/{spec.name}"
        metrics = {
            f"{prefix}/mean": sum(values) / len(values) if values else float("nan"),
            f"{prefix}/none": float(len(scores) - len(values)),
            f"{prefix}/errors": float(errors),
            f"{prefix}/deadline_missed": 0.0,
            f"{prefix}/seconds": seconds,
        }
        for key, value in after.items():  # e.g. math_accuracy's timeouts during this call
            metrics[f"{prefix}/{key}"] = float(value - before.get(key, 0))
        return scores, metrics

    def _timed_out(self, spec: RewardSpec, n: int, seconds: float
                   ) -> tuple[list[float | None], dict[str, float]]:
        """A call past its deadline: RewardError (on_error="raise"), or every row None and counted."""
        if spec.on_error == "raise":
            what = getattr(spec.fn, "__qualname__", type(spec.fn).__qualname__)
            raise RewardError(f"reward {spec.name!r} ({what}) did not return within its deadline of "
                              f"{spec.timeout:g} s (the reward's timeout) on a batch of {n}; "
                              "set on_error='none' to score such a batch None and go on",
                              spec.name, None)
        prefix = f"reward/{spec.name}"
        return [None] * n, {f"{prefix}/mean": float("nan"), f"{prefix}/none": float(n),
                            f"{prefix}/errors": 0.0, f"{prefix}/deadline_missed": 1.0,
                            f"{prefix}/seconds": seconds}

    def _on_failure(self, spec: RewardSpec, exc: Exception, prompts: list[str],
                    completions: list[str], columns: dict[str, list[Any]]
                    ) -> tuple[list[float | None], int]:
        """Find the failing row(s); raise RewardError, or return (scores, rows lost to errors)."""
        n = len(completions)
        scores: list[float | None] = [None] * n
        row_errors: dict[int | None, Exception] = {}
        if n == 1:
            row_errors[0] = exc
        elif not getattr(exc, "whole_batch", False):
            for i in range(n):
                try:
                    row_cols = {k: [v[i]] for k, v in columns.items()}
                    scores[i] = _check(spec.fn([prompts[i]], [completions[i]], **row_cols), 1)[0]
                except Exception as row_exc:  # noqa: BLE001
                    row_errors[i] = row_exc
                    if spec.on_error == "raise":
                        break
        if not row_errors:  # it fails only as a whole batch: no row to blame
            row_errors[None] = exc
        if spec.on_error == "raise":
            row, err = next(iter(row_errors.items()))
            raise RewardError(_message(spec.name, row, err, prompts, completions),
                              spec.name, row) from err
        if None in row_errors:
            return [None] * n, n
        return scores, len(row_errors)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close every reward function that has a `close()` (process pools); no call is waited for."""
        for spec in self.specs:
            close = getattr(spec.fn, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start(name: str, fn: Callable[..., Any], *args: Any) -> Future:
    """`fn(*args)` in a new daemon thread; its result or exception arrives in the returned future."""
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


def _check(scores: Any, n: int) -> list[float | None]:
    """The function's output as a list of n floats / Nones, or a TypeError / ValueError."""
    if not isinstance(scores, (list, tuple)):
        raise TypeError(f"a reward function must return a list, got {type(scores).__name__}")
    if len(scores) != n:
        raise ValueError(f"a reward function returned {len(scores)} scores for {n} completions")
    out: list[float | None] = []
    for v in scores:
        if v is None:
            out.append(None)
            continue
        v = float(v)
        if math.isnan(v):
            raise ValueError("a reward function returned NaN (use None for 'cannot be scored')")
        out.append(v)
    return out


def _counters(fn: Callable) -> dict[str, int]:
    """A reward function's cumulative counters, if it keeps any (`counters()` method)."""
    counters = getattr(fn, "counters", None)
    return dict(counters()) if callable(counters) else {}


def _message(name: str, row: int | None, exc: BaseException, prompts: list[str],
             completions: list[str]) -> str:
    where = ("the whole batch" if row is None else
             f"row {row} (prompt {_excerpt(prompts[row])}, completion {_excerpt(completions[row])})")
    return f"reward {name!r} failed on {where}: {type(exc).__name__}: {exc}"
