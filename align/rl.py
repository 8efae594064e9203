"""The online-RL stage: rollout -> reward -> select -> experience -> update -> sync -> log.

    align rl examples/grpo.yaml algorithm.name=dapo          # from the shell
    align.rl.run(load_config(RLConfig, "examples/grpo.yaml")) # from Python

Workers are Ray actors (`train.debug=true` runs them in this process); the algorithm object decides
selection, advantages and the loss, so nothing algorithm-specific appears in `run`'s loop.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import algorithms
import rewards
from algorithms.online_pairs import OnlinePairs
from algorithms.preference import preference_names
from align import actors, checkpoint, placement
from align.actors import ActorGroup
from align.config import save_config, to_dict
from align.cores import CoreLoan, machine_cores, plan_loan
from align.device import engine_dtype, use_gpus
from align.episodes import episode_metrics
from align.evaluate import score_samples, write_samples
from align.experience import build_experience
from align.models import load_tokenizer, resolve_model, set_threads
from align.rl_config import PromptConfig, RLConfig
from align.tracking import Tracker
from align.types import Sample
from align.learners import CriticLearner, PolicyLearner, init_group
from align.workers import ReferenceWorker, RolloutWorker


# ----------------------------------------------------------------------------- prompts
def load_prompts(cfg: RLConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), each with `text` (the engine prompt) and its other columns."""
    return prompt_rows(cfg.data, tokenizer, cfg.train.seed)


