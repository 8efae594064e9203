"""Multi-turn episodes: the batch's episodes advance turn by turn, one engine call per turn.

    runner = EpisodeRunner(tokenizer, env_factory("tools"), [get_tool("calculator")], EpisodeLimits())
    samples, seconds = runner.run(rows, sampling, generate)   # generate(texts, ids, sampling)

Exact tokens: an episode's token ids are the prompt's, then each turn's ids exactly as the engine
sampled them (mask 1, with the engine's log-probs), then the environment's messages rendered by the
chat template as the *difference* between two renderings of a fixed conversation, one with the new
messages and one without (mask 0). Earlier turns are never re-tokenised: decoding and encoding a
sampled reply again can give other ids (verl #6719, TRL #6250), and the learner must score exactly
the ids the engine sampled. A turn that ended without EOS (its token limit, a stop string) is
closed with the template's end-of-turn token, as an environment token.

One `Sample` per episode: `completion_ids` is everything after the prompt, `completion_mask` marks
the model's tokens (the learner's action mask), `completion` is the last model turn's text (what
the reward functions score), `episode` holds the conversation and counts for metrics and logs.
An episode that hits `max_turns` while the environment goes on, or `max_tokens`, is truncated
(finish_reason "length", as a one-turn completion at its token limit).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from align.envs import Environment, Turn
from align.sandbox import ToolRunner
from align.tools import Tool, parse_tool_calls, template_has_tools, tool_instructions
from align.types import Sample

_SENTINEL = "\u2063ALIGN_TURN\u2063"  # an assistant content no template alters, to find where a turn ends


@dataclass
class EpisodeLimits:
    """When an episode stops early."""

    max_turns: int = 4  # model turns per episode
    max_tokens: int = 1024  # tokens after the prompt (model and environment tokens together)


class ChatTokens:
    """The token ids of a conversation's pieces, rendered by the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, tools: list[Tool], eos_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.native = bool(tools) and template_has_tools(tokenizer)  # the template renders `tools` itself
        self.schemas = [t.schema for t in tools] if self.native else None
        self.instructions = tool_instructions(tools) if tools and not self.native else ""
        base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        self._base = base
        self._base_text = self._render(base)
        tail = self._base_text[self._base_text.rindex(_SENTINEL) + len(_SENTINEL):]  # e.g. "<|im_end|>\n"
        # the template's end-of-turn token (ChatML's <|im_end|>, Gemma's <end_of_turn>: not always the
        # tokenizer's EOS) closes a turn that ended without it; what follows it ("\n") opens the next message
        first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
        special = set(tokenizer.all_special_ids) | set(eos_ids)
        self.close_ids = first if first and first[0] in special else []
        close_text = tokenizer.decode(self.close_ids) if self.close_ids else ""
        cut = tail.find(close_text) if close_text else -1
        self.after_eos = tail[cut + len(close_text):] if cut >= 0 else tail
        self.end_ids = set(eos_ids) | set(self.close_ids)  # a turn that ends with one of these is closed

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.schemas, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def with_instructions(self, messages: list[dict]) -> list[dict]:
        """`messages` with the tool instructions in the system message, for templates without `tools`."""
        if not self.instructions:
            return messages
        if messages and messages[0]["role"] == "system":
            return [{**messages[0], "content": messages[0]["content"] + "\n\n" + self.instructions}] + messages[1:]
        return [{"role": "system", "content": self.instructions}] + messages

    def prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        """The first prompt's text and ids (the template's special tokens are in the text)."""
        text = self._render(self.with_instructions(messages), generation_prompt=True)
        return text, self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def after_turn(self, messages: list[dict], ended_with_eos: bool) -> list[int]:
        """Ids that follow a model turn: its closing token when it had none, the template's text after
        the turn, `messages`, and the next assistant turn's opening."""
        full = self._render(self._base + messages, generation_prompt=True)
        if not full.startswith(self._base_text):
            raise ValueError("the chat template renders earlier turns differently once new messages follow "
                             "(e.g. it drops past reasoning); multi-turn episodes need a template whose "
                             "rendering of a conversation only grows")
        text = self.after_eos + full[len(self._base_text):]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids if ended_with_eos else self.close_ids + ids


