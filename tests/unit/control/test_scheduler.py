"""The pure scheduler: table-driven cases for devices, tensor parallel, fractions, pins, strategies
and every NoFit reason; plus snapshots built from stored records."""

from __future__ import annotations

import dataclasses

import pytest

from deepinfer_nb.control.scheduler import (
    Assignment,
    GpuSlot,
    Memo,
    NodeSnapshot,
    NoFit,
    Placement,
    PlacementRequest,
    Strategy,
    apply,
    place,
    snapshot,
)
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, GpuInfo, GpuSamples, Node

GIB = 1024**3


def gpu(
    index: int,
    *,
    total: float = 80,
    free: float | None = None,
    promised: float = 0.0,
    engines: int = 0,
    deployments: tuple[str, ...] = (),
    util: float | None = None,
) -> GpuSlot:
    return GpuSlot(
        index=index,
        memory_total=int(total * GIB),
        memory_free=None if free is None else int(free * GIB),
        promised=promised,
        engines=engines,
        deployments=deployments,
        utilization=util,
    )


def node(
    name: str,
    *gpus: GpuSlot,
    cpu: bool | None = None,
    cpu_engines: int = 0,
    deployments: tuple[str, ...] = (),
) -> NodeSnapshot:
    return NodeSnapshot(
        id=name,
        gpus=gpus,
        cpu_capable=(not gpus) if cpu is None else cpu,
        cpu_engines=cpu_engines,
        deployments=deployments,
    )


def req(**kw: object) -> PlacementRequest:
    kw.setdefault("deployment", "d")
    return PlacementRequest(**kw)  # type: ignore[arg-type]


def cuda(node_id: str, *gpus: int, fraction: float = 0.9) -> Assignment:
    return Assignment(node=node_id, device="cuda", gpus=gpus, gpu_fraction=fraction)


def cpu(node_id: str) -> Assignment:
    return Assignment(node=node_id, device="cpu")


TWO_GPU_NODES = [node("a", gpu(0), gpu(1)), node("b", gpu(0), gpu(1))]

PLACED = [
    # (id, request, nodes, strategy, expected assignments)
    (
        "auto picks GPU when a node has one",
        req(),
        [node("c"), node("g", gpu(0))],
        "spread",
        [cuda("g", 0)],
    ),
    ("auto falls back to CPU", req(), [node("c1"), node("c2")], "spread", [cpu("c1")]),
    (
        "cpu on a CPU node even beside GPU nodes",
        req(device="cpu"),
        [node("g", gpu(0)), node("c")],
        "spread",
        [cpu("c")],
    ),
    (
        "cpu allowed on GPU node with the label",
        req(device="cpu"),
        [node("g", gpu(0), cpu=True)],
        "spread",
        [cpu("g")],
    ),
    (
        "cpu spreads by fewest engines",
        req(device="cpu", replicas=3),
        [node("c1", cpu_engines=1), node("c2"), node("c3")],
        "spread",
        [cpu("c2"), cpu("c3"), cpu("c1")],
    ),
    (
        "cpu binpack stacks on the busiest",
        req(device="cpu", replicas=2),
        [node("c1"), node("c2", cpu_engines=1)],
        "binpack",
        [cpu("c2"), cpu("c2")],
    ),
    (
        "tensor parallel takes two GPUs of one node",
        req(gpus_per_replica=2),
        [node("a", gpu(0)), node("b", gpu(0), gpu(1))],
        "spread",
        [cuda("b", 0, 1)],
    ),
    (
        "tensor parallel 4 over two 4-GPU nodes, spread",
        req(gpus_per_replica=4, replicas=2),
        [node("a", *(gpu(i) for i in range(4))), node("b", *(gpu(i) for i in range(4)))],
        "spread",
        [cuda("a", 0, 1, 2, 3), cuda("b", 0, 1, 2, 3)],
    ),
    (
        "fractions share a GPU",
        req(gpu_memory_utilization=0.4, replicas=2),
        [node("a", gpu(0))],
        "spread",
        [cuda("a", 0, fraction=0.4), cuda("a", 0, fraction=0.4)],
    ),
    (
        "a promised GPU is skipped",
        req(gpu_memory_utilization=0.5),
        [node("a", gpu(0, promised=0.6), gpu(1))],
        "spread",
        [cuda("a", 1, fraction=0.5)],
    ),
    (
        "free memory from samples is respected",
        req(gpu_memory_utilization=0.5),
        [node("a", gpu(0, free=10), gpu(1, free=60))],
        "binpack",
        [cuda("a", 1, fraction=0.5)],
    ),
    ("node pin", req(nodes=("b",)), TWO_GPU_NODES, "spread", [cuda("b", 0)]),
    ("gpu pin", req(gpu_indices=(1,)), TWO_GPU_NODES, "spread", [cuda("a", 1)]),
    ("cuda:N pins the index", req(device="cuda:1"), TWO_GPU_NODES, "spread", [cuda("a", 1)]),
    (
        "spread puts replicas on distinct nodes",
        req(replicas=2),
        TWO_GPU_NODES,
        "spread",
        [cuda("a", 0), cuda("b", 0)],
    ),
    (
        "spread avoids nodes holding this deployment",
        req(gpu_memory_utilization=0.3),
        [
            node("a", gpu(0, promised=0.3, engines=1, deployments=("d",)), deployments=("d",)),
            node(
                "b", gpu(0, promised=0.6, engines=2, deployments=("x", "x")), deployments=("x", "x")
            ),
        ],
        "spread",
        [cuda("b", 0, fraction=0.3)],
    ),
    (
        "spread prefers distinct GPUs on one node",
        req(replicas=2, gpu_memory_utilization=0.4),
        [node("a", gpu(0), gpu(1))],
        "spread",
        [cuda("a", 0, fraction=0.4), cuda("a", 1, fraction=0.4)],
    ),
    (
        "binpack fills one GPU first",
        req(replicas=2, gpu_memory_utilization=0.4),
        [node("a", gpu(0), gpu(1))],
        "binpack",
        [cuda("a", 0, fraction=0.4), cuda("a", 0, fraction=0.4)],
    ),
    (
        "binpack prefers the fuller node",
        req(gpu_memory_utilization=0.4),
        [node("a", gpu(0)), node("b", gpu(0, promised=0.5, engines=1), deployments=("x",))],
        "binpack",
        [cuda("b", 0, fraction=0.4)],
    ),
    (
        "idle_first prefers GPUs without engines, then low utilisation",
        req(gpu_memory_utilization=0.3),
        [node("a", gpu(0, promised=0.3, engines=1), gpu(1, util=50)), node("b", gpu(0, util=5))],
        "idle_first",
        [cuda("b", 0, fraction=0.3)],
    ),
]


