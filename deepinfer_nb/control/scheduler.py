"""Placement: a pure function from a request and a snapshot of the nodes to where engines go.

`place(request, nodes, strategy=...)` returns a `Placement` (one `Assignment` per replica) or a
`NoFit` whose reason tells the user what to change. It does no I/O: `snapshot()` builds the
`NodeSnapshot`s from the stored records (nodes, live GPU samples, active engines) and
`apply()` books an assignment into them, so a caller placing many engines in one round sees its
own earlier choices.

A GPU fits an engine when the fraction it asks for (`gpu_memory_utilization`, as vLLM reads it:
a share of the device's total memory) fits both in what is not yet promised to other engines and
in the memory NVML last reported free (engines still loading have not allocated yet, foreign
processes are not promised anything: either check alone would over-commit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from ..hub import fit
from ..models import DeploymentSpec, Engine, GpuInfo, GpuSamples, Node

Strategy = Literal["spread", "binpack", "idle_first"]
STRATEGIES: tuple[Strategy, ...] = ("spread", "binpack", "idle_first")
GIB = 1024**3
EPS = 1e-9
MAX_DETAILS = 3
CPU_LABEL = "deepinfer.cpu"
"""Node label: "true" lets a GPU node also run CPU engines, "false" stops a CPU node doing so."""


@dataclasses.dataclass(frozen=True)
class GpuSlot:
    """One GPU as the scheduler sees it."""

    index: int
    memory_total: int = 0
    memory_free: int | None = None
    """Bytes free at the last sample (None: unknown, only promises are checked)."""
    promised: float = 0.0
    """Sum of the memory fractions promised to active engines on this GPU."""
    engines: int = 0
    deployments: tuple[str, ...] = ()
    """Deployment of each active engine on this GPU (repeats count)."""
    utilization: float | None = None
    uuid: str = ""


@dataclasses.dataclass(frozen=True)
class NodeSnapshot:
    id: str
    gpus: tuple[GpuSlot, ...] = ()
    cpu_capable: bool = True
    memory_total: int = 0
    """The node's RAM in bytes (0: unknown, not checked)."""
    cpu_engines: int = 0
    deployments: tuple[str, ...] = ()
    """Deployment of each active engine on this node, GPU or CPU."""

    def gpu(self, index: int) -> GpuSlot | None:
        return next((g for g in self.gpus if g.index == index), None)


@dataclasses.dataclass(frozen=True)
class PlacementRequest:
    deployment: str
    replicas: int = 1
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (auto: GPU when a candidate node has one, else CPU)."""
    gpus_per_replica: int = 1
    gpu_memory_utilization: float = 0.9
    nodes: tuple[str, ...] = ()
    gpu_indices: tuple[int, ...] = ()
    gpu_bytes: int = 0
    """Memory one engine needs on each of its GPUs (0: unknown, only fractions are checked)."""
    cpu_bytes: int = 0
    """Host RAM one CPU engine needs (0: unknown, not checked)."""

    @classmethod
    def for_spec(
        cls, spec: DeploymentSpec, *, replicas: int = 1, memory_bytes: int = 0
    ) -> PlacementRequest:
        """`memory_bytes`: what the engine's own file says it needs (llama.cpp's GGUF header);
        else the estimate from the model's facts (hub/fit.py), when known."""
        device = spec.device
        if device == "auto" and spec.backend == "llama.cpp":
            # The controller cannot see whether a worker's llama-cpp-python was built with CUDA;
            # ask for cuda explicitly to place a llama.cpp engine on a GPU.
            device = "cpu"
        gpu_bytes, cpu_bytes = 0, memory_bytes
        if spec.facts is not None:
            gpu_bytes = fit.estimate(spec.facts, spec, device="cuda").per_device
            cpu_bytes = cpu_bytes or fit.estimate(spec.facts, spec, device="cpu").total
        return cls(
            gpu_bytes=gpu_bytes,
            cpu_bytes=cpu_bytes,
            deployment=spec.name,
            replicas=replicas,
            device=device,
            gpus_per_replica=spec.tensor_parallel_size,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            nodes=tuple(spec.placement.nodes),
            gpu_indices=tuple(spec.placement.gpus),
        )


@dataclasses.dataclass(frozen=True)
class Assignment:
    node: str
    device: Literal["cpu", "cuda"]
    gpus: tuple[int, ...] = ()
    gpu_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class Placement:
    assignments: tuple[Assignment, ...]


@dataclasses.dataclass(frozen=True)
class NoFit:
    reason: str