def prompt_rows(d: PromptConfig, tokenizer, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`load_prompts` for a prompt section alone (`align eval` reads the same rows as the run)."""
    from align.data import DataError, missing_fields, read_rows, row_origin
    from align.tasks import train_and_heldout

    if d.path == "arithmetic":  # the instruction is prompt_suffix (appended below), not the generator's
        train, held = train_and_heldout(d.train_size, d.eval_size, seed=seed, suffix="")
    else:
        train = read_rows(d.path, d.split, d.max_examples)
        held = read_rows(d.eval_path, d.split)[: d.eval_size] if d.eval_path else []
    use_chat = d.template == "chat" or (d.template == "auto" and bool(tokenizer.chat_template))

    def prepare(rows: list[dict], source: str) -> list[dict]:
        out = []
        for i, row in enumerate(rows):
            if missing_fields(row, (d.prompt_field,)):
                raise DataError(f"{row_origin(row, i, source)}: missing or empty prompt field '{d.prompt_field}'; RL rows "
                                f"look like {{'{d.prompt_field}': text or [{{'role': ..., 'content': ...}}, ...], <columns "
                                f"for the rewards, e.g. 'answer'>}} (this row has: {sorted(row)}; data.prompt_field names "
                                "the column)")
            prompt = row[d.prompt_field]
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt) + d.prompt_suffix}]
            if isinstance(prompt, list) and d.prompt_suffix:
                msgs = msgs[:-1] + [{**msgs[-1], "content": msgs[-1]["content"] + d.prompt_suffix}]
            text = (tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) if use_chat
                    else "\n".join(m["content"] for m in msgs))
            # tokenised once, here: a chat template's text already holds its special tokens (Llama 3's
            # BOS), and the engines' default tokenisation would add a second one
            ids = tokenizer(text, add_special_tokens=not use_chat)["input_ids"]
            if len(ids) > d.max_prompt_length:
                continue
            out.append({"text": text, "ids": ids, "messages": msgs, "columns": {k: v for k, v in row.items()
                                                                                if k not in (d.prompt_field, "completion")}})
        if rows and not out:
            raise DataError(f"{source}: every prompt is longer than data.max_prompt_length={d.max_prompt_length}")
        return out

    return prepare(train, d.path), prepare(held, d.eval_path or d.path)


@dataclass
class PromptStream:
    """Endless seeded shuffles of the training prompts; `epoch` / `pos` make resume exact."""

    rows: list[dict]
    seed: int
    epoch: int = 0
    pos: int = 0
    _order: list[int] = field(default_factory=list)

    def take(self, n: int) -> list[dict]:
        """The next `n` prompts."""
        out = []
        while len(out) < n:
            if not self._order or self.pos >= len(self.rows):
                if self._order:
                    self.epoch, self.pos = self.epoch + 1, 0
                self._order = list(range(len(self.rows)))
                random.Random(self.seed * 1000 + self.epoch).shuffle(self._order)
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out


# ----------------------------------------------------------------------------- the parts of a step
class RLRun:
    """Workers, reward runner and algorithm of one RL run; `step()` is one training step."""

    def __init__(self, cfg: RLConfig, model: Any = None, tokenizer: Any = None, critic_init: Any = None):
        self.cfg = cfg
        set_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.train.seed)
        self.tokenizer = tokenizer or load_tokenizer(cfg.model)
        self.train_rows, self.heldout = load_prompts(cfg, self.tokenizer)
        self.stream = PromptStream(self.train_rows, cfg.train.seed)
        self.algo = algorithms.get(cfg.algorithm.name, **cfg.algorithm.params)
        for f in cfg.reward.functions:  # a typo in a reward's name or kwargs stops here, before Ray and the models start
            rewards.check(f.name, **f.kwargs)
        if cfg.algorithm.name in preference_names():  # a loss over summed sequence logprobs: online pairs
            online = preference_names(pairwise=True)
            if cfg.algorithm.name not in online:
                raise ValueError(f"algorithm {cfg.algorithm.name!r} cannot run online; use {', '.join(online)}")
            if cfg.algorithm.micro_batch_size % 2 or cfg.algorithm.micro_batch_tokens:
                raise ValueError("online preference pairs need an even algorithm.micro_batch_size and no "
                                 "algorithm.micro_batch_tokens (a pair's two rows share a micro-batch)")
            self.algo = OnlinePairs(self.algo)
        self.gen_prompts = _gen_prompts(cfg, self.algo)
        r, res = cfg.rollout, cfg.resources
        self.sampling = _sampling(r, n=r.n, temperature=r.temperature, seed=cfg.train.seed)
        debug, n_learners, needs = cfg.train.debug, cfg.train.num_learners, self.algo.needs
        if debug and (n_learners > 1 or cfg.train.zero_stage):
            raise ValueError("train.num_learners > 1 and train.zero_stage need Ray (train.debug=false): "
                             "learners run in their own processes")
        roles = {"engine": r.num_engines, "learner": n_learners, "critic": n_learners if needs.values else 0,
                 "reference": int(needs.ref_logprobs and cfg.peft.method in ("full", "freeze")),
                 "reward_model": sum(1 for f in cfg.reward.functions if _rm_actor(f))}
        self.placement = self._place(roles, debug)
        path = model if model is not None else resolve_model(cfg.model.name)
        self.merged_sync = merged_lora_sync(r, path, self.use_gpus)
        self.sleep_engines = self.use_gpus and res.colocate and res.sleep_engines
        # one-step-off-policy generation: "auto" = where engines have GPUs of their own (on shared
        # devices the engine and the learner would only take turns on the same hardware)
        self.episodes = episode_runner(cfg, self.tokenizer) if cfg.env.name else None  # multi-turn, with tools
        self.env_seconds = 0.0  # environment and tool time of the step so far
        if self.episodes is not None and r.pipeline == "one-step-off":
            raise ValueError("rollout.pipeline=one-step-off runs one-turn rollouts only; multi-turn episodes "
                             "(env.name) generate turn by turn: use rollout.pipeline=sync")
        self.overlap = self.episodes is None and (
            r.pipeline == "one-step-off" or (r.pipeline == "auto" and self.use_gpus and not res.colocate))
        if r.sync_steps < 0:
            raise ValueError(f"rollout.sync_steps must be >= 0 (the synchronous steps before the overlap), got {r.sync_steps}")
        if self.overlap and self.sleep_engines:
            raise ValueError("rollout.pipeline=one-step-off needs awake engines while the learners train: set "
                             "resources.sleep_engines=false or resources.colocate=false")
        self.prefetched: dict | None = None  # the next step's generation, launched during this step's update
        self.pending_sync: Any = None  # one-step-off: the weight sync the engines apply after that generation
        self.prefetch_stream = (0, 0)  # the prompt stream's position before that launch (what a checkpoint keeps)
        self.correction = {"rollout_correction": rollout_correction(cfg, path, self.use_gpus, self.overlap),
                           "correction_cap": cfg.algorithm.correction_cap}
        self.loan = self._core_loan(roles, debug)
        loan_path = str(self.loan.path) if self.loan is not None else None
        self.engines = ActorGroup(RolloutWorker, r.num_engines, r.backend, path, self.tokenizer if model is not None else None,
                                  enable_lora=not self.merged_sync,
                                  dtype=r.dtype, num_threads=r.num_threads, seed=cfg.train.seed,
                                  max_lora_rank=max(cfg.peft.r, 8), debug=debug, env_threads=r.num_threads or 2,
                                  max_restarts=cfg.train.max_actor_restarts, placement=self._slots("engine"),
                                  device=res.device, tensor_parallel_size=res.engine_gpus if self.use_gpus else 1,
                                  gpu_memory_utilization=r.gpu_memory_utilization, sleep_mode=self.sleep_engines,
                                  loan_path=loan_path)
        self.version = 0  # weights version the engines should hold (bumped at every sync)
        self.train_seconds = 0.0  # the steps' time so far (train.max_time_s counts it)
        self.last_step_s = 0.0  # the last step's time: the estimate of the next one's
        self.out_of_time = False  # train.max_time_s ends the run after this step
        self.restarts = 0  # rollout workers found restarted (and re-synced) so far
        self.nonfinite = 0  # updates skipped for NaN / inf so far
        t = cfg.train
        common = dict(max_grad_norm=t.max_grad_norm, micro_batch_size=cfg.algorithm.micro_batch_size, seed=t.seed,
                      num_threads=t.num_threads, debug=debug, env_threads=t.num_threads or 2, amp=t.autocast,
                      zero_stage=t.zero_stage, zero_offload=t.zero_offload, device=res.device)
        self.learner = ActorGroup(PolicyLearner, n_learners, cfg.model, cfg.peft, t.lr, t.max_steps,
                                  weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                                  lr_scheduler=t.lr_scheduler, temperature=r.temperature,
                                  micro_batch_tokens=cfg.algorithm.micro_batch_tokens, packing=cfg.algorithm.packing,
                                  share_prompt=cfg.algorithm.share_prompt, loan_path=loan_path,
                                  model=model, placement=self._slots("learner"), **common)
        self.reference = None
        if roles["reference"]:
            self.reference = ActorGroup(ReferenceWorker, 1, cfg.model, num_threads=t.num_threads, model=model,
                                        temperature=r.temperature, micro_batch_size=cfg.algorithm.micro_batch_size,
                                        amp=t.autocast, debug=debug, device=res.device,
                                        placement=self._slots("reference"))
        self.critic = None
        if needs.values:
            c = cfg.critic
            critic_model = dataclasses.replace(cfg.model, name=c.model or cfg.model.name)
            critic_peft = dataclasses.replace(cfg.peft, method=c.method or cfg.peft.method)
            # as many critics as policy learners, data-parallel in their own process group
            self.critic = ActorGroup(CriticLearner, n_learners, critic_model, critic_peft, c.lr, t.max_steps,
                                     model=critic_init, placement=self._slots("critic"), **common)
        for group in (self.learner, self.critic):  # one process group each: the same averaged step
            if group is not None and (len(group) > 1 or t.zero_stage):
                init_group(group)
        self.rewards = rewards.RewardRunner(self._reward_specs(), truncated_reward=cfg.reward.truncated_reward)
        self.step_no = 0

    def _place(self, roles: dict[str, int], debug: bool) -> Any:
        """Start Ray and reserve a placement group for `roles` (None in debug mode); sets `use_gpus`."""
        res = self.cfg.resources
        if debug:
            self.use_gpus = use_gpus(res.device, torch.cuda.device_count())
            return None
        # one logical CPU per actor on a CPU machine: engines and learners take turns on the real cores
        actors.init_ray(num_cpus=max(math.ceil(sum(roles.values()) * res.cpus_per_actor), os.cpu_count() or 1))
        nodes = placement.cluster_nodes()
        self.use_gpus = use_gpus(res.device, sum(n.get("GPU", 0.0) for n in nodes))
        self.plan = placement.make_plan(roles, {"engine": res.engine_gpus, "learner": 1, "critic": 1, "reference": 1,
                                                "reward_model": res.reward_model_gpus},
                                        self.use_gpus, res.colocate, res.cpus_per_actor)
        return placement.reserve(self.plan, res.timeout_s)

    def _core_loan(self, roles: dict[str, int], debug: bool) -> CoreLoan | None:
        """The run's core loan (align/cores.py): one engine and one learner, each with a thread
        count, on one machine's CPUs (other roles or machines would need a finer ledger)."""
        r, t = self.cfg.rollout, self.cfg.train
        if (not self.cfg.resources.lend_cores or debug or self.use_gpus or roles["engine"] != 1
                or roles["learner"] != 1 or roles["critic"] or roles["reference"] or roles["reward_model"]
                or len(placement.cluster_nodes()) != 1):
            return None
        plan = plan_loan(r.num_threads, t.num_threads, machine_cores())
        return CoreLoan(*plan) if plan else None

    def _slots(self, role: str) -> tuple[Any, list] | None:
        """The placement group and `role`'s slots in it (None in debug mode)."""
        return None if self.placement is None else (self.placement, self.plan.slots[role])

    def _reward_specs(self) -> list:
        """The run's reward functions; a reward model served by a Ray actor gets its placement slot."""
        specs, k = [], 0
        for f in self.cfg.reward.functions:
            name = f.name.split(":")[-1]
            if _rm_actor(f) and self.placement is not None:
                slot = self.plan.slots["reward_model"][k]
                k += 1
                fn = rewards.get(f.name, **f.kwargs, actor_options=placement.scheduling(self.placement, slot),
                                 device=self.cfg.resources.device)
                specs.append(rewards.RewardSpec(name, fn, weight=f.weight, on_error=f.on_error, timeout=f.timeout))
            else:
                specs.append(rewards.RewardSpec(name, f.name, weight=f.weight, on_error=f.on_error, kwargs=f.kwargs,
                                                timeout=f.timeout))
        return specs

    # -------------------------------------------------------------------- generate + score
    def generate(self, rows: list[dict], sampling: Any, group_offset: int) -> tuple[list[Sample], float]:
        """Samples for `rows`, spread over the engines; returns them and the slowest engine's seconds."""
        return self._collect(self._launch(rows, sampling, group_offset))

    def _launch(self, rows: list[dict], sampling: Any, group_offset: int) -> dict[str, Any]:
        """Ask the engines for samples of `rows` without waiting (rows i, i+n, ... to engine i, each
        engine its own noise); `_collect` gets them. The handle remembers the weights version asked.
        Multi-turn episodes run turn by turn inside `_collect`."""
        if self.episodes is not None:
            return {"episode_rows": rows, "sampling": sampling, "offset": group_offset, "version": self.version}
        return self._engine_launch(rows, sampling, group_offset)

    def _engine_launch(self, rows: list[dict], sampling: Any, group_offset: int) -> dict[str, Any]:
        """`_launch` for one-turn rows (and each turn of a multi-turn batch)."""
        n = len(self.engines)
        parts = [rows[i::n] for i in range(n)]
        per_engine = [dataclasses.replace(sampling, seed=sampling.seed + 7919 * i)
                      if sampling.seed is not None and n > 1 else sampling for i in range(n)]
        # engine i's generate arguments, kept so that a restarted worker can be asked again
        calls = {i: ([p["text"] for p in part], per_engine[i], 0, [p["columns"] for p in part], [p["ids"] for p in part])
                 for i, part in enumerate(parts) if part}
        refs = [self.engines.call(i, "generate", *args) for i, args in calls.items()]
        return {"refs": refs, "calls": calls, "rows": len(rows), "n": sampling.n, "offset": group_offset,
                "version": self.version}

    def _turn(self, texts: list[str], ids: list[list[int]], sampling: Any) -> tuple[list[Sample], float]:
        """One engine call of a multi-turn batch: samples of these token-id prompts."""
        rows = [{"text": t, "ids": i, "columns": {}} for t, i in zip(texts, ids)]
        return self._engine_collect(self._engine_launch(rows, sampling, 0))

    def _collect(self, handle: dict[str, Any]) -> tuple[list[Sample], float]:
        """The samples of a `_launch`, group ids in row order, and the slowest engine's seconds."""
        if "episode_rows" in handle:
            samples, seconds = self.episodes.run(handle["episode_rows"], handle["sampling"], self._turn, handle["offset"])
            self.env_seconds += self.episodes.env_seconds
            return samples, seconds
        return self._engine_collect(handle)

    def _engine_collect(self, handle: dict[str, Any]) -> tuple[list[Sample], float]:
        """`_collect` for an `_engine_launch` handle."""
        results = self._engine_get(handle["refs"])
        for j, (i, (_, _, version)) in enumerate(zip(handle["calls"], results)):
            if version != handle["version"]:  # the worker died and Ray restarted it: re-sync, re-ask
                self.restarts += 1
                self._engine_get(self.engines.call(i, "update", self._payload()))
                results[j] = self._engine_get(self.engines.call(i, "generate", *handle["calls"][i]))
        n, k = len(self.engines), handle["n"]
        by_row: list[list[Sample]] = [[] for _ in range(handle["rows"])]
        for i, (samples, _, _) in zip(handle["calls"], results):
            for j in range(len(samples) // k):
                by_row[i + j * n] = samples[j * k:(j + 1) * k]
        out = []
        for r, group in enumerate(by_row):
            for s in group:
                s.group_id = handle["offset"] + r
                out.append(s)
        return out, max(t for _, t, _ in results)

    def _engine_get(self, refs: Any) -> Any:
        """`actors.get` for rollout-worker calls: a worker that died past its restarts is named as such."""
        try:
            return actors.get(refs)
        except _actor_errors() as exc:
            raise RolloutWorkerDied(
                f"a rollout worker died and used up its train.max_actor_restarts={self.cfg.train.max_actor_restarts} "
                f"restarts (step {self.step_no + 1}): {str(exc).splitlines()[0][:300]}") from None

    def _payload(self) -> dict[str, Any]:
        """The learner's weights for the engines, stamped with the current version (every learner
        is asked: under ZeRO-3 gathering the weights is collective; rank 0's copy is used)."""
        payload = actors.get(self.learner.run("sync_payload"))[0]
        payload["version"] = self.version
        return payload

    def score(self, samples: list[Sample]) -> dict[str, float]:
        """Set each sample's reward and components; returns the runner's metrics."""
        # an episode's tool output is not the model's length
        metrics = score_samples(self.rewards, samples, [_model_tokens(s) for s in samples])
        for s in samples:
            env_reward = s.episode["env_reward"] if s.episode else None
            if env_reward is not None:  # an environment's own reward adds to the reward functions'
                s.reward = (s.reward or 0.0) + env_reward
                s.reward_components["env"] = env_reward
        return metrics

    # -------------------------------------------------------------------- one training step
    def step(self) -> dict[str, Any]:
        """Rollout -> reward -> select -> experience -> update -> sync; returns the step's metrics."""
        t0, times, m = time.perf_counter(), {"generate": 0.0, "reward": 0.0}, {}
        self.env_seconds = 0.0
        cfg, groups, round_, sel = self.cfg, [], 1, None
        if hasattr(self.algo, "for_step"):  # a schedule over steps, e.g. GRPO's kl_steps
            self.algo = self.algo.for_step(self.step_no)
        need, generated = cfg.rollout.prompts_per_step, []
        rng = random.Random(cfg.train.seed * 1_000_003 + self.step_no)  # DUPO's draws: the same after a resume
        while need > 0:
            if self.prefetched is not None:  # launched during the previous step's update (rollout.pipeline)
                handle, self.prefetched = self.prefetched, None
            else:
                handle = self._launch(self.stream.take(max(need, self.gen_prompts)), self._round_sampling(self.step_no, round_),
                                      len(groups))
            t = time.perf_counter()
            samples, dt = self._collect(handle)
            times["wait_generate"] = times.get("wait_generate", 0.0) + time.perf_counter() - t
            m.setdefault("rollout/staleness", self.version - handle["version"])  # weight versions behind the learner
            times["generate"] += dt
            t = time.perf_counter()
            m.update(self.score(samples))
            times["reward"] += time.perf_counter() - t
            generated += samples
            groups += _groups(samples)
            sel = self.algo.select(groups, batch_groups=cfg.rollout.prompts_per_step, round=round_, rng=rng)
            need, round_ = sel.need, round_ + 1
        if self.overlap and cfg.rollout.sync_steps <= self.step_no + 1 < cfg.train.max_steps:
            if not self.fits(2, time.perf_counter() - t0):  # train.max_time_s: this step is the last, since
                self.out_of_time = True  # a next one generated without the overlap would outrun the estimate
            else:  # one step off policy: the engines sample the next step's prompts with the weights they
                # hold now while the learners train on this batch; the sync below queues behind it
                self.prefetch_stream = (self.stream.epoch, self.stream.pos)
                self.prefetched = self._launch(self.stream.take(self.gen_prompts),
                                               self._round_sampling(self.step_no + 1, 1), 0)
        if self.sleep_engines:  # colocated on GPUs: the learners get the engines' memory while they train
            self._engine_get(self.engines.run("sleep"))
        batch = [s for g in sel.groups for s in g]
        exp = build_experience(batch, self.tokenizer.pad_token_id)
        t = time.perf_counter()
        off_policy = cfg.algorithm.epochs > 1 or cfg.algorithm.minibatches > 1
        needs = self.algo.needs
        from_engine = cfg.algorithm.old_policy == "engine"
        if from_engine:  # the sampler's log-probs are pi_old: no recompute, no correction on top
            exp.old_logprobs, exp.engine_logprobs = engine_old_logprobs(exp), None
        shards = _shard(exp, len(self.learner))  # whole groups per learner
        if self.loan is not None:  # the engines are idle unless they already generate the next step
            self.loan.learner_works(engines_idle=self.prefetched is None)
        old = (needs.old_logprobs or off_policy) and not from_engine
        parts = actors.get([self.learner.call(i, "logprobs", sh, old=old, ref=needs.ref_logprobs and self.reference is None)
                            for i, sh in enumerate(shards)])
        lp = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if needs.ref_logprobs and self.reference is not None:
            lp["ref_logprobs"] = actors.get(self.reference.call(0, "logprobs", exp))
        if self.critic is not None:
            lp["values"] = actors.get(self.critic.call(0, "values", exp))
        for k, v in lp.items():
            setattr(exp, k, v)
        adv = self.algo.advantages(**exp.tensors())
        if isinstance(adv, torch.Tensor):
            exp.advantages = adv
        else:  # PPO: GAE advantages, value targets, KL-controller metrics and its next beta
            exp.advantages, exp.returns = adv.advantages, adv.returns
            m.update(adv.metrics)
        times["logprob"] = time.perf_counter() - t
        t = time.perf_counter()
        shards = _shard(exp, len(self.learner))
        # every learner updates on its shard (gradients averaged); rank 0's metrics are reported
        progress = self.train_seconds / cfg.train.max_time_s if cfg.train.max_time_s else None
        updates = [self.learner.call(i, "update", sh, self.algo, cfg.algorithm.epochs, cfg.algorithm.minibatches,
                                     self.correction, progress) for i, sh in enumerate(shards)]
        if self.critic is not None:  # policy and critic are separate actors: they update concurrently
            updates += [self.critic.call(i, "update", sh, self.algo, cfg.algorithm.epochs, cfg.algorithm.minibatches)
                        for i, sh in enumerate(shards)]
        if self.pending_sync is not None:  # the last step's sync: ran on the engines while the learners started
            m["time/engine_sync"] = max(self._engine_get(self.pending_sync))
            self.pending_sync = None
        if self.loan is not None and self.prefetched is not None:
            self._lend_when_generated(updates)
        results = actors.get(updates)
        if self.loan is not None:
            self.loan.learner_waits()
        m.update(results[0])
        if self.critic is not None:  # rank 0 of the critics
            m.update(results[len(shards)])
        if not isinstance(adv, torch.Tensor) and adv.updates:  # e.g. PPO's adaptive KL: from the next step on
            self.algo = dataclasses.replace(self.algo, **adv.updates)
        times["update"] = time.perf_counter() - t
        t = time.perf_counter()
        self.version += 1
        sync = self.engines.run("update", self._payload())
        if self.overlap:  # the engines apply it after the generation they are running (actor calls run in
            self.pending_sync = sync  # order): the next step's update need not wait for it, only its generation
        else:
            self._engine_get(sync)
        times["sync"] = time.perf_counter() - t
        m["engine_restarts"] = self.restarts
        self.nonfinite += int(m.get("skipped_updates", 0))
        m["nonfinite_total"] = self.nonfinite
        if self.nonfinite > cfg.train.max_nonfinite:
            raise FloatingPointError(f"{self.nonfinite} updates skipped for a NaN / inf loss or gradient "
                                     f"(train.max_nonfinite={cfg.train.max_nonfinite}): stopping at step {self.step_no}")
        self.step_no += 1
        m.update(sel.metrics)
        m.update(_sample_metrics(generated, batch, self.cfg.reward.accuracy))
        if self.episodes is not None:
            m.update(episode_metrics(generated))
            times["env"] = self.env_seconds
        m.update({f"time/{k}": v for k, v in times.items()})
        m["time/step"] = self.last_step_s = time.perf_counter() - t0
        self.train_seconds += m["time/step"]
        m["time/train"] = self.train_seconds
        m["gen_tokens_per_s"] = sum(_model_tokens(s) for s in generated) / max(times["generate"], 1e-9)
        return m

    def _lend_when_generated(self, updates: list) -> None:
        """Wait for the updates; if the engines finish the next step's generation first, lend
        their threads to the learner for the rest of the update."""
        import ray

        gen = self.prefetched.get("refs", [])
        while len(ray.wait(updates, num_returns=len(updates), timeout=0.2)[0]) < len(updates):
            if len(ray.wait(gen, num_returns=len(gen), timeout=0)[0]) == len(gen):
                self.loan.learner_works(engines_idle=True)
                return

    def _round_sampling(self, step: int, round_: int) -> Any:
        """Sampling settings of a step's generation round: a fresh seed per step and round (train.seed
        fixes the whole run); engines restore their RNG after a seeded call, so an unseeded one
        would draw the same noise every step."""
        return dataclasses.replace(self.sampling, seed=self.cfg.train.seed * 1_000_003 + step * 101 + round_)

    # -------------------------------------------------------------------- eval, checkpoints
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy (the `reward.accuracy` component) and mean reward."""
        if not self.heldout:
            return {}
        if self.pending_sync is not None:  # the engines serve the latest weights (and a failed sync surfaces here)
            self._engine_get(self.pending_sync)
            self.pending_sync = None
        greedy = _sampling(self.cfg.rollout, n=1, temperature=0.0, seed=0)
        samples, _ = self.generate(self.heldout, greedy, 0)
        self.score(samples)
        out = {"eval/reward": _mean([s.reward for s in samples]), "eval/n": len(samples)}
        if self.cfg.reward.accuracy and any(self.cfg.reward.accuracy in s.reward_components for s in samples):
            out["eval/accuracy"] = _mean([s.reward_components.get(self.cfg.reward.accuracy) for s in samples])
        run_dir = Path(self.cfg.train.output_dir)
        if self.episodes is not None:
            out.update({"eval/" + k: v for k, v in episode_metrics(samples).items()})
            write_episodes(run_dir / "episodes" / f"step_{self.step_no:05d}.jsonl", samples[:self.cfg.env.log_episodes])
        elif self.cfg.train.log_samples:
            write_samples(run_dir / "samples" / f"step_{self.step_no:05d}.jsonl", samples[:self.cfg.train.log_samples])
        return out

    def fits(self, steps: int = 1, running: float = 0.0) -> bool:
        """Whether `steps` more steps, each as long as the last (or as the `running` one has taken so
        far, if longer), stay within train.max_time_s (always without one)."""
        budget = self.cfg.train.max_time_s
        return not budget or self.train_seconds + steps * max(self.last_step_s, running) <= budget

    def has_time(self) -> bool:
        """Whether the next step runs under train.max_time_s: one already generating does (it was
        launched when this step and it fitted); otherwise when one more step as long as the last fits."""
        return self.prefetched is not None or (not self.out_of_time and self.fits())

    def save(self, run_dir: Path) -> Path:
        """A checkpoint of every learner rank (policy and critic), the prompt stream and the RNGs
        (atomic, see align.checkpoint). Weights are the same on every rank: rank 0's are kept."""
        weights = actors.get(self.learner.run("trainable_weights"))[0]
        extra = {"step": self.step_no, "learner": actors.get(self.learner.run("state")),
                 "stream": list(self.prefetch_stream if self.prefetched is not None else (self.stream.epoch, self.stream.pos)),
                 "rng": checkpoint.rng_state(), "train_seconds": self.train_seconds, "last_step_s": self.last_step_s,
                 "algorithm": _hyperparameters(self.algo)}  # what the run changed, e.g. PPO's adaptive beta
        if self.critic is not None:
            critic = actors.get(self.critic.run("trainable_weights"))[0]
            weights.update({_CRITIC + k: v for k, v in critic.items()})
            extra["critic"] = actors.get(self.critic.run("state"))
        return checkpoint.save(run_dir / "checkpoints", self.step_no, weights, extra, to_dict(self.cfg),
                               keep=self.cfg.train.keep_checkpoints)

    def resume(self, run_dir: Path) -> bool:
        """Load the newest complete checkpoint into every rank and push its weights to the engines."""
        path = checkpoint.latest(run_dir / "checkpoints")
        if path is None:
            return False
        weights, extra = checkpoint.load(path, to_dict(self.cfg))
        policy = {k: v for k, v in weights.items() if not k.startswith(_CRITIC)}
        actors.get(self.learner.run("load", policy, extra["learner"]))
        if self.critic is not None:
            critic = {k[len(_CRITIC):]: v for k, v in weights.items() if k.startswith(_CRITIC)}
            actors.get(self.critic.run("load", critic, extra["critic"]))
        self.stream.epoch, self.stream.pos = extra["stream"]
        self.stream._order = []
        if self.stream.pos:  # rebuild this epoch's order, then continue at pos
            self.stream._order = list(range(len(self.stream.rows)))
            random.Random(self.stream.seed * 1000 + self.stream.epoch).shuffle(self.stream._order)
        checkpoint.set_rng_state(extra["rng"])
        if extra["algorithm"]:
            self.algo = dataclasses.replace(self.algo, **extra["algorithm"])
        self.step_no = extra["step"]
        self.train_seconds, self.last_step_s = extra.get("train_seconds", 0.0), extra.get("last_step_s", 0.0)
        self.version += 1
        actors.get(self.engines.run("update", self._payload()))
        return True

    def close(self) -> None:
        """Stop reward pools and actors, and give the placement group back."""
        self.rewards.close()
        if self.episodes is not None:
            self.episodes.close()
        for g in (self.engines, self.learner, self.reference, self.critic):
            if g is not None:
                g.kill()
        if self.loan is not None:
            self.loan.close()
        if self.placement is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement)


_CRITIC = "critic/"  # prefix of the critic's weights in a checkpoint


class RolloutWorkerDied(RuntimeError):
    """A rollout worker died more often than Ray may restart it."""


def _gen_prompts(cfg: RLConfig, algo: Any) -> int:
    """Prompts one generation round takes: `rollout.gen_prompts_per_step`, or `prompts_per_step` when 0;
    over-sampling needs a selection that keeps `prompts_per_step` groups, and a metric that exists."""
    r, selection = cfg.rollout, getattr(algo, "selection", "none")
    gen = r.gen_prompts_per_step or r.prompts_per_step
    if gen < r.prompts_per_step:
        raise ValueError(f"rollout.gen_prompts_per_step ({gen}) must be 0 or >= rollout.prompts_per_step ({r.prompts_per_step})")
    if gen > r.prompts_per_step and selection == "none":
        raise ValueError(f"rollout.gen_prompts_per_step={gen} over-samples, but algorithm {cfg.algorithm.name!r} keeps "
                         "every group: set algorithm.params.selection to ranked, dynamic or duplicate")
    metric = getattr(algo, "filter_metric", "reward")
    names = [f.name.split(":")[-1] for f in cfg.reward.functions]  # a component's key, as _reward_specs names it
    if metric != "reward" and metric not in names:
        raise ValueError(f"algorithm.params.filter_metric={metric!r} is neither 'reward' nor a reward function "
                         f"of reward.functions ({', '.join(names)})")
    return gen


def engine_old_logprobs(exp: Any) -> torch.Tensor:
    """The engine's log-probs of `exp` as the PPO old policy (`algorithm.old_policy=engine`)."""
    if exp.engine_logprobs is None:
        raise ValueError("algorithm.old_policy=engine needs the engine's log-probs of every sample; this "
                         "batch has samples without them: use algorithm.old_policy=learner")
    return exp.engine_logprobs


def rollout_correction(cfg: RLConfig, model: Any, on_gpu: bool = False, overlap: bool = False) -> str:
    """The run's rollout-correction mode: `algorithm.rollout_correction`, where "auto" means TIS
    (token-truncate) when the engine's log-probs differ from the learner's: other numerics (vLLM or
    llama.cpp kernels, an engine in another dtype, a QLoRA learner whose engine serves the dequantised base)
    or older weights (`overlap`: one step behind), else off."""
    mode = cfg.algorithm.rollout_correction
    if cfg.algorithm.old_policy == "engine":
        if mode not in ("auto", "off"):
            raise ValueError(f"algorithm.rollout_correction={mode} weighs the engine's samples against the learner's "
                             "old policy; with algorithm.old_policy=engine they are the same: leave it auto or off")
        return "off"
    if mode != "auto":
        return mode
    from rollout import resolve_backend

    # an "auto" dtype as the engines will resolve it (GPUs are taken to have fast bf16)
    dtype = "bfloat16" if on_gpu and cfg.rollout.dtype == "auto" else engine_dtype(cfg.rollout.dtype, "cpu")
    differs = (overlap or resolve_backend(cfg.rollout.backend, model) in ("vllm", "llamacpp") or dtype != cfg.model.dtype
               or cfg.peft.method == "qlora")
    return "token-truncate" if differs else "off"


def _hyperparameters(algo: Any) -> dict[str, Any]:
    """The algorithm's scalar hyper-parameters (a checkpoint restores any the run changed)."""
    if not dataclasses.is_dataclass(algo):
        return {}
    return {f.name: getattr(algo, f.name) for f in dataclasses.fields(algo)
            if f.init and type(getattr(algo, f.name)) in (int, float, bool, str)}


def _rm_actor(f) -> bool:
    """Whether reward function config `f` is a reward model served by its own Ray actor."""
    return f.name == "reward_model" and bool(f.kwargs.get("ray_actor"))


def merged_lora_sync(r, model: Any, on_gpu: bool) -> bool:
    """Whether the engines run without LoRA layers and fold each adapter into their weights
    (`rollout.lora_sync`; only vLLM engines differ, the HF engine always merges)."""
    if r.lora_sync != "auto":
        return r.lora_sync == "merged"
    from rollout import resolve_backend

    return resolve_backend(r.backend, model) == "vllm" and not on_gpu


def _shard(exp, n: int) -> list:
    """`exp` cut into `n` contiguous row ranges at group boundaries (near-equal sizes)."""
    if n == 1:
        return [exp]
    gids = exp.group_ids.tolist()
    starts = [0] + [i for i in range(1, len(gids)) if gids[i] != gids[i - 1]]
    bounds = [starts[round(k * len(starts) / n)] for k in range(n)] + [len(gids)]
    if len(set(bounds)) != n + 1:
        raise ValueError(f"{len(starts)} groups cannot be shared by {n} learners")
    return [exp.index(slice(bounds[k], bounds[k + 1])) for k in range(n)]


def _actor_errors() -> tuple[type[BaseException], ...]:
    """Ray's "an actor died" exception where Ray is installed (the in-process path runs without it)."""
    try:
        import ray

        return (ray.exceptions.RayActorError,)
    except ImportError:
        return ()


def _sampling(r, n: int, temperature: float, seed: int):
    from rollout import SamplingParams

    # training rollouts keep the engine's logprobs (mismatch metric, rollout correction); greedy evals do not
    return SamplingParams(n=n, temperature=temperature, top_p=r.top_p, top_k=r.top_k,
                          max_new_tokens=r.max_new_tokens, stop=list(r.stop), seed=seed, logprobs=temperature > 0)


def episode_runner(cfg: RLConfig, tokenizer: Any) -> Any:
    """The run's multi-turn episode runner: `env.name`'s environment, `env.tools` in a sandbox."""
    from align.envs import env_factory
    from align.episodes import EpisodeLimits, EpisodeRunner
    from align.sandbox import ToolRunner
    from align.tools import get_tool

    e = cfg.env
    tools = [get_tool(t) for t in e.tools]
    runner = ToolRunner(tools, workers=e.tool_workers, timeout=e.tool_timeout, memory_mb=e.tool_memory_mb,
                        max_output=e.max_tool_output) if tools else None
    return EpisodeRunner(tokenizer, env_factory(e.name, e.kwargs), tools, EpisodeLimits(e.max_turns, e.max_tokens),
                         runner=runner)


def write_episodes(path: Path, samples: list[Sample]) -> None:
    """Whole episodes as JSONL, for reading: conversation, reward and its parts, counts."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps({"group": s.group_id, "reward": s.reward, "reward_components": s.reward_components,
                                "finish_reason": s.finish_reason, **s.episode}, default=str) + "\n")


def _model_tokens(s: Sample) -> int:
    """Tokens the model generated (an episode's environment tokens are not)."""
    return len(s.completion_ids) if s.completion_mask is None else sum(s.completion_mask)


def _groups(samples: list[Sample]) -> list[list[Sample]]:
    """Samples grouped by group id, in order."""
    out: dict[int, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.group_id, []).append(s)
    return list(out.values())


def _mean(xs: list) -> float:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def _sample_metrics(generated: list[Sample], batch: list[Sample], accuracy: str | None) -> dict[str, float]:
    """Reward, accuracy, length and group statistics of a step."""
    lengths = [_model_tokens(s) for s in generated]
    groups = _groups(generated)
    zero_var = sum(1 for g in groups if len({s.reward for s in g if s.reward is not None}) <= 1)
    out = {"reward": _mean([s.reward for s in generated]), "response_length/mean": sum(lengths) / len(lengths),
           "response_length/max": max(lengths), "truncated_frac": sum(s.truncated for s in generated) / len(generated),
           "zero_variance_group_frac": zero_var / len(groups), "samples_generated": len(generated),
           "samples_trained": len(batch)}
    if accuracy and any(accuracy in s.reward_components for s in generated):
        out["accuracy"] = _mean([s.reward_components.get(accuracy) for s in generated])
    return out


# ----------------------------------------------------------------------------- the driver
def run(cfg: RLConfig, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train as `cfg` says; returns {"before": eval, "after": eval, "history": per-step metrics}."""
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    rl = RLRun(cfg, model, tokenizer)
    history: list[dict] = []
    try:
        if cfg.train.resume and rl.resume(run_dir):
            print(f"[align] resumed from step {rl.step_no}", flush=True)
        before = rl.evaluate() if cfg.train.eval_before and rl.step_no == 0 else {}
        tracker = Tracker(run_dir, cfg.log, cfg.train.max_steps, rl.step_no, to_dict(cfg), desc="rl")
        if before:
            tracker.log(rl.step_no, before)
        while rl.step_no < cfg.train.max_steps and rl.has_time():
            try:
                metrics = rl.step()  # rollout -> reward -> select -> experience -> update -> sync
            except _actor_errors() as exc:  # rollout workers restart; a learner does not
                last = checkpoint.latest(run_dir / "checkpoints")
                raise RuntimeError(
                    f"a learner actor died during step {rl.step_no + 1} ({type(exc).__name__}); "
                    f"newest checkpoint: {last or 'none'}. Run the same command with train.resume=true "
                    "to continue from it") from None
            if cfg.train.eval_every and rl.step_no % cfg.train.eval_every == 0 and rl.step_no < cfg.train.max_steps:
                metrics.update(rl.evaluate())
            # metrics first, then the checkpoint: a kill in between resumes from the previous
            # checkpoint, whose resume drops the lines written after it (Tracker), so no step's
            # line is ever lost or written twice
            tracker.log(rl.step_no, metrics, advance=1, show=("reward", "accuracy", "time/step"))
            if cfg.train.save_every and rl.step_no % cfg.train.save_every == 0:
                rl.save(run_dir)
            history.append(metrics)
        after = rl.evaluate()
        tracker.log(rl.step_no, after)
        rl.save(run_dir)
        if cfg.train.save_final:
            actors.get(rl.learner.call(0, "save_final", str(run_dir / "final"), rl.tokenizer))
        tracker.close(plots={"reward": ["reward", "accuracy", "eval/accuracy"],
                             "step_time": ["time/generate", "time/reward", "time/logprob", "time/update",
                                           "time/sync"]})
    finally:
        rl.close()
    return {"before": before, "after": after, "history": history, "run_dir": run_dir}
