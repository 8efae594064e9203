"""Placement from the resources section: plans (pure), roles landing on the GPUs a plan gives them
(Ray's logical GPUs on this CPU machine), an impossible request failing at once, and data-parallel
learners on two simulated nodes taking the step one learner takes."""
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from align.placement import PlacementError, check_fits, make_plan


def test_colocated_plan_shares_one_gpu_per_learner():
    plan = make_plan({"engine": 2, "learner": 2, "critic": 2, "reference": 0}, {"engine": 1}, use_gpus=True,
                     colocate=True)
    assert plan.bundles == [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 3.0, "GPU": 1.0}]
    for role in ("engine", "learner", "critic"):
        assert [s.bundle for s in plan.slots[role]] == [0, 1]
        assert all(s.num_gpus == 0.333 for s in plan.slots[role])  # three roles fit in one GPU
    assert "reference" not in plan.slots


def test_split_plan_gives_every_actor_its_own_gpus():
    plan = make_plan({"engine": 2, "learner": 2, "reward_model": 1}, {"engine": 2, "learner": 1, "reward_model": 0.5},
                     use_gpus=True, colocate=False)
    assert [plan.bundles[s.bundle]["GPU"] for s in plan.slots["engine"]] == [2.0, 2.0]
    assert [plan.bundles[s.bundle]["GPU"] for s in plan.slots["learner"]] == [1.0, 1.0]
    assert plan.slots["reward_model"][0].num_gpus == 0.5
    assert plan.gpus == 6.5 and len({s.bundle for slots in plan.slots.values() for s in slots}) == 5


def test_cpu_plan_asks_for_no_gpu():
    plan = make_plan({"engine": 1, "learner": 2, "critic": 2}, {"engine": 4}, use_gpus=False, colocate=True)
    assert plan.gpus == 0 and all("GPU" not in b for b in plan.bundles) and len(plan.bundles) == 5


def test_tensor_parallel_engines_cannot_be_colocated():
    with pytest.raises(PlacementError, match="engine_gpus=2"):
        make_plan({"engine": 1, "learner": 1}, {"engine": 2}, use_gpus=True, colocate=True)


def test_impossible_plan_names_the_roles_and_the_cluster():
    plan = make_plan({"engine": 2, "learner": 2}, {"engine": 4, "learner": 1}, use_gpus=True, colocate=False)
    with pytest.raises(PlacementError) as err:
        check_fits(plan, [{"CPU": 16, "GPU": 4}, {"CPU": 16, "GPU": 2}])
    msg = str(err.value)
    assert "10 GPUs asked for, the cluster has 6" in msg
    assert "rollout engines: 2 x (1 CPU, 4 GPU)" in msg and "policy learners: 2 x (1 CPU, 1 GPU)" in msg
    with pytest.raises(PlacementError, match="rollout engines need 4 GPUs on one node, the largest node has 3"):
        check_fits(plan, [{"CPU": 16, "GPU": 3}, {"CPU": 16, "GPU": 3}, {"CPU": 16, "GPU": 3}, {"CPU": 16, "GPU": 3}])


# ----------------------------------------------------------------------------- on Ray, logical GPUs
def _rl_cfg(tmp_path, model_dir, *extra):
    from align.config import load_config
    from align.rl_config import RLConfig

    return load_config(RLConfig, None, [
        f"model.name={model_dir}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "data.train_size=40",
        "data.eval_size=4", "rollout.prompts_per_step=4", "rollout.n=2", "rollout.max_new_tokens=6",
        "rollout.temperature=1.0", "log.progress=false", "rollout.num_threads=1", "train.num_threads=1",
        "train.lr=1e-2", "peft.r=8", "reward.functions=[{name: tests/rl_rewards.py:digit_share}]",
        "reward.accuracy=null", *extra])


