"""Shared test set-up: no hub access, one torch thread per process, tiny models."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _ray_shutdown_at_end():
    """Ray tests share one local cluster (align.actors.init_ray is idempotent); stop it at the end."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def tiny():
    """A fresh tiny random causal LM and its local tokenizer."""
    from align.tiny import tiny_model

    return tiny_model(seed=0)


def write_jsonl(path, rows):
    """Write rows as JSONL and return the path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def sft_rows():
    """A learnable SFT set: addition facts as prompt / completion."""
    return [{"prompt": f"What is {a} + {b}?", "completion": f"The answer is {a + b}."}
            for a in range(8) for b in range(6)]


def rollout_batch(model_dir):
    """An Experience of 4 prompt groups x 3 samples from the tiny model at `model_dir`, with fixed
    rewards 0/1/2 spread over the groups (the batch the data-parallel tests split between learners)."""
    from align.experience import build_experience
    from align.workers import RolloutWorker
    from rollout import SamplingParams

    engine = RolloutWorker("hf", str(model_dir), num_threads=1)
    samples, _, _ = engine.generate(["What is 2 + 3?", "Tom has 5 apples", "yes or no", "red blue"],
                                    SamplingParams(n=3, max_new_tokens=7, seed=5))
    for i, s in enumerate(samples):
        s.reward = float((i * 5) % 3)
    return build_experience(samples, 0)