# ---- snapshots ---------------------------------------------------------------------------------


def snapshot(
    nodes: Iterable[Node],
    engines: Iterable[Engine],
    samples: Mapping[str, GpuSamples] | None = None,
) -> list[NodeSnapshot]:
    """Node snapshots from records: live samples win over the registration's GPU list."""
    samples = samples or {}
    snaps: dict[str, NodeSnapshot] = {}
    for node in sorted(nodes, key=lambda n: n.id):
        sample = samples.get(node.id)
        gpus: list[GpuInfo] = sample.gpus if sample is not None and sample.gpus else node.gpus
        label = node.labels.get(CPU_LABEL, "").lower()
        cpu_capable = label in ("1", "true", "yes") if label else not gpus
        snaps[node.id] = NodeSnapshot(
            id=node.id,
            gpus=tuple(
                GpuSlot(
                    index=g.index,
                    uuid=g.uuid,
                    memory_total=g.memory_total,
                    memory_free=g.memory_free,
                    utilization=g.utilization,
                )
                for g in sorted(gpus, key=lambda g: g.index)
            ),
            cpu_capable=cpu_capable,
            memory_total=node.memory_total,
        )
    for engine in engines:
        snap = snaps.get(engine.node)
        if snap is None or not engine.state.active:
            continue
        snaps[engine.node] = apply(snap, _assignment_of(engine), deployment=engine.deployment)
    return list(snaps.values())


def _assignment_of(engine: Engine) -> Assignment:
    device: Literal["cpu", "cuda"] = "cuda" if engine.device == "cuda" else "cpu"
    return Assignment(
        node=engine.node, device=device, gpus=tuple(engine.gpus), gpu_fraction=engine.gpu_fraction
    )


def apply(node: NodeSnapshot, assignment: Assignment, *, deployment: str) -> NodeSnapshot:
    """`node` with `assignment` booked on it."""
    deployments = (*node.deployments, deployment)
    if assignment.device == "cpu":
        return dataclasses.replace(node, cpu_engines=node.cpu_engines + 1, deployments=deployments)
    gpus = tuple(
        dataclasses.replace(
            g,
            promised=g.promised + assignment.gpu_fraction,
            engines=g.engines + 1,
            deployments=(*g.deployments, deployment),
        )
        if g.index in assignment.gpus
        else g
        for g in node.gpus
    )
    return dataclasses.replace(node, gpus=gpus, deployments=deployments)


# ---- placement ---------------------------------------------------------------------------------


class Memo:
    """Per-node scores for one request shape, reused while a node's snapshot is the same object.

    A caller placing many engines in a row (a reconcile round) changes one node per placement;
    the memo spares re-scoring all the others. Entries keep the node object alive, so its id()
    cannot be reused by another snapshot while the entry exists. Results are identical with or
    without a memo.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, tuple[object, ...]], tuple[NodeSnapshot, _NodeBest]] = {}

    def lookup(
        self,
        node: NodeSnapshot,
        shape: tuple[object, ...],
        compute: Callable[[NodeSnapshot], _NodeBest],
    ) -> _NodeBest:
        entry = self._entries.get((id(node), shape))
        if entry is not None and entry[0] is node:
            return entry[1]
        best = compute(node)
        self._entries[(id(node), shape)] = (node, best)
        return best


_NodeBest = tuple[tuple[float, ...], list[GpuSlot]] | None


def place(
    request: PlacementRequest,
    nodes: Sequence[NodeSnapshot],
    *,
    strategy: Strategy = "spread",
    memo: Memo | None = None,
) -> Placement | NoFit:
    """Place `request.replicas` engines, all or none (each sees the ones placed before it)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    memo = memo if memo is not None else Memo()
    current = list(nodes)
    placed: list[Assignment] = []
    for replica in range(request.replicas):
        result = _place_one(request, current, strategy, memo)
        if isinstance(result, NoFit):
            if replica:
                return NoFit(f"only {replica} of {request.replicas} replicas fit: {result.reason}")
            return result
        placed.append(result)
        current = [
            apply(n, result, deployment=request.deployment) if n.id == result.node else n
            for n in current
        ]
    return Placement(tuple(placed))