@pytest.mark.parametrize(
    ("request_", "nodes", "strategy", "expected"),
    [c[1:] for c in PLACED],
    ids=[c[0] for c in PLACED],
)
def test_place(
    request_: PlacementRequest,
    nodes: list[NodeSnapshot],
    strategy: Strategy,
    expected: list[Assignment],
) -> None:
    assert place(request_, nodes, strategy=strategy) == Placement(tuple(expected))


NO_FIT = [
    # (id, request, nodes, words the reason must contain)
    ("no nodes", req(), [], ["no worker node is registered", "deepinfer-nb worker"]),
    (
        "unknown pinned node",
        req(nodes=("z",)),
        TWO_GPU_NODES,
        ["pinned to node(s) z", "registered: a, b"],
    ),
    (
        "cpu wanted, only GPU nodes",
        req(device="cpu"),
        TWO_GPU_NODES,
        ["no CPU-capable node among a, b", "deepinfer.cpu=true"],
    ),
    (
        "cuda wanted, only CPU nodes",
        req(device="cuda"),
        [node("c")],
        ["no GPU on node(s) c", "--device cpu"],
    ),
    (
        "pinned GPU absent",
        req(gpu_indices=(5,)),
        TWO_GPU_NODES,
        ["pinned GPU(s) 5 exist on no node", "a has GPUs 0, 1"],
    ),
    (
        "cuda:N outside the pins",
        req(device="cuda:0", gpu_indices=(1,)),
        TWO_GPU_NODES,
        ["device cuda:0 is not among the pinned GPUs 1"],
    ),
    (
        "cuda:N with tensor parallel",
        req(device="cuda:0", gpus_per_replica=2),
        TWO_GPU_NODES,
        ["names one GPU but tensor_parallel_size is 2"],
    ),
    (
        "tensor parallel larger than any node",
        req(gpus_per_replica=4),
        TWO_GPU_NODES,
        ["tensor_parallel_size 4 needs 4 GPUs on one node", "most any node offers is 2"],
    ),
    (
        "not enough free memory",
        req(gpu_memory_utilization=0.9),
        [node("a", gpu(0, free=70), gpu(1, free=3.1))],
        [
            "node a GPU 1: 3.1 GiB free of 80.0 GiB, engine needs 0.90 x 80.0 GiB",
            "try a lower gpu_memory_utilization or --device cpu",
        ],
    ),
    (
        "fraction already promised",
        req(gpu_memory_utilization=0.6),
        [node("a", gpu(0, promised=0.5, engines=1))],
        ["node a GPU 0: 0.50 of its memory is already promised to 1 engine(s), engine needs 0.60"],
    ),
    (
        "tensor parallel with one full GPU",
        req(gpus_per_replica=2),
        [node("a", gpu(0), gpu(1, promised=0.5, engines=1))],
        ["node a GPU 1: 0.50", "node a: 1 of the 2 GPUs needed fit"],
    ),
    (
        "partial replicas",
        req(replicas=3, gpu_memory_utilization=0.5),
        [node("a", gpu(0))],
        ["only 2 of 3 replicas fit", "already promised to 2 engine(s)"],
    ),
]


