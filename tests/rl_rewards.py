"""Reward functions for RL tests on tiny random models (loaded by path, as users load theirs)."""


def digit_share(prompts, completions, **columns):
    """Share of characters that are digits: graded, so groups of random text have reward variance."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def slow_digit_share(prompts, completions, **columns):
    """`digit_share` after half a second: gives crash tests time to kill a run between steps."""
    import time

    time.sleep(0.5)
    return digit_share(prompts, completions, **columns)


def vowel_share(prompts, completions, **columns):
    """Share of characters that are vowels: graded and common, so a tiny model can learn it in a few steps."""
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def starts_with_vowel(prompts, completions, **columns):
    """1 when the completion's first letter is a vowel: one early choice decides it, so a tiny random
    model learns it within a few steps (its near-uniform logits barely move for graded rewards)."""
    first = [next((ch for ch in c if ch.isalpha()), "") for c in completions]
    return [float(ch.lower() in "aeiou" and ch != "") for ch in first]


def slow_starts_with_vowel(prompts, completions, **columns):
    """`starts_with_vowel` after half a second: gives crash tests time to kill a run mid-step."""
    import time

    time.sleep(0.5)
    return starts_with_vowel(prompts, completions, **columns)


def rare_variance(prompts, completions, **columns):
    """`digit_share` for one prompt in ten (by a stable hash), 0 for the rest: 90 % of groups have
    zero reward variance, the case where DAPO's dynamic sampling runs out of rounds."""
    import zlib

    return [d if zlib.crc32(p.encode()) % 10 == 0 else 0.0
            for p, d in zip(prompts, digit_share(prompts, completions))]
