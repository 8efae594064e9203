"""Tests for the `rewards` package: built-ins, hostile inputs, the runner, remote and user rewards.

One math-verify process pool is shared by the whole module (starting workers is the main cost).
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import rewards
from rewards import (FormatReward, MathAccuracy, MathVerifyPool, RemoteReward, RemoteRewardError,
                     RewardConfigError, RewardError, RewardRunner, RewardSpec, SoftOverlong,
                     normalize_gold)

TOWER = "\\boxed{9^{9^{9^{9^{9}}}}}"
NESTED = "\\boxed{" + "{" * 500_000 + "1" + "}" * 500_000 + "}"  # a megabyte of nested braces
FACTORIAL = "\\boxed{100000!}"


@pytest.fixture(scope="module")
def pool():
    with MathVerifyPool(num_workers=2) as shared:
        yield shared


@pytest.fixture(scope="module")
def acc(pool):
    return MathAccuracy(timeout=2.0, pool=pool)


# ---------------------------------------------------------------------------- registry


def test_registry_names_get_and_unknown():
    assert {"math_accuracy", "format", "soft_overlong", "remote"} <= set(rewards.names())
    assert isinstance(rewards.get("format", ends_with_number=True), FormatReward)
    assert isinstance(rewards.get("soft_overlong", max_completion_len=10, soft_punish_cache=2),
                      SoftOverlong)
    with pytest.raises(KeyError) as info:
        rewards.get("no_such_reward")
    assert "math_accuracy" in str(info.value) and "soft_overlong" in str(info.value)

    @rewards.register("_test_const")
    def _const(value: float = 1.0):
        return lambda prompts, completions, **cols: [value] * len(completions)

    assert rewards.get("_test_const", value=0.25)(["a", "b"], ["x", "y"]) == [0.25, 0.25]
    with pytest.raises(ValueError):
        rewards.register("_test_const")(lambda: None)


def test_unknown_names_and_arguments_are_named_with_the_closest_one(tmp_path):
    with pytest.raises(RewardConfigError, match=r"unknown reward 'fromat'; did you mean 'format'\?"):
        rewards.get("fromat")
    with pytest.raises(ValueError, match=r"unknown argument 'end_with_number' for reward 'format'; "
                                         r"did you mean 'ends_with_number'\? \(valid: pattern, tags, "):
        rewards.get("format", end_with_number=True)
    with pytest.raises(RewardConfigError, match=r"'timout' for reward 'math_accuracy'; did you mean 'timeout'"):
        rewards.get("math_accuracy", timout=3.0)
    with pytest.raises(RewardConfigError, match=r"'headrs' for reward 'remote'; did you mean 'headers'"):
        rewards.get("remote", url="http://x", headrs={})
    with pytest.raises(RewardConfigError, match=r"reward 'remote' needs argument\(s\) 'url'"):
        rewards.get("remote", timeout=1.0)
    with pytest.raises(RewardConfigError, match=r"'timout' for reward 'remote'; did you mean 'timeout'"):
        rewards.check("remote", url="http://x", timout=1.0)  # checks without building (no pool, no actor)
    assert rewards.check("math_accuracy", timeout=1.0) is None
    with pytest.raises(RewardConfigError, match=r"'max_completion_length' for reward 'soft_overlong'; "
                                                r"did you mean 'max_completion_len'"):
        rewards.get("soft_overlong", max_completion_length=8, soft_punish_cache=2)
    path = tmp_path / "user.py"
    path.write_text("def make(scale):\n    return lambda p, c, **k: [scale] * len(c)\n\n"
                    "def loose(**options):\n    return lambda p, c, **k: [len(options)] * len(c)\n")
    with pytest.raises(RewardConfigError, match=rf"'scal' for reward factory '{path}:make'; did you mean 'scale'"):
        rewards.get(f"{path}:make", scal=2.0)
    assert rewards.get(f"{path}:loose", anything=1, goes=2)(["p"], ["c"]) == [2]  # **kwargs: as it is


# ---------------------------------------------------------------------------- math accuracy


def test_normalize_gold():
    assert normalize_gold("She has 3 + 15 = 18 apples.\n#### 18") == "18"
    assert normalize_gold("#### 1,234,567") == "1234567"
    assert normalize_gold("#### 0.5") == "0.5"
    assert normalize_gold("\\frac{1}{2}") == "\\frac{1}{2}"
    assert normalize_gold(7) == "7"
    assert normalize_gold(None) is None


def test_math_accuracy_positive_and_negative(acc):
    cases = [  # (completion, gold, expected)
        ("\\boxed{18}", "Janet has 3 + 15 = 18 eggs.\n#### 18", 1.0),
        ("17", "#### 18", 0.0),
        ("1/2", "0.5", 1.0),
        ("$\\frac{1}{2}$", "0.5", 1.0),
        ("19", "19", 1.0),
        ("The answer is 19.", "19", 1.0),
        ("19 apples", "19", 1.0),
        ("\\boxed{19}", "#### 19", 1.0),
        ("12 + 7 = 9", "19", 0.0),
        ("The total is 1,234.", "#### 1,234", 1.0),
        ("<think>maybe 18</think> so 17", "18", 0.0),  # only the text after </think> counts
        ("<think>maybe 17</think> 18", "18", 1.0),
        ("no number here", "18", 0.0),
        ("\\boxed{18}", "\\frac{", None),  # gold does not parse -> cannot be scored
        ("\\boxed{18}", None, None),  # gold missing
    ]
    completions = [c for c, _, _ in cases]
    golds = [g for _, g, _ in cases]
    before = acc.counters()
    scores = acc(["q"] * len(cases), completions, answer=golds)
    assert scores == [e for _, _, e in cases]
    after = acc.counters()
    assert after["items"] - before["items"] == len(cases)
    assert after["gold_unparsed"] - before["gold_unparsed"] == 2
    assert after["correct"] - before["correct"] == 9
    assert after["timeouts"] == before["timeouts"]


def test_answers_left_as_arithmetic_do_not_count(pool):
    cases = [  # (completion, gold, evaluated_only verdict): math-verify alone says 1.0 to all
        ("so she collects 44 + 22 stickers.", "66", 0.0),
        ("she has 66 - 0 apples", "66", 0.0),
        ("\\boxed{6 * 7}", "42", 0.0),
        ("2^3", "8", 0.0),
        ("1/2 + 1/4", "0.75", 0.0),
        ("44 + 22 = 66 stickers", "66", 1.0),  # the worked-out result is the answer
        ("1/2", "0.5", 1.0),  # a fraction, a percentage, a closed form are answers
        ("66%", "0.66", 1.0),
        ("$1 + \\sqrt{2}$", "$1 + \\sqrt{2}$", 1.0),
        ("$2\\pi$", "$2\\pi$", 1.0),
        ("$2^{10}$", "$2^{10}$", 1.0),  # the gold is written the same way
    ]
    strict = MathAccuracy(timeout=2.0, pool=pool)
    lenient = MathAccuracy(timeout=2.0, pool=pool, evaluated_only=False)
    completions, golds = [c for c, _, _ in cases], [g for _, g, _ in cases]
    assert strict(["q"] * len(cases), completions, answer=golds) == [e for _, _, e in cases]
    assert lenient(["q"] * len(cases), completions, answer=golds) == [1.0] * len(cases)


def test_math_accuracy_gold_column_and_latex_only(pool):
    custom = MathAccuracy(gold_column="solution", plain_numbers=False, latex_without_anchor=False,
                          timeout=2.0, pool=pool)
    # TRL / open-r1 parsing: a bare "19" or an unanchored "$1/2$" has nothing to extract.
    got = custom(["q"] * 3, ["\\boxed{19}", "19", "$\\frac{1}{2}$"], solution=["19", "19", "0.5"])
    assert got == [1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="solution"):
        custom(["q"], ["19"], answer=["19"])


@pytest.mark.parametrize("hostile", [TOWER, NESTED, FACTORIAL], ids=["tower", "braces", "factorial"])
def test_hostile_inputs_return_within_timeout(acc, hostile):
    start = time.monotonic()
    scores = acc(["q"] * 3, [hostile, "18", "\\boxed{18}"], answer=["18"] * 3)
    elapsed = time.monotonic() - start
    assert elapsed < acc.timeout + 3.0, elapsed
    assert scores == [0.0, 1.0, 1.0]  # not equal to 18, by verification or by timeout
    assert acc(["q"], ["\\boxed{18}"], answer=["#### 18"]) == [1.0]  # the pool still works


def test_hard_deadline_kills_and_replaces_worker(pool):
    # A 0.5 s hard deadline is shorter than math-verify's own 1 s signal timeout, which the tower
    # always runs into, so the worker must be killed from outside and replaced.
    quick = MathAccuracy(timeout=0.5, timeout_value=-1.0, pool=pool)
    kills = pool.kills
    start = time.monotonic()
    scores = quick(["q"] * 4, ["\\boxed{18}", TOWER, "17", "The answer is 18"], answer=["18"] * 4)
    elapsed = time.monotonic() - start
    assert scores == [1.0, -1.0, 0.0, 1.0]
    assert elapsed < 0.5 + 3.0, elapsed
    assert quick.counters()["timeouts"] == 1
    assert pool.kills == kills + 1
    # Both workers serve again afterwards: a batch large enough to use every worker.
    n = 40
    scores = quick(["q"] * n, [str(i) for i in range(n)], answer=["#### 7"] * n)
    assert scores == [1.0 if i == 7 else 0.0 for i in range(n)]
    assert quick.counters()["timeouts"] == 1


def test_math_accuracy_from_worker_thread(acc):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(
        acc(["q", "q"], [TOWER, "\\boxed{18}"], answer=["18", "18"])))
    start = time.monotonic()
    thread.start()
    thread.join(timeout=acc.timeout + 10)
    assert not thread.is_alive()
    assert time.monotonic() - start < acc.timeout + 3.0
    assert out == [[0.0, 1.0]]


def test_math_accuracy_concurrent_callers_share_the_pool(acc):
    results: dict[int, list] = {}

    def call(k: int) -> None:
        results[k] = acc(["q"] * 10, [str(k + i) for i in range(10)], answer=[str(k + 3)] * 10)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for k in range(4):
        assert results[k] == [1.0 if i == 3 else 0.0 for i in range(10)]


def test_owned_pool_pickle_worker_crash_and_close():
    with MathAccuracy(timeout=5.0, num_workers=1) as original:
        copy = pickle.loads(pickle.dumps(original))  # e.g. shipped to a Ray actor
    assert copy(["q"], ["\\boxed{5}"], answer=["5"]) == [1.0]  # the copy starts its own pool
    pool = copy.pool
    out: list = []
    thread = threading.Thread(target=lambda: out.append(
        copy(["q", "q"], [TOWER, "\\boxed{3}"], answer=["18", "3"])))
    thread.start()
    time.sleep(0.3)  # the worker is now inside the tower (about 1 s until its own alarm)
    for worker in list(pool._all):
        worker.proc.kill()  # a crash from outside, as the OOM killer would do
    thread.join(timeout=15)
    assert out == [[0.0, 1.0]]  # the crashed item scores timeout_value; the other is requeued
    assert copy.counters()["errors"] == 1 and copy.counters()["timeouts"] == 0
    assert "worker process died" in copy.last_errors[0]
    copy.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score([("1", "1")], copy.options, 1.0)


# ---------------------------------------------------------------------------- format / length


def test_format_default_tags():
    fmt = rewards.get("format")
    completions = [
        "<think>3 + 15 = 18</think>\n<answer>18</answer>",  # right
        "  <think>a</think><answer>b</answer>\n",  # whitespace around is fine
        "<answer>18</answer><think>x</think>",  # wrong order
        "<think>a</think> text <answer>b</answer>",  # text between blocks
        "<think>a<think>b</think><answer>c</answer>",  # nested / repeated tag
        "18",
    ]
    assert fmt(["q"] * 6, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_ends_with_number_and_pattern():
    ends = rewards.get("format", ends_with_number=True)
    texts = ["19", "The answer is 19.", "It is -3.5", "Total: 1,234", "nineteen", "19 apples", "v2"]
    assert ends(["q"] * 7, texts) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    boxed = rewards.get("format", pattern=r".*\\boxed\{[^}]*\}.*", reward=0.5, penalty=-0.5)
    assert boxed(["q", "q"], ["so \\boxed{4}.", "so 4"]) == [0.5, -0.5]
    anywhere = FormatReward(r"answer", search=True)
    assert anywhere(["q", "q"], ["the answer: 4", "4"]) == [1.0, 0.0]
    both = FormatReward(tags=("answer",), ends_with_number=True)  # every check must pass
    assert both(["q", "q"], ["<answer>4</answer>", "4"]) == [0.0, 0.0]
    assert FormatReward(tags=("answer",))(["q"], ["<answer>4</answer>"]) == [1.0]


def test_format_equations_must_be_true():
    eq = rewards.get("format", equations=True)
    texts = ["Tom has 54 - 24 = 30 pencils left.", "Kofi has 5 + 3 = 6 books.", "3 x 4 = 12, 12 + 1 = 13",
             "3 x 4 = 12, 12 + 1 = 14", "10 / 4 = 2.5", "7 - 9 = -2", "34 - 14 = 20.5", "20", "10 / 0 = 0"]
    assert eq(["q"] * 9, texts) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # the preset's shape (one line, one "=") and a true sum: each check alone passes a wrong sum or a ramble
    preset = FormatReward(r"[^\n=]*?\d+\s*[-+]\s*\d+\s*=\s*\d+[^\d\n=]*\s*", equations=True)
    assert preset(["q"] * 3, ["She has 9 + 4 = 13 pens.", "She has 9 + 4 = 12 pens.", "9 + 4 = 13\nso 13 pens"]) == [1.0, 0.0, 0.0]
    half = FormatReward(r"[^\n=]*?\d+\s*[-+]\s*\d+\s*=\s*\d+[^\d\n=]*\s*", equations=True, false_equation_reward=0.5)
    assert half(["q"] * 3, ["She has 9 + 4 = 13 pens.", "She has 9 + 4 = 12 pens.", "9 + 4 = 13\nso 13 pens"]) == [1.0, 0.5, 0.0]


def test_soft_overlong_against_hand_values():
    pen = rewards.get("soft_overlong", max_completion_len=100, soft_punish_cache=20)
    lengths = [0, 80, 81, 90, 99, 100, 101, 5000]
    # free up to 100 - 20 = 80; then (80 - L) / 20; -1 beyond 100
    expected = [0.0, 0.0, -1 / 20, -10 / 20, -19 / 20, -1.0, -1.0, -1.0]
    got = pen(["q"] * 8, ["c"] * 8, completion_token_counts=lengths)
    assert got == pytest.approx(expected, abs=1e-12)
    step = SoftOverlong(max_completion_len=10, soft_punish_cache=0)
    assert step(["q"] * 3, ["c"] * 3, completion_token_counts=[10, 11, 3]) == [0.0, -1.0, 0.0]
    with pytest.raises(KeyError, match="completion_token_counts"):
        pen(["q"], ["c"], completion_ids=[[1, 2]])
    with pytest.raises(ValueError):
        SoftOverlong(max_completion_len=10, soft_punish_cache=11)


# ---------------------------------------------------------------------------- runner


def _length_reward(prompts, completions, **cols):
    return [float(len(c)) for c in completions]


def _sometimes_none(prompts, completions, **cols):
    return [None if c.startswith("?") else 1.0 for c in completions]


def test_runner_weighted_total_and_components():
    specs = [RewardSpec("length", _length_reward, weight=0.5),
             RewardSpec("flag", _sometimes_none, weight=2.0),
             {"name": "ends", "fn": "format", "weight": 3.0, "kwargs": {"ends_with_number": True}}]
    completions = ["ab", "?x", "n 7", "?"]
    with RewardRunner(specs) as runner:
        res = runner(["p"] * 4, completions, {"answer": ["1"] * 4})
    assert res.components["length"] == [2.0, 2.0, 3.0, 1.0]
    assert res.components["flag"] == [1.0, None, 1.0, None]
    assert res.components["ends"] == [0.0, 0.0, 1.0, 0.0]
    # Hand sums, None components left out: 0.5*len + 2*flag + 3*ends.
    assert res.total == pytest.approx([0.5 * 2 + 2.0, 0.5 * 2, 0.5 * 3 + 2.0 + 3.0, 0.5 * 1])
    assert res.metrics["reward/flag/none"] == 2.0
    assert res.metrics["reward/flag/mean"] == 1.0
    assert res.metrics["reward/length/mean"] == pytest.approx((2 + 2 + 3 + 1) / 4)
    assert res.metrics["reward/total/mean"] == pytest.approx(sum(res.total) / 4)
    assert all(res.metrics[f"reward/{n}/seconds"] >= 0 for n in ("length", "flag", "ends"))

    with RewardRunner(specs[:2], missing="propagate") as strict:
        res = strict(["p"] * 4, completions)
    assert res.total == [0.5 * 2 + 2.0, None, 0.5 * 3 + 2.0, None]
    assert res.metrics["reward/total/none"] == 2.0
    with RewardRunner([RewardSpec("flag", _sometimes_none)]) as only:
        assert only(["p"], ["?"]).total == [None]  # every component None -> None


def test_truncated_replies_get_the_configured_total_and_keep_their_components():
    from align.config import RewardFnConfig, RewardsConfig
    from align.evaluate import reward_runner, score_samples
    from align.types import Sample

    cfg = RewardsConfig(functions=[RewardFnConfig(name="number_closeness", weight=0.5),
                                   RewardFnConfig(name="format", weight=0.2, kwargs={"ends_with_number": True})],
                        accuracy=None, truncated_reward=-0.25)
    # gold 40: "39" is 1/20 of the half-gold tolerance off (closeness 0.95), "20" all of it (0); both end with a number
    samples = [Sample("p", [1], text, [2], finish_reason=fin, columns={"answer": "40"})
               for text, fin in [("it is 39", "stop"), ("so far 39", "length"), ("then 20", "length")]]
    with reward_runner(cfg) as runner:
        metrics = score_samples(runner, samples)
    assert [s.reward for s in samples] == pytest.approx([0.5 * 0.95 + 0.2, -0.25, -0.25])
    assert samples[1].reward_components == pytest.approx({"number_closeness": 0.95, "format": 1.0})
    assert metrics["reward/total/truncated"] == 2.0
    assert metrics["reward/total/mean"] == pytest.approx((0.5 * 0.95 + 0.2 - 0.5) / 3)
    with reward_runner(RewardsConfig(functions=cfg.functions, accuracy=None)) as runner:  # default: scored
        score_samples(runner, samples)
    assert samples[1].reward == pytest.approx(0.5 * 0.95 + 0.2)


def test_runner_with_math_and_counters(pool):
    math = MathAccuracy(timeout=0.5, pool=pool)
    specs = [RewardSpec("math", math, weight=1.0),
             RewardSpec("fmt", FormatReward(ends_with_number=True), weight=0.25)]
    with RewardRunner(specs) as runner:  # closing `math` leaves a pool it was given running
        res = runner(["q"] * 3, ["It is 18", "\\boxed{17}", TOWER], {"answer": ["#### 18"] * 3})
    assert res.components["math"] == [1.0, 0.0, 0.0]
    assert res.components["fmt"] == [1.0, 0.0, 0.0]
    assert res.total == pytest.approx([1.25, 0.0, 0.0])
    assert res.metrics["reward/math/timeouts"] == 1.0  # counted for this call only
    assert res.metrics["reward/math/items"] == 3.0
    assert pool.score([("1", "1")], math.options, 2.0) == [1.0]  # the shared pool is still open


def test_runner_calls_rewards_concurrently():
    def slow(prompts, completions, **cols):
        time.sleep(0.5)
        return [1.0] * len(completions)

    with RewardRunner([RewardSpec("a", slow), RewardSpec("b", slow, weight=2.0)]) as runner:
        start = time.monotonic()
        res = runner(["p"], ["c"])
        elapsed = time.monotonic() - start
    assert res.total == [3.0]
    assert elapsed < 0.95, elapsed


def _picky(prompts, completions, **cols):
    out = []
    for c in completions:
        if "bad" in c:
            raise ValueError("cannot score this one")
        out.append(1.0)
    return out


def test_runner_error_policies():
    prompts = ["p0", "p1", "please score me", "p3"]
    completions = ["fine", "ok", "a bad answer", "good"]
    with RewardRunner([RewardSpec("picky", _picky, on_error="raise")]) as runner:
        with pytest.raises(RewardError) as info:
            runner(prompts, completions)
    message = str(info.value)
    assert "'picky'" in message and "row 2" in message
    assert "please score me" in message and "a bad answer" in message
    assert "cannot score this one" in message
    assert info.value.name == "picky" and info.value.row == 2

    specs = [RewardSpec("picky", _picky, on_error="none"), RewardSpec("len", _length_reward, 0.1)]
    with RewardRunner(specs) as runner:
        res = runner(prompts, completions)
    assert res.components["picky"] == [1.0, 1.0, None, 1.0]
    assert res.metrics["reward/picky/errors"] == 1.0
    assert res.total == pytest.approx([1.4, 1.2, 1.2, 1.4])

    def wrong_length(prompts, completions, **cols):
        return [1.0]

    with RewardRunner([RewardSpec("short", wrong_length)]) as runner:
        # Each row alone succeeds, so the batch as a whole is blamed.
        with pytest.raises(RewardError, match="'short' failed on the whole batch.*1 scores for 2"):
            runner(["a", "b"], ["x", "y"])


def _hang(prompts, completions, **cols):
    threading.Event().wait()  # never returns, as a parser stuck on hostile input


def test_a_reward_that_never_returns_costs_one_deadline():
    first = threading.Event()

    def hangs_once(prompts, completions, **cols):
        if not first.is_set():
            first.set()
            threading.Event().wait()
        return [0.5] * len(completions)

    specs = [RewardSpec("hang", hangs_once, on_error="none", timeout=1.0),
             RewardSpec("len", _length_reward, weight=0.1)]
    with RewardRunner(specs) as runner:
        start = time.monotonic()
        res = runner(["p", "q"], ["ab", "abcd"])
        elapsed = time.monotonic() - start
        assert 0.95 < elapsed < 2.0, elapsed  # one deadline, not forever
        assert res.components["hang"] == [None, None] and res.components["len"] == [2.0, 4.0]
        assert res.total == pytest.approx([0.2, 0.4])  # the step's other rewards are kept
        assert res.metrics["reward/hang/deadline_missed"] == 1.0 and res.metrics["reward/hang/none"] == 2.0
        assert res.metrics["reward/hang/stuck"] == 1.0 and res.metrics["reward/len/deadline_missed"] == 0.0
        start = time.monotonic()
        res = runner(["p"], ["ab"])  # the next call works while the stuck one still waits
        assert time.monotonic() - start < 1.0
        assert res.components["hang"] == [0.5] and res.metrics["reward/hang/deadline_missed"] == 0.0
    with RewardRunner([RewardSpec("hang", _hang, timeout=0.5)]) as strict:
        with pytest.raises(RewardError, match=r"reward 'hang' \(_hang\) did not return within its deadline "
                                              r"of 0.5 s") as info:
            strict(["p"], ["c"])
    assert info.value.name == "hang" and info.value.row is None
    with pytest.raises(ValueError, match="timeout must be > 0"):
        RewardSpec("bad", _hang, timeout=0)


def test_a_stuck_reward_does_not_hold_up_process_exit(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(textwrap.dedent("""
        import threading
        from rewards import RewardRunner, RewardSpec

        def hang(prompts, completions, **cols):
            threading.Event().wait()

        runner = RewardRunner([RewardSpec("hang", hang, on_error="none", timeout=0.2)])
        print(runner(["p"], ["c"]).components["hang"])
        runner.close()
    """))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[None]"
    assert time.monotonic() - start < 30  # it exits: the stuck thread is a daemon


# ---------------------------------------------------------------------------- remote


class _Handler(BaseHTTPRequestHandler):
    calls: dict[str, int] = {}

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        count = self.calls[self.path] = self.calls.get(self.path, 0) + 1
        if self.path == "/flaky" and count == 1:
            return self._reply(503, {"error": "warming up"})
        if self.path == "/slow":
            time.sleep(1.5)
        if self.path == "/bad":
            return self._reply(400, {"error": "bad request"})
        if self.path == "/auth" and self.headers.get("Authorization") != "Bearer s3cret-token":
            return self._reply(401, {"error": "unauthorized"})
        scores = [1.0 if c.strip() == a else 0.0
                  for c, a in zip(body["completions"], body["answer"])]
        payload = scores if self.path == "/bare" else {"rewards": scores}
        self._reply(200, payload)

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_ok_and_bare_list(server):
    judge = rewards.get("remote", url=server + "/ok", timeout=5.0)
    assert judge(["q", "q"], ["4", " 5"], answer=["4", "4"]) == [1.0, 0.0]
    bare = RemoteReward(server + "/bare", batch_size=1)
    assert bare(["q", "q", "q"], ["4", "5", "6"], answer=["4", "5", "5"]) == [1.0, 1.0, 0.0]
    assert bare.counters()["requests"] == 3


def test_remote_retries_after_failure(server):
    judge = RemoteReward(server + "/flaky", timeout=5.0, retries=2, backoff=0.05)
    assert judge(["q"], ["4"], answer=["4"]) == [1.0]
    assert judge.counters() == {"requests": 2, "retries": 1, "failures": 0}


def test_remote_timeout_and_client_error(server):
    judge = RemoteReward(server + "/slow", timeout=0.3, retries=1, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="2 attempts"):
        judge(["q"], ["4"], answer=["4"])
    assert time.monotonic() - start < 2 * 0.3 + 0.05 + 1.0
    assert judge.counters()["failures"] == 1
    # Under the runner with on_error="none" the whole batch is None, without row-by-row retries.
    with RewardRunner([RewardSpec("judge", judge, on_error="none")]) as runner:
        res = runner(["q", "q"], ["4", "4"], {"answer": ["4", "4"]})
    assert res.components["judge"] == [None, None] and res.total == [None, None]
    assert res.metrics["reward/judge/errors"] == 2.0
    assert res.metrics["reward/judge/requests"] == 2.0  # one batch, two attempts
    bad = RemoteReward(server + "/bad", retries=3, backoff=0.05)
    with pytest.raises(RemoteRewardError, match="HTTP 400"):
        bad(["q"], ["4"], answer=["4"])
    assert bad.counters()["requests"] == 1  # a 4xx is not retried


def test_remote_header_from_the_environment(server, monkeypatch):
    headers = {"Authorization": "Bearer ${env:ALIGN_TEST_JUDGE_TOKEN}"}
    monkeypatch.delenv("ALIGN_TEST_JUDGE_TOKEN", raising=False)
    with pytest.raises(RewardConfigError, match="environment variable ALIGN_TEST_JUDGE_TOKEN is not set"):
        rewards.get("remote", url=server + "/auth", headers=headers)
    monkeypatch.setenv("ALIGN_TEST_JUDGE_TOKEN", "s3cret-token")
    kwargs = {"url": server + "/auth", "headers": headers, "retries": 0}
    spec = RewardSpec("judge", "remote", kwargs=kwargs)
    assert spec.fn(["q"], ["4"], answer=["4"]) == [1.0]  # the server checked the resolved header
    assert spec.kwargs["headers"] == headers  # the config keeps the reference, not the token
    direct = RemoteReward(server + "/auth", headers=headers, retries=0)  # the Python API too
    assert direct(["q"], ["5"], answer=["4"]) == [0.0]


# ---------------------------------------------------------------------------- user functions


def test_user_function_from_file_and_module(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent("""
        def brevity(prompts, completions, **columns):
            return [1.0 / (1 + len(c)) for c in completions]

        def make_scaled(scale):
            def scaled(prompts, completions, **columns):
                return [scale * len(c) for c in completions]
            return scaled

        NOT_CALLABLE = 3
    """))
    brevity = rewards.get(f"{path}:brevity")
    assert brevity(["q", "q"], ["", "abc"]) == [1.0, 0.25]
    assert rewards.get(f"{path}:make_scaled", scale=2.0)(["q"], ["abc"]) == [6.0]
    fmt = rewards.get("rewards.format:FormatReward", ends_with_number=True)
    assert fmt(["q"], ["x = 3"]) == [1.0]
    with RewardRunner([RewardSpec("brev", f"{path}:brevity", weight=4.0)]) as runner:
        assert runner(["q"], ["abc"]).total == [1.0]
    with pytest.raises(TypeError, match="not a callable"):
        rewards.get(f"{path}:NOT_CALLABLE")
    with pytest.raises(AttributeError, match="missing"):
        rewards.get(f"{path}:missing")
    with pytest.raises(FileNotFoundError):
        rewards.get(f"{tmp_path}/nope.py:f")


def test_number_match_scores_the_last_number_against_the_gold():
    fn = rewards.get("number_match")
    got = fn(["p"] * 5, ["12 + 7 = 19", "It is 1,234.", "about 5 or 6", "no number", "x"],
             answer=["19", "#### 1,234", "5", "3", None])
    assert got == [1.0, 1.0, 0.0, 0.0, None]


def test_number_closeness_gives_partial_credit_by_relative_error():
    fn = rewards.get("number_closeness")  # tolerance 0.5: zero at 50 % off
    got = fn(["p"] * 7, ["55 + 54 = 119", "57 - 55 = 2", "so 109", "none", "x", "It is 1,100.", "3"],
             answer=["109", "112", "109", "5", None, "#### 1,000", "0"])
    assert got[0] == pytest.approx(1 - 10 / 54.5)  # right sum, a carry wrong: most of the credit
    assert got[1:5] == [0.0, 1.0, 0.0, None]  # wrong operation: nothing; exact: all; no number: 0
    assert got[5] == pytest.approx(0.8)  # thousands commas read: 100 off 1000
    assert got[6] == 0.0  # gold 0: the scale is max(|gold|, 1), 3 off is past it
    assert rewards.get("number_closeness", tolerance=0.1)(["p"], ["105"], answer=["100"]) == [pytest.approx(0.5)]
    with pytest.raises(ValueError, match="tolerance"):
        rewards.get("number_closeness", tolerance=0)


def test_digit_match_credits_each_place_from_the_ones():
    fn = rewards.get("digit_match")
    got = fn(["p"] * 9, ["18 + 45 = 62", "= 53", "= 63", "= 163", "= 7", "= -63", "1.5", "none", "x"],
             answer=["63", "63", "63", "63", "107", "63", "1.5", "63", None])
    assert got[:3] == [0.5, 0.5, 1.0]  # the ones wrong costs as much as the tens wrong
    assert got[3] == pytest.approx(2 / 3)  # an extra place counts as a wrong one
    assert got[4] == pytest.approx(1 / 3)  # 7 against 107: the ones right, two places missing
    assert got[5:] == [0.0, 1.0, 0.0, None]  # another sign: nothing; fractions: exact only; no number: 0


def test_number_closeness_can_refuse_numbers_copied_from_the_prompt():
    prompt = "Ravi collects 11 apples on Monday and 29 on Tuesday. How many apples in total?"
    replies = ["Ravi collects 11 apples on Monday and 29 on Tuesday", "11 + 29 = 39", "It is 40."]
    plain = rewards.get("number_closeness")([prompt] * 3, replies, answer=["40"] * 3)
    strict = rewards.get("number_closeness", exclude_prompt_numbers=True)([prompt] * 3, replies, answer=["40"] * 3)
    assert plain[0] == pytest.approx(1 - 11 / 20)  # the restated 29 is 11 off 40: credit without the flag
    assert strict == [0.0, pytest.approx(1 - 1 / 20), 1.0]  # a copied number earns nothing; the rest as before
    assert strict[1:] == plain[1:]