def _place_one(
    request: PlacementRequest, nodes: Sequence[NodeSnapshot], strategy: Strategy, memo: Memo
) -> Assignment | NoFit:
    if not nodes:
        return NoFit(
            "no worker node is registered; start one with `deepinfer-nb worker "
            "--store URL` (or `%deepinfer up`)"
        )
    candidates = list(nodes)
    if request.nodes:
        candidates = [n for n in nodes if n.id in request.nodes]
        if not candidates:
            return NoFit(
                f"pinned to node(s) {', '.join(request.nodes)}, none of which is "
                f"registered (registered: {_names(nodes)})"
            )
    device = request.device
    if device == "auto":
        device = "cuda" if any(n.gpus for n in candidates) else "cpu"
    if device == "cpu":
        return _place_cpu(request, candidates, strategy)
    pins = request.gpu_indices
    if device.startswith("cuda:"):
        index = int(device[5:])
        if pins and index not in pins:
            return NoFit(
                f"device {device} is not among the pinned GPUs {', '.join(map(str, pins))}"
            )
        if request.gpus_per_replica != 1:
            return NoFit(
                f"device {device} names one GPU but tensor_parallel_size is "
                f"{request.gpus_per_replica}; use --device cuda with GPU pins instead"
            )
        pins = (index,)
    return _place_gpu(request, candidates, strategy, pins, memo)


def _place_cpu(
    request: PlacementRequest, nodes: Sequence[NodeSnapshot], strategy: Strategy
) -> Assignment | NoFit:
    capable = [n for n in nodes if n.cpu_capable]
    if not capable:
        return NoFit(
            f"device cpu: no CPU-capable node among {_names(nodes)} (GPU nodes run "
            f"CPU engines only with the label {CPU_LABEL}=true); use --device cuda"
        )

    def key(n: NodeSnapshot) -> tuple[int, int, str]:
        mine = n.deployments.count(request.deployment)
        if strategy == "binpack":
            return (-n.cpu_engines, 0, n.id)
        if strategy == "spread":
            return (mine, n.cpu_engines, n.id)
        return (n.cpu_engines, mine, n.id)

    # The node's total RAM, not what is free: other processes and engines come and go.
    roomy = [n for n in capable if not n.memory_total or n.memory_total >= request.cpu_bytes]
    if not roomy:
        largest = max(capable, key=lambda n: n.memory_total)
        return NoFit(
            f"a CPU engine needs ~{_gib(request.cpu_bytes)} GiB (weights + KV cache); the largest "
            f"node has {_gib(largest.memory_total)} GiB RAM (node {largest.id}); use a GPU, a "
            "lower max_model_len or a smaller model"
        )
    best = min(roomy, key=key)
    return Assignment(node=best.id, device="cpu")


def _place_gpu(
    request: PlacementRequest,
    nodes: Sequence[NodeSnapshot],
    strategy: Strategy,
    pins: tuple[int, ...],
    memo: Memo,
) -> Assignment | NoFit:
    need = request.gpus_per_replica
    with_gpus = [n for n in nodes if n.gpus]
    if not with_gpus:
        return NoFit(f"no GPU on node(s) {_names(nodes)}; use --device cpu")
    if pins:
        with_gpus = [n for n in with_gpus if any(g.index in pins for g in n.gpus)]
        if not with_gpus:
            return NoFit(
                f"pinned GPU(s) {', '.join(map(str, pins))} exist on no node "
                f"({_gpu_inventory(nodes)})"
            )
    if need > 1:
        largest = max(with_gpus, key=lambda n: len(_eligible(n, pins)))
        offered = len(_eligible(largest, pins))
        if offered < need:
            return NoFit(
                f"tensor_parallel_size {need} needs {need} GPUs on one node; the most any node "
                f"offers is {offered} (node {largest.id}); lower tensor_parallel_size or add GPUs"
            )
    fraction = request.gpu_memory_utilization

    shape = (request.deployment, fraction, need, pins, strategy, request.gpu_bytes)

    def gpu_key(g: GpuSlot) -> tuple[float, ...]:
        return _gpu_key(g, request.deployment, strategy)

    def best_on(node: NodeSnapshot) -> _NodeBest:
        # The hot path: only a cheap fit test per GPU; refusal texts only when nothing fits.
        fitting = [
            g
            for g in node.gpus
            if (not pins or g.index in pins) and _fits(g, fraction, request.gpu_bytes)
        ]
        if len(fitting) < need:
            return None
        chosen = [min(fitting, key=gpu_key)] if need == 1 else sorted(fitting, key=gpu_key)[:need]
        return _node_key(node, chosen, request.deployment, strategy), chosen

    best: tuple[tuple[float, ...], NodeSnapshot, list[GpuSlot]] | None = None
    for node in with_gpus:
        found = memo.lookup(node, shape, best_on)
        if found is not None and (best is None or found[0] < best[0]):
            best = (found[0], node, found[1])
    if best is not None:
        _, node, chosen = best
        gpus = tuple(sorted(g.index for g in chosen))
        return Assignment(node=node.id, device="cuda", gpus=gpus, gpu_fraction=fraction)
    return NoFit(
        _explain(with_gpus, pins=pins, need=need, fraction=fraction, gpu_bytes=request.gpu_bytes)
    )


