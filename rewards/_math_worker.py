"""The child side of the math-verify pool: one process that parses and verifies (gold, completion) pairs.

Started by `rewards.math_pool` as `python _math_worker.py READ_FD WRITE_FD MEMORY_MB` (a file path,
not `-m`, so that starting it imports neither the `rewards` package nor the parent's `__main__`).
It talks over two pipes with `multiprocessing.connection.Connection` framing (pickled tuples):

    parent -> child   ("score", [(gold, completion), ...], options)   or   ("stop",)
    child  -> parent  ("ready",) once, then per item ("done", value) with value one of
                      1.0 / 0.0 (verified / not verified), None (gold does not parse),
                      or ("error", "ExceptionName: message") when the item raised.

Here math-verify's own `signal.alarm` timeouts work (this is the main thread of its process); they
stop slow sympy work softly. Work that never returns to the interpreter (a C-level big-integer
power such as 9^(9^(9^9))) cannot be interrupted by a signal handler, so the parent kills this
process at its hard deadline; RLIMIT_AS turns runaway allocations into MemoryError, and a per-item
RLIMIT_CPU makes an orphaned, stuck worker (parent killed with SIGKILL) terminate by itself.
"""
from __future__ import annotations

import os
import resource
import signal
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.pop(0)  # keep this package's modules from shadowing top-level names in the child

from multiprocessing.connection import Connection  # noqa: E402


def _build_configs(options: dict):
    """math-verify extraction configs for the prediction (see `rewards.math_accuracy` for why)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig
    from math_verify.parser import NormalizationConfig

    latex = LatexExtractionConfig(
        # open-r1's prediction normalisation (its equations=True is deprecated in math-verify 0.9:
        # the parser handles equations itself); boxed answers are tried first (priority 0).
        normalization_config=NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=False, nits=False,
            boxed="all"),
        boxed_match_priority=0,
        try_extract_without_anchor=options["latex_without_anchor"],
    )
    configs = [latex]
    if options["plain_numbers"]:
        # Plain text answers ("19", "The answer is 19.", "19 apples") carry no LaTeX environment.
        configs.append(ExprExtractionConfig(try_extract_without_anchor=True))
    return configs


def _unevaluated(expr) -> bool:
    """Whether a parsed answer is arithmetic left for the grader: a sum or difference of number
    literals ("44 + 22", "66 - 0"), a product of two or more integers ("6 * 7") or an integer power
    ("2^3"). Closed forms ("1 + sqrt(2)", "2 pi", "1/2", "66 %") are answers, not left-over work."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False

    def literal(a) -> bool:  # a number as written: 7, 0.5, "-0" (-1*0), "1/2" (1 * 2**-1)
        return bool(a.is_Number or (a.is_Mul and all(literal(b) for b in a.args))
                    or (a.is_Pow and a.base.is_Integer and a.exp == -1))

    if expr.is_Add:
        return all(literal(a) for a in expr.args)
    if expr.is_Mul:
        return sum(1 for a in expr.args if a.is_Integer and abs(a) != 1) > 1
    if expr.is_Pow:
        return bool(expr.base.is_Integer and expr.exp.is_Integer and expr.exp > 1)
    return False


def _strip_reasoning(text: str, marker: str | None) -> str:
    """The text after the last `marker` (e.g. '</think>'), or the whole text when it is absent."""
    if marker and marker in text:
        return text.rsplit(marker, 1)[1]
    return text


class _Scorer:
    """Parses and verifies with math-verify, caching parsed gold answers (G samples share one gold)."""

    def __init__(self) -> None:
        import math_verify  # imported here so that a failed import shows in the child's stderr

        self.mv = math_verify
        self.gold_cache: dict[str, list] = {}
        self.config_cache: dict[tuple, list] = {}

    def score(self, gold: str, completion: str, options: dict):
        """1.0 / 0.0 for a verified / unverified completion, None when the gold does not parse."""
        t_parse, t_verify = options["parse_timeout"], options["verify_timeout"]
        parsed_gold = self.gold_cache.get(gold)
        if parsed_gold is None:
            parsed_gold = self.mv.parse(gold, parsing_timeout=t_parse)
            if len(self.gold_cache) > 4096:
                self.gold_cache.clear()
            self.gold_cache[gold] = parsed_gold
        if not parsed_gold:
            return None
        key = tuple(sorted(options.items()))
        configs = self.config_cache.get(key)
        if configs is None:
            configs = self.config_cache[key] = _build_configs(options)
        text = _strip_reasoning(completion, options["reasoning_end"])
        pred = self.mv.parse(text, extraction_config=configs, extraction_mode="first_match",
                             parsing_timeout=t_parse)
        if not pred:
            return 0.0
        # "so she has 44 + 22 stickers" verifies against 66 (math-verify compares values): a policy
        # learned to stop there and let the grader add (2026-12-05). Unless the gold is itself such
        # an expression, the answer must be worked out.
        if options.get("evaluated_only", True) and _unevaluated(pred[0]) and not _unevaluated(parsed_gold[0]):
            return 0.0
        return 1.0 if self.mv.verify(parsed_gold, pred, timeout_seconds=t_verify) else 0.0


def _limit_cpu(seconds: float) -> None:
    """Let this process use at most `seconds` more CPU time, after which the kernel ends it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def main(argv: list[str]) -> None:
    """Serve scoring requests until the parent says stop or closes the pipe."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn_in = Connection(int(argv[1]), writable=False)
    conn_out = Connection(int(argv[2]), readable=False)
    memory_mb = int(argv[3])
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are counted by the parent
    scorer = _Scorer()
    # Warm up before saying ready: the first LaTeX parse builds math-verify's parser lazily
    # (hundreds of ms), which must not count against the first real item's deadline.
    scorer.score("\\frac{1}{2}", "\\boxed{0.5}", dict(
        parse_timeout=5, verify_timeout=5, plain_numbers=True, latex_without_anchor=False,
        reasoning_end=None, hard_timeout=10))
    scorer.gold_cache.clear()
    conn_out.send(("ready",))
    while True:
        try:
            msg = conn_in.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if msg[0] == "stop":
            return
        _, items, options = msg
        for gold, completion in items:
            _limit_cpu(options["hard_timeout"] * 4 + 30)
            try:
                value = scorer.score(gold, completion, options)
            except Exception as exc:  # MemoryError, TimeoutException, sympy errors: per item
                value = ("error", f"{type(exc).__name__}: {str(exc)[:200]}")
            try:
                conn_out.send(("done", value))
            except (BrokenPipeError, OSError):
                return


if __name__ == "__main__":
    main(sys.argv)
