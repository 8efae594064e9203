"""Which Ray resources each role of an RL run gets: the `resources` config section made into
placement-group bundles, checked against the cluster before anything starts.

Roles: rollout engines (GPUs per engine = vLLM tensor parallel size), policy learners (one GPU
each, data-parallel), PPO critics (one per learner), a reference worker (full / freeze tuning
only) and reward-model scorers. Two layouts, as the peers have them:

- colocate (TRL's colocate, verl's hybrid engine; the one-GPU user): one bundle of one GPU per
  policy learner; engine i, critic i and the reference share bundle i with the learner, each
  taking an equal fraction of its GPU (Ray needs fractions that sum to at most 1).
- split (OpenRLHF, verl's split placement): every actor its own bundle and its own GPUs.

Without GPUs (`resources.device=cpu`, or a cluster with none) every actor gets one bundle of
`cpus_per_actor` logical CPUs: the CPU layout align always had. A plan that cannot fit fails at
once, naming each role, what it asked for and what the cluster has, instead of waiting forever
in Ray's queue.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLE_NAMES = {"engine": "rollout engines", "learner": "policy learners", "critic": "critics",
              "reference": "reference", "reward_model": "reward-model scorers"}


class PlacementError(RuntimeError):
    """The resources asked for cannot be had from this cluster; the message says what and why."""


@dataclass
class Slot:
    """Where one actor goes: a bundle of the run's placement group and its share of it."""

    bundle: int  # index of the placement-group bundle
    num_cpus: float  # logical CPUs the actor asks for
    num_gpus: float  # GPUs (or a fraction of one, colocated) the actor asks for


@dataclass
class Plan:
    """Bundles for one placement group and each role's slots in it."""

    bundles: list[dict[str, float]]  # Ray bundles: {"CPU": c, "GPU": g}
    slots: dict[str, list[Slot]] = field(default_factory=dict)  # role -> one slot per actor
    asks: dict[str, str] = field(default_factory=dict)  # role -> what it asked for, in words

    @property
    def gpus(self) -> float:
        """GPUs the whole plan needs."""
        return sum(b.get("GPU", 0.0) for b in self.bundles)

    @property
    def cpus(self) -> float:
        """Logical CPUs the whole plan needs."""
        return sum(b.get("CPU", 0.0) for b in self.bundles)


def make_plan(counts: dict[str, int], gpus: dict[str, float], use_gpus: bool, colocate: bool,
              cpus_per_actor: float = 1.0) -> Plan:
    """The bundles for `counts` actors per role, each wanting `gpus[role]` GPUs (ignored when
    `use_gpus` is False). Roles with a count of 0 get no slots."""
    counts = {r: n for r, n in counts.items() if n > 0}
    if not use_gpus:
        return _own_bundles(counts, {r: 0.0 for r in counts}, cpus_per_actor)
    if not colocate:
        return _own_bundles(counts, {r: float(gpus.get(r, 1.0)) for r in counts}, cpus_per_actor)
    shared = [r for r in counts if r != "reward_model" and gpus.get(r, 1.0) > 0]
    if gpus.get("engine", 1) > 1 and "engine" in shared:
        raise PlacementError(f"colocated rollout engines take one GPU each (resources.engine_gpus="
                             f"{gpus['engine']:g}): use resources.colocate=false for tensor-parallel engines")
    n = max(counts.get("learner", 1), 1)
    members: list[list[str]] = [[] for _ in range(n)]  # roles on each shared bundle
    for role in shared:
        for i in range(counts[role]):
            members[i % n].append(role)
    plan = Plan(bundles=[{"CPU": cpus_per_actor * len(m), "GPU": 1.0} for m in members])
    for b, roles in enumerate(members):
        for role in roles:  # equal shares, each a little under 1/k so that k of them always fit
            share = int(1000 / len(roles)) / 1000
            plan.slots.setdefault(role, []).append(Slot(b, cpus_per_actor, share))
    for role in shared:
        plan.asks[role] = f"{counts[role]} x a share of one GPU (colocated)"
    rest = {r: counts[r] for r in counts if r not in shared}
    if rest:  # CPU-only roles and reward-model scorers: bundles of their own
        extra = _own_bundles(rest, {r: float(gpus.get(r, 0.0)) for r in rest}, cpus_per_actor)
        offset = len(plan.bundles)
        plan.bundles += extra.bundles
        for role, slots in extra.slots.items():
            plan.slots[role] = [Slot(s.bundle + offset, s.num_cpus, s.num_gpus) for s in slots]
        plan.asks.update(extra.asks)
    return plan