def _explain(
    nodes: Sequence[NodeSnapshot],
    *,
    pins: tuple[int, ...],
    need: int,
    fraction: float,
    gpu_bytes: int = 0,
) -> str:
    refusals: list[str] = []
    for node in nodes:
        eligible = _eligible(node, pins)
        if len(eligible) < need:
            continue
        fitting = 0
        for slot in eligible:
            why = _refusal(slot, fraction, gpu_bytes)
            if why:
                refusals.append(f"node {node.id} GPU {slot.index}: {why}")
            else:
                fitting += 1
        if need > 1:
            refusals.append(f"node {node.id}: {fitting} of the {need} GPUs needed fit")
    shown = "; ".join(refusals[:MAX_DETAILS])
    more = f" (and {len(refusals) - MAX_DETAILS} more)" if len(refusals) > MAX_DETAILS else ""
    return f"{shown}{more}; try a lower gpu_memory_utilization or --device cpu"


def _eligible(node: NodeSnapshot, pins: tuple[int, ...]) -> list[GpuSlot]:
    return [g for g in node.gpus if not pins or g.index in pins]


def _fits(slot: GpuSlot, fraction: float, gpu_bytes: int = 0) -> bool:
    if slot.promised + fraction > 1.0 + EPS:
        return False
    if gpu_bytes and slot.memory_total > 0 and slot.memory_total * fraction < gpu_bytes:
        return False
    free, total = slot.memory_free, slot.memory_total
    return free is None or total <= 0 or free >= fraction * total - EPS


def _refusal(slot: GpuSlot, fraction: float, gpu_bytes: int = 0) -> str:
    """Why `slot` cannot take an engine asking for `fraction` of its memory ("" if it can)."""
    total = slot.memory_total
    if gpu_bytes and total > 0 and total * fraction < gpu_bytes:
        return (
            f"the model needs ~{_gib(gpu_bytes)} GiB per GPU, {fraction:.2f} x {_gib(total)} "
            f"GiB offers {_gib(int(total * fraction))}; try more GPUs (--gpus) or a shorter "
            "--max-model-len"
        )
    if slot.promised + fraction > 1.0 + EPS:
        return (
            f"{slot.promised:.2f} of its memory is already promised to {slot.engines} "
            f"engine(s), engine needs {fraction:.2f} more"
        )
    if slot.memory_free is not None and total > 0 and slot.memory_free < fraction * total - EPS:
        return (
            f"{_gib(slot.memory_free)} GiB free of {_gib(total)} GiB, engine needs "
            f"{fraction:.2f} x {_gib(total)} GiB"
        )
    return ""


def _gpu_key(g: GpuSlot, deployment: str, strategy: Strategy) -> tuple[float, ...]:
    if strategy == "binpack":
        return (-g.promised, g.index)
    if strategy == "idle_first":
        return (g.engines, g.utilization or 0.0, g.promised, g.index)
    return (g.deployments.count(deployment), g.engines, g.promised, g.index)


def _node_key(
    node: NodeSnapshot, chosen: Sequence[GpuSlot], deployment: str, strategy: Strategy
) -> tuple[float, ...]:
    # Ties keep the earlier node (snapshot() sorts nodes by id): placement is deterministic.
    promised = sum(g.promised for g in chosen)
    if strategy == "binpack":
        return (-promised, -len(node.deployments))
    if strategy == "idle_first":
        return (sum(g.engines for g in chosen), sum(g.utilization or 0.0 for g in chosen), promised)
    return (
        node.deployments.count(deployment),
        sum(g.deployments.count(deployment) for g in chosen),
        len(node.deployments),
        promised,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _names(nodes: Iterable[NodeSnapshot]) -> str:
    return ", ".join(n.id for n in nodes) or "none"


def _gpu_inventory(nodes: Iterable[NodeSnapshot]) -> str:
    parts = [f"{n.id} has GPUs {', '.join(str(g.index) for g in n.gpus) or 'none'}" for n in nodes]
    return "; ".join(parts)