@pytest.mark.parametrize(
    ("request_", "nodes", "words"), [c[1:] for c in NO_FIT], ids=[c[0] for c in NO_FIT]
)
def test_no_fit_reason(
    request_: PlacementRequest, nodes: list[NodeSnapshot], words: list[str]
) -> None:
    result = place(request_, nodes)
    assert isinstance(result, NoFit), result
    for word in words:
        assert word in result.reason


def test_many_refusals_are_summarised() -> None:
    nodes = [node(f"n{i}", gpu(0, free=1)) for i in range(10)]
    result = place(req(), nodes)
    assert isinstance(result, NoFit)
    assert "(and 7 more)" in result.reason
    assert result.reason.count("GiB free") == 3


def test_unknown_strategy_is_misuse() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        place(req(), TWO_GPU_NODES, strategy="random")  # type: ignore[arg-type]


def test_apply_books_gpus_and_cpu() -> None:
    n = node("a", gpu(0), gpu(1), cpu=True)
    n = apply(n, cuda("a", 1, fraction=0.25), deployment="d")
    n = apply(n, cpu("a"), deployment="e")
    assert n.gpu(1) == dataclasses.replace(gpu(1), promised=0.25, engines=1, deployments=("d",))
    assert n.gpu(0) == gpu(0)
    assert (n.cpu_engines, n.deployments) == (1, ("d", "e"))


def test_request_from_spec() -> None:
    spec = DeploymentSpec.model_validate(
        {
            "name": "qwen",
            "model": "m",
            "device": "cuda",
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.5,
            "placement": {"nodes": ["a"], "gpus": [2, 3]},
        }
    )
    assert PlacementRequest.for_spec(spec) == PlacementRequest(
        deployment="qwen",
        device="cuda",
        gpus_per_replica=2,
        gpu_memory_utilization=0.5,
        nodes=("a",),
        gpu_indices=(2, 3),
    )


def test_snapshot_from_records_counts_active_engines_and_prefers_samples() -> None:
    info = GpuInfo(index=0, memory_total=80 * GIB, memory_free=80 * GIB)
    nodes = [
        Node(id="b", gpus=[info]),
        Node(id="a"),
        Node(id="g", gpus=[info], labels={"deepinfer.cpu": "true"}),
    ]
    samples = {"b": GpuSamples(node="b", gpus=[info.model_copy(update={"memory_free": GIB})])}

    def eng(i: int, state: EngineState, node_id: str, **kw: object) -> Engine:
        return Engine(id=f"d-{i}", deployment="d", replica=i, state=state, node=node_id, **kw)  # type: ignore[arg-type]

    engines = [
        eng(0, EngineState.RUNNING, "b", device="cuda", gpus=[0], gpu_fraction=0.5),
        eng(1, EngineState.STOPPING, "b", device="cuda", gpus=[0], gpu_fraction=0.25),
        eng(2, EngineState.FAILED, "b", device="cuda", gpus=[0], gpu_fraction=0.25),
        eng(3, EngineState.SCHEDULED, "a", device="cpu"),
        eng(4, EngineState.RUNNING, "gone", device="cpu"),
    ]
    snaps = {s.id: s for s in snapshot(nodes, engines, samples)}
    assert list(snaps) == ["a", "b", "g"]
    b0 = snaps["b"].gpu(0)
    assert b0 is not None
    assert (b0.promised, b0.engines, b0.memory_free) == (0.75, 2, GIB)
    assert (snaps["a"].cpu_capable, snaps["a"].cpu_engines) == (True, 1)
    assert snaps["b"].cpu_capable is False and snaps["g"].cpu_capable is True


@pytest.mark.parametrize("strategy", ["spread", "binpack", "idle_first"])
def test_a_shared_memo_never_changes_a_placement(strategy: Strategy) -> None:
    import random

    rng = random.Random(7)
    nodes = [
        node(f"n{i}", *(gpu(g, free=rng.choice([None, 20, 80])) for g in range(4)))
        for i in range(6)
    ]
    memo = Memo()
    with_memo, without = list(nodes), list(nodes)
    refused = 0
    for i in range(60):
        r = req(
            deployment=f"d{i % 5}",
            gpu_memory_utilization=rng.choice([0.2, 0.3, 0.5]),
            gpus_per_replica=rng.choice([1, 1, 2]),
        )
        a = place(r, with_memo, strategy=strategy, memo=memo)
        b = place(r, without, strategy=strategy)
        assert a == b, i
        if isinstance(a, Placement):
            (x,) = a.assignments
            with_memo = [
                apply(n, x, deployment=r.deployment) if n.id == x.node else n for n in with_memo
            ]
            without = [
                apply(n, x, deployment=r.deployment) if n.id == x.node else n for n in without
            ]
        else:
            refused += 1
    assert 0 < refused < 60  # both outcomes were compared