@dataclass
class _Episode:
    """One episode in progress."""

    env: Environment
    row: int  # index of its data row in the call
    columns: dict  # the row's other fields (the rewards' gold answers)
    prompt_text: str
    prompt_ids: list[int]
    messages: list[dict]
    ids: list[int] = field(default_factory=list)  # after the prompt
    mask: list[int] = field(default_factory=list)  # 1 on model tokens
    logprobs: list[float] | None = field(default_factory=list)
    last_text: str = ""
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    reward: float | None = None
    done: bool = False
    truncated: str | None = None  # why it stopped early: "turn limit" / "token limit"


class EpisodeRunner:
    """Runs a batch of episodes with any rollout engine's `generate`."""

    def __init__(self, tokenizer: Any, make_env: Callable[[], Environment], tools: list[Tool],
                 limits: EpisodeLimits, runner: ToolRunner | None = None, eos_ids: list[int] | None = None) -> None:
        """`make_env`: a fresh environment per episode; `runner`: where tool calls run (made from
        `tools` when None: 2 workers, 5 s deadline)."""
        self.make_env = make_env
        self.limits = limits
        self.tools = runner or (ToolRunner(tools) if tools else None)
        eos = eos_ids or [tokenizer.eos_token_id]
        self.eos_ids = eos
        self.chat = ChatTokens(tokenizer, tools, eos)
        self.env_seconds = 0.0  # environment and tool time of the last `run`

    def run(self, rows: list[dict], sampling: Any, generate: Callable, group_offset: int = 0) -> tuple[list[Sample], float]:
        """`sampling.n` episodes per row (rows as `align.rl.load_prompts` makes them: "columns" and
        "messages"); `generate(texts, ids, sampling) -> (samples, seconds)` is one engine call.
        Returns one Sample per episode, row-major, and the seconds spent generating."""
        t_env = time.perf_counter()
        episodes: list[_Episode] = []
        for r, row in enumerate(rows):
            data = {**row["columns"], "prompt": row["messages"]}
            for k in range(sampling.n):
                env = self.make_env()
                first = env.reset(data)
                text, ids = self.chat.prompt(first)
                if k and ids != episodes[-1].prompt_ids:  # the group's first turn is sampled from one prompt
                    raise ValueError(f"{type(env).__name__}.reset gave different first messages for the same row "
                                     f"(row {r}): a group's episodes share their prompt, so reset must depend on "
                                     "the row only")
                episodes.append(_Episode(env, r, row["columns"], text, ids, list(self.chat.with_instructions(first))))
        self.env_seconds = time.perf_counter() - t_env
        gen_seconds, live, turn = 0.0, episodes, 0
        while live:
            budget = max(self.limits.max_tokens - len(e.ids) for e in live)
            call = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, budget),
                                       seed=None if sampling.seed is None else sampling.seed + 104_729 * turn)
            if turn == 0:  # a group's first turn: one prompt, n samples (engines share its prefill)
                heads = live[::sampling.n]
                samples, dt = generate([e.prompt_text for e in heads], [e.prompt_ids for e in heads], call)
            else:
                samples, dt = generate([e.prompt_text for e in live], [e.prompt_ids + e.ids for e in live],
                                       dataclasses.replace(call, n=1))
            gen_seconds += dt
            t_env = time.perf_counter()
            self._step(live, samples)
            self.env_seconds += time.perf_counter() - t_env
            live, turn = [e for e in live if not e.done], turn + 1
        return [self._sample(e, group_offset) for e in episodes], gen_seconds

    def _step(self, live: list[_Episode], samples: list[Sample]) -> None:
        """Append each model turn, run every tool call of the batch together, then ask the environments."""
        turns, ending = [], []
        for e, s in zip(live, samples):
            room = self.limits.max_tokens - len(e.ids)
            ids, lps, text, finish = s.completion_ids[:room], (s.logprobs or [])[:room], s.completion, s.finish_reason
            if len(ids) < len(s.completion_ids):  # cut by the episode's budget: what the learner sees is all there is
                text, finish, e.truncated = self.chat.tokenizer.decode(ids, skip_special_tokens=True), "length", "token limit"
            e.ids += ids
            e.mask += [1] * len(ids)
            e.logprobs = e.logprobs + lps if e.logprobs is not None and s.logprobs is not None else None
            e.turns += 1
            e.last_text = text
            e.messages.append({"role": "assistant", "content": text})
            calls = parse_tool_calls(text)  # without a runner, the environment answers them itself
            turns.append(Turn(text, finish, calls))
            # no later turn could read a result: such calls are not run (and the episode was cut short)
            ending.append(e.truncated is not None or e.turns >= self.limits.max_turns)
        flat = [c for t, end in zip(turns, ending) if not end for c in t.tool_calls]
        results = self.tools.run(flat) if flat and self.tools is not None else []
        k = 0
        for e, t, end in zip(live, turns, ending):
            if not end:
                t.tool_results, k = results[k:k + len(t.tool_calls)], k + len(t.tool_calls)
            e.tool_calls += len(t.tool_calls)
            e.tool_errors += sum(not r.ok for r in t.tool_results)
            out = e.env.step(t)
            if out.reward is not None:
                e.reward = (e.reward or 0.0) + float(out.reward)
            if end and not e.truncated and (t.tool_calls or not out.done):
                e.truncated = "turn limit"  # the model wanted to go on
            if out.done or e.truncated:
                if t.finish_reason == "length" and not e.truncated:
                    e.truncated = "turn token limit"  # the last reply was cut at rollout.max_new_tokens
                e.done = True
                continue
            env_ids = self.chat.after_turn(out.messages, ended_with_eos=bool(e.ids) and e.ids[-1] in self.chat.end_ids)
            if len(e.ids) + len(env_ids) >= self.limits.max_tokens:  # no room left for a model token
                e.done, e.truncated = True, "token limit"
                continue
            e.ids += env_ids
            e.mask += [0] * len(env_ids)
            if e.logprobs is not None:
                e.logprobs += [0.0] * len(env_ids)
            e.messages += out.messages

    def _sample(self, e: _Episode, group_offset: int) -> Sample:
        """The finished episode as one Sample (see the module docstring)."""
        return Sample(prompt=e.prompt_text, prompt_ids=e.prompt_ids, completion=e.last_text, completion_ids=e.ids,
                      logprobs=e.logprobs, finish_reason="length" if e.truncated else "stop",
                      group_id=group_offset + e.row, columns=dict(e.columns), completion_mask=e.mask,
                      episode={"messages": e.messages, "turns": e.turns, "tool_calls": e.tool_calls,
                               "tool_errors": e.tool_errors, "env_reward": e.reward, "truncated": e.truncated,
                               "model_tokens": sum(e.mask)})

    def close(self) -> None:
        """Stop the tool workers."""
        if self.tools is not None:
            self.tools.close()


def episode_metrics(samples: list[Sample]) -> dict[str, float]:
    """Turns, tool calls (per episode, share of episodes with one, error rate), finished / truncated shares."""
    eps = [s.episode for s in samples if s.episode]
    if not eps:
        return {}
    calls = sum(e["tool_calls"] for e in eps)
    return {"episode/turns": sum(e["turns"] for e in eps) / len(eps),
            "episode/tool_calls": calls / len(eps),
            "episode/tool_use_frac": sum(e["tool_calls"] > 0 for e in eps) / len(eps),
            "episode/tool_error_rate": sum(e["tool_errors"] for e in eps) / calls if calls else 0.0,
            "episode/finished_frac": sum(e["truncated"] is None for e in eps) / len(eps),
            "episode/truncated_frac": sum(e["truncated"] is not None for e in eps) / len(eps),
            "episode/model_tokens": sum(e["model_tokens"] for e in eps) / len(eps)}