@pytest.fixture
def logical_gpus():
    """A fresh local Ray with 4 logical GPUs (this machine has none: the ids are Ray's bookkeeping,
    and workers compute on the CPU because torch sees no CUDA)."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=8, num_gpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_roles_land_on_the_gpus_the_config_asks_for(tmp_path, logical_gpus):
    from align import actors, rl
    from align.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    # PPO, colocated: learner i, critic i and engine i share GPU i
    run = rl.RLRun(_rl_cfg(tmp_path, model_dir, "algorithm.name=ppo", "train.num_learners=2", "rollout.num_engines=2"))
    try:
        learners = actors.get(run.learner.run("where"))
        critics = actors.get(run.critic.run("where"))
        engines = actors.get(run.engines.run("where"))
        assert len({tuple(w["gpu_ids"]) for w in learners}) == 2
        for lw, cw, ew in zip(learners, critics, engines):
            assert len(lw["gpu_ids"]) == 1 and lw["gpu_ids"] == cw["gpu_ids"] == ew["gpu_ids"]
            assert lw["device"] == "cpu"  # a logical GPU: torch sees no CUDA here
    finally:
        run.close()
    # split: every role its own GPU, engines two each (tensor parallel size 2)
    run = rl.RLRun(_rl_cfg(tmp_path, model_dir, "resources.colocate=false", "resources.engine_gpus=2",
                           "train.num_learners=2"))
    try:
        learners = actors.get(run.learner.run("where"))
        (engine,) = actors.get(run.engines.run("where"))
        ids = [g for w in learners for g in w["gpu_ids"]] + engine["gpu_ids"]
        assert len(engine["gpu_ids"]) == 2 and sorted(ids) == ["0", "1", "2", "3"]
    finally:
        run.close()


def test_an_impossible_request_fails_at_once_naming_the_role(tmp_path, logical_gpus):
    from align import rl
    from align.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    t0 = time.perf_counter()
    with pytest.raises(PlacementError, match="rollout engines: 2 x \\(1 CPU, 2 GPU\\)"):
        rl.RLRun(_rl_cfg(tmp_path, model_dir, "resources.colocate=false", "resources.engine_gpus=2",
                         "rollout.num_engines=2", "train.num_learners=2"))
    assert time.perf_counter() - t0 < 60  # no waiting in Ray's queue


# ----------------------------------------------------------------------------- two nodes
_TWO_NODES = textwrap.dedent("""
    import json, sys
    import ray, torch
    from ray.cluster_utils import Cluster
    sys.path.insert(0, "tests")
    from test_placement import _rl_cfg
    from align import actors, rl

    tmp, model_dir = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 1})
    cluster.add_node(num_cpus=3, num_gpus=1)
    ray.init(address=cluster.address)
    out = {}
    for n in (2, 1):
        cfg = _rl_cfg(__import__("pathlib").Path(tmp) / f"n{n}", model_dir, f"train.num_learners={n}",
                      "train.eval_before=false", "train.save_final=false")
        run = rl.RLRun(cfg)
        try:
            out[f"nodes{n}"] = [w["node_id"] for w in actors.get(run.learner.run("where"))]
            out[f"rewards{n}"] = [run.step()["reward"] for _ in range(2)]
            w = actors.get(run.learner.call(0, "trainable_weights"))
            torch.save(w, f"{tmp}/w{n}.pt")
        finally:
            run.close()
    print("RESULT" + json.dumps(out))
    ray.shutdown()
    cluster.shutdown()
""")


def test_two_learners_on_two_nodes_equal_one_learner(tmp_path):
    """A Ray cluster of two nodes (one logical GPU each): the two colocated learner bundles land on
    different nodes, meet at rank 0's address, and take the same two steps one learner takes."""
    import ray
    import torch

    from align.tiny import save_tiny_model

    ray.shutdown()  # this test starts its own cluster in a subprocess
    model_dir = save_tiny_model(tmp_path / "tiny")
    proc = subprocess.run([sys.executable, "-c", _TWO_NODES, str(tmp_path), str(model_dir)], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    assert len(set(out["nodes2"])) == 2  # one learner per node
    assert out["rewards2"] == out["rewards1"]  # the same samples: engines saw the same weights
    w1, w2 = torch.load(tmp_path / "w1.pt", weights_only=True), torch.load(tmp_path / "w2.pt", weights_only=True)
    assert any(v.abs().max() > 1e-3 for k, v in w1.items() if "lora_B" in k)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4), (k, (w1[k] - w2[k]).abs().max())
