"""Reward functions for RL tests on tiny random models (loaded by path, as users load theirs)."""


def digit_share(prompts, completions, **columns):
    """Share of characters that are digits: graded, so groups of random text have reward variance."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def slow_digit_share(prompts, completions, **columns):
    """`digit_share` after half a second: gives crash tests time to kill a run between steps."""
    import time

    time.sleep(0.5)
    return digit_share(prompts, completions, **columns)
