"""DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13; ALGORITHMS.md 3).

    R_len(y) = 0                                    if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
             = -1                                   if |y| > L_max

Added to the correctness reward before group normalisation, as in verl, OpenRLHF and TRL
(`trl.rewards.get_soft_overlong_punishment`, which this matches value for value).

Contract: |y| is the completion's length in tokens as the rollout engine generated it (EOS
included when one was generated), passed in the column `completion_token_counts` (a list of ints
aligned with the completions; align's RL stage fills it from `Sample.completion_ids`). The reward
never tokenizes text itself: re-tokenizing decoded text does not reproduce the generated ids.
"""
from __future__ import annotations

from typing import Any

from rewards.registry import register


class SoftOverlong:
    """The DAPO length penalty in [-1, 0] from completion token counts.

    Example (L_max = 100, L_cache = 20: free up to 80 tokens, -1 beyond 100):
        >>> pen = SoftOverlong(max_completion_len=100, soft_punish_cache=20)
        >>> pen(["q"] * 4, ["..."] * 4, completion_token_counts=[80, 90, 100, 101])
        [0.0, -0.5, -1.0, -1.0]
    """

    def __init__(self, max_completion_len: int, soft_punish_cache: int,
                 length_column: str = "completion_token_counts") -> None:
        if max_completion_len <= 0:
            raise ValueError(f"max_completion_len must be > 0, got {max_completion_len}")
        if not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(f"soft_punish_cache must be in [0, max_completion_len="
                             f"{max_completion_len}], got {soft_punish_cache}")
        self.max_completion_len = max_completion_len  # L_max: -1 beyond this many tokens
        self.soft_punish_cache = soft_punish_cache  # L_cache: width of the linear ramp
        self.length_column = length_column  # column with the completion token counts

    def penalty(self, length: int) -> float:
        """R_len for one completion of `length` tokens."""
        free = self.max_completion_len - self.soft_punish_cache
        if length <= free:
            return 0.0
        if length <= self.max_completion_len:  # only reachable when L_cache > 0
            return (free - length) / self.soft_punish_cache
        return -1.0

    def __call__(self, prompts: list[str], completions: list[str],
                 **columns: list[Any]) -> list[float | None]:
        """R_len per completion from the token-count column (None where the count is None)."""
        if self.length_column not in columns:
            raise KeyError(
                f"soft_overlong needs column {self.length_column!r}: the number of generated "
                f"completion tokens per sample (ints); got columns {sorted(columns)}")
        lengths = columns[self.length_column]
        if len(lengths) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(lengths)} lengths")
        return [None if n is None else self.penalty(int(n)) for n in lengths]


@register("soft_overlong")
def soft_overlong(max_completion_len: int, soft_punish_cache: int,
                  length_column: str = "completion_token_counts") -> SoftOverlong:
    """Factory for `SoftOverlong`.

    Example:
        >>> rewards.get("soft_overlong", max_completion_len=64, soft_punish_cache=16)  # doctest: +SKIP
    """
    return SoftOverlong(max_completion_len, soft_punish_cache, length_column)
