"""Imported by vLLM inside each of its worker processes (as `worker_extension_cls`), never by align.

Importing this module in a worker does two things before the worker loads its model:
- sets the worker's torch thread count from ALIGN_VLLM_NUM_THREADS (vLLM's CPU worker replaces
  `torch.set_num_threads` by a no-op once its device is up, so this is the last chance);
- on CPU only, stops vLLM-CPU from repacking linear weights into its own kernels. The repacked
  layers keep an empty `weight` (no `weight_loader`), so a later `load_weights` fails with
  "'Parameter' object has no attribute 'weight_loader'", and lm_head/embedding layers keep a
  packed copy that new weights never reach. With plain `F.linear` the weights stay live
  (ENVIRONMENT.md, "vLLM on a CPU").
"""
from __future__ import annotations

import os

import torch


def _setup_worker_process() -> None:
    """Thread count and the CPU weight-packing patch; runs once at import in a vLLM worker."""
    threads = os.environ.get("ALIGN_VLLM_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        import vllm.model_executor.layers.utils as layer_utils

        def plain_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
            layer.cpu_linear = torch.nn.functional.linear

        # linear.py / vocab_parallel_embedding.py import this name inside the function that calls
        # it, so replacing the module attribute reaches every layer loaded after this point
        layer_utils.dispatch_cpu_unquantized_gemm = plain_linear


_setup_worker_process()


class AlignWorkerExtension:
    """Methods mixed into vLLM's worker class; the engine calls them with `collective_rpc`."""

    def align_load_weights(self, blob: bytes) -> int:
        """Load HF-named weights (a safetensors blob) through the model's own `load_weights` (it
        fuses q/k/v and gate/up and shards for tensor parallelism); returns how many vLLM
        parameters were written."""
        from safetensors.torch import load

        state_dict = load(blob)
        cache = self.__dict__.get("_align_w0", {})
        for n in set(cache) & set(state_dict):  # new base weights: later LoRA merges start from them
            cache[n] = state_dict[n].float()
        self.__dict__["_align_merged"] = set()
        model = self.model_runner.model  # type: ignore[attr-defined]
        loaded = model.load_weights(weights=list(state_dict.items()))
        return len(loaded) if loaded is not None else len(state_dict)

    def align_set_lora(self, lora_id: int, blob: bytes, rank: int) -> int:
        """Serve an adapter built in memory: drop every adapter registered before, then (unless
        `blob` is empty) build a `LoRAModel` from the tensors and register it in this worker's LoRA
        manager under `lora_id`, so that a request with that id finds it loaded and never reads
        its (placeholder) path. `blob`: safetensors of `rollout.lora.scaled_adapter` (scale already
        in B, so the adapter's own scaling is 1); returns how many modules it adapts."""
        import inspect

        from safetensors.torch import load
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        from align.device import HOST

        worker_manager = self.model_runner.lora_manager  # type: ignore[attr-defined]
        manager = worker_manager._adapter_manager  # vLLM's LoRAModelManager of this worker
        for old in list(manager.list_adapters()):
            manager.remove_adapter(old)
        if not blob:
            return 0
        tensors = load(blob)
        targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in tensors})
        helper = PEFTHelper(r=rank, lora_alpha=rank, target_modules=targets)  # scaling alpha/r = 1
        helper.validate_legal(worker_manager.lora_config)
        expected = set()  # module names vLLM can adapt in this model ("q_proj", not "qkv_proj")
        for m in manager.supported_lora_modules:
            expected.update(manager.packed_modules_mapping.get(m, [m]))
        unknown = sorted(set(targets) - expected)
        if unknown:
            raise ValueError(f"vLLM cannot serve LoRA on {unknown} in this model; it adapts "
                             f"{sorted(expected)}")
        model = manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)  # e.g. Qwen2-VL's renamed modules
        kwargs = dict(device=str(HOST), dtype=worker_manager.lora_config.lora_dtype,
                      weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
                      model_vocab_size=worker_manager.vocab_size,
                      skip_prefixes=getattr(model, "lora_skip_prefixes", None))
        accepted = inspect.signature(LoRAModel.from_lora_tensors).parameters  # differs by version
        lora = LoRAModel.from_lora_tensors(lora_id, tensors, helper,
                                           **{k: v for k, v in kwargs.items() if k in accepted})
        for weights in lora.loras.values():  # rank_pattern: each module keeps its own rank
            weights.rank = weights.lora_a.shape[0]
        manager.add_adapter(lora)  # on the host; copied into a device slot by the first request
        return len(lora.loras)

    def align_merge_lora(self, blob: bytes, scales: dict[str, float]) -> int:
        """Serve base + LoRA with no LoRA layers: W = W0 + scale * B @ A for every adapted module
        (`blob`: "<module>.A" / "<module>.B" tensors), W0 read once from the checkpoint files and
        kept in memory, the result loaded through `load_weights` like a full update."""
        from safetensors.torch import load

        lora = load(blob)
        before = self.__dict__.setdefault("_align_merged", set())
        restore = before - set(scales)  # merged last time, not adapted now: back to W0
        base = self._align_base_weights([f"{m}.weight" for m in set(scales) | restore])
        merged = [(f"{m}.weight", base[f"{m}.weight"]) for m in sorted(restore)]
        for module, scale in scales.items():
            w0 = base[f"{module}.weight"]  # (out, in) float32
            merged.append((f"{module}.weight", w0 + scale * (lora[f"{module}.B"].float() @ lora[f"{module}.A"].float())))
        if merged:
            self.model_runner.model.load_weights(weights=merged)  # type: ignore[attr-defined]
        self.__dict__["_align_merged"] = set(scales)
        return len(merged)

    def _align_base_weights(self, names: list[str]) -> dict:
        """The checkpoint's float32 weights `names` (cached: LoRA always merges into the same W0)."""
        import glob

        from safetensors import safe_open

        cache = self.__dict__.setdefault("_align_w0", {})
        missing = [n for n in names if n not in cache]
        if missing:
            root = self.model_runner.model_config.model  # type: ignore[attr-defined]
            for path in sorted(glob.glob(os.path.join(root, "*.safetensors"))):
                with safe_open(path, "pt") as fh:
                    for n in set(missing) & set(fh.keys()):
                        cache[n] = fh.get_tensor(n).float()
            lost = [n for n in missing if n not in cache]
            if lost:
                raise KeyError(f"base weights {lost[:3]} not found in {root}/*.safetensors; "
                               "use rollout.lora_sync=adapter")
        return cache

    def align_num_threads(self) -> int:
        """The worker's torch thread count (for tests and logs)."""
        return torch.get_num_threads()