def _own_bundles(counts: dict[str, int], gpus: dict[str, float], cpus: float) -> Plan:
    """One bundle per actor."""
    plan = Plan(bundles=[])
    for role, n in counts.items():
        g = gpus[role]
        for _ in range(n):
            bundle = {"CPU": cpus, **({"GPU": g} if g else {})}
            plan.slots.setdefault(role, []).append(Slot(len(plan.bundles), cpus, g))
            plan.bundles.append(bundle)
        plan.asks[role] = f"{n} x ({cpus:g} CPU" + (f", {g:g} GPU" if g else "") + ")"
    return plan


def check_fits(plan: Plan, nodes: list[dict[str, float]]) -> None:
    """Raise `PlacementError` when `plan` cannot be placed on `nodes` (each a node's total
    resources): too few GPUs or CPUs in all, or a bundle larger than any one node."""
    have_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    have_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    problems = []
    if plan.gpus > have_gpu + 1e-9:
        problems.append(f"{plan.gpus:g} GPUs asked for, the cluster has {have_gpu:g}")
    if plan.cpus > have_cpu + 1e-9:
        problems.append(f"{plan.cpus:g} logical CPUs asked for, the cluster has {have_cpu:g}")
    biggest = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    for role, slots in plan.slots.items():
        need = max(plan.bundles[s.bundle].get("GPU", 0.0) for s in slots)
        if need > biggest + 1e-9:
            problems.append(f"{ROLE_NAMES.get(role, role)} need {need:g} GPUs on one node, the largest "
                            f"node has {biggest:g}")
    if problems:
        asks = "; ".join(f"{ROLE_NAMES.get(r, r)}: {a}" for r, a in plan.asks.items())
        sizes = ", ".join(f"{n.get('GPU', 0):g} GPU / {n.get('CPU', 0):g} CPU" for n in nodes)
        raise PlacementError(f"the resources asked for do not fit this Ray cluster: {'; '.join(problems)}. "
                             f"Asked: {asks}. Nodes: {sizes or 'none'}. Change the resources section "
                             "(engine_gpus, colocate, device) or train.num_learners / rollout.num_engines")


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def reserve(plan: Plan, timeout_s: float = 60.0) -> Any:
    """A ready placement group for `plan` (PACK: fewest nodes), or `PlacementError` when the
    cluster cannot hold it: at once when the totals do not fit, after `timeout_s` otherwise."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_fits(plan, cluster_nodes())
    pg = placement_group(plan.bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        asks = "; ".join(f"{ROLE_NAMES.get(r, r)}: {a}" for r, a in plan.asks.items())
        raise PlacementError(f"Ray could not place the run's actors within {timeout_s:g} s (resources."
                             f"timeout_s): {asks}; free resources now: {ray.available_resources()}") from None
    return pg


def scheduling(pg: Any, slot: Slot) -> dict[str, Any]:
    """Ray actor options that put an actor on `slot` of placement group `pg`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return dict(num_cpus=slot.num_cpus, num_gpus=slot.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=slot.bundle))


class Placed:
    """Mixed into workers: `where()` reports where Ray put the actor (tests and logs)."""

    device: Any = None

    def where(self) -> dict[str, Any]:
        """Node, GPU ids Ray assigned, and the device the worker computes on."""
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        return {"node_id": ctx.get_node_id() if ctx else None,
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ctx else [],
                "device": str(self.device)}
