"""The controller's decisions without I/O: records in, actions out (engine record protocol)."""

from __future__ import annotations

from typing import Any

import pytest

from deepinfer_nb.control.reconcile import (
    Backoff,
    CreateEngine,
    DeleteEngine,
    MarkLost,
    ScheduleEngine,
    SetPending,
    StopEngine,
    decide,
)
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, GpuInfo, Node

S = EngineState
GIB = 1024**3
NOW = 1_000_000.0


def spec(name: str = "d", **kw: Any) -> DeploymentSpec:
    return DeploymentSpec(name=name, model="m", created_at=1.0, **kw)


def eng(replica: int, state: EngineState = S.PENDING, *, dep: str = "d", **kw: Any) -> Engine:
    return Engine(id=f"{dep}-{replica}-x", deployment=dep, replica=replica, state=state, **kw)


def cpu_node(name: str) -> Node:
    return Node(id=name)


def gpu_node(name: str, gpus: int = 1) -> Node:
    return Node(
        id=name,
        gpus=[GpuInfo(index=i, memory_total=80 * GIB, memory_free=80 * GIB) for i in range(gpus)],
    )


def run(
    deployments: list[DeploymentSpec], engines: list[Engine], nodes: list[Node], **kw: Any
) -> Any:
    return decide(
        deployments={d.name: d for d in deployments},
        engines=engines,
        nodes={n.id: n for n in nodes},
        now=kw.pop("now", NOW),
        new_id=lambda dep, r: f"{dep}-{r}-new",
        **kw,
    )


def test_one_pending_record_per_replica() -> None:
    decision = run([spec(replicas=2)], [eng(0, S.RUNNING, node="a")], [cpu_node("a")])
    assert [type(a) for a in decision.actions] == [CreateEngine]
    (create,) = decision.actions
    assert (create.engine.id, create.engine.replica, create.engine.state) == (
        "d-1-new",
        1,
        S.PENDING,
    )
    assert create.engine.history[-1].state == S.PENDING


def test_pending_engines_are_placed_seeing_each_other() -> None:
    decision = run([spec(replicas=2)], [eng(0), eng(1)], [gpu_node("a"), gpu_node("b")])
    placed = [
        (a.engine.node, a.engine.device, a.engine.gpus, a.engine.state) for a in decision.actions
    ]
    assert all(isinstance(a, ScheduleEngine) for a in decision.actions)
    assert placed == [("a", "cuda", [0], S.SCHEDULED), ("b", "cuda", [0], S.SCHEDULED)]
    assert decision.actions[0].engine.gpu_fraction == 0.9
    assert decision.actions[0].engine.reason == "placed on node a GPU 0 (0.90 each)"


def test_cpu_placement() -> None:
    (action,) = run([spec(device="cpu")], [eng(0)], [cpu_node("c")]).actions
    assert isinstance(action, ScheduleEngine)
    assert (action.engine.node, action.engine.device, action.engine.gpus) == ("c", "cpu", [])


def test_no_fit_sets_the_reason_once() -> None:
    (action,) = run([spec(device="cuda")], [eng(0)], [cpu_node("c")]).actions
    assert isinstance(action, SetPending)
    assert "no GPU on node(s) c" in action.engine.reason
    assert action.engine.unplaced  # the gateway does not hold requests for it
    # Same reason already recorded: no write churn.
    assert run([spec(device="cuda")], [action.engine], [cpu_node("c")]).actions == []
    (placed,) = run([spec(device="cpu")], [action.engine], [cpu_node("c")]).actions
    assert isinstance(placed, ScheduleEngine) and not placed.engine.unplaced


def test_scale_down_stops_highest_replica_first() -> None:
    engines = [eng(i, S.RUNNING, node="a") for i in range(4)]
    decision = run([spec(replicas=1)], engines, [cpu_node("a")])
    assert [(type(a), a.engine.replica) for a in decision.actions] == [
        (StopEngine, 3),
        (StopEngine, 2),
        (StopEngine, 1),
    ]
    assert decision.actions[0].engine.state == S.STOPPING
    assert decision.actions[0].engine.reason == "scaled down to 1 replica(s)"


def test_deleted_deployment_retires_every_engine_by_state() -> None:
    engines = [
        eng(0, S.RUNNING, node="a"),
        eng(1, S.STARTING, node="a"),
        eng(2, S.SCHEDULED, node="a"),
        eng(3, S.PENDING),
        eng(4, S.STOPPING, node="a"),
        eng(5, S.STOPPED, node="a"),
        eng(6, S.FAILED, node="a"),
    ]
    decision = run([], engines, [cpu_node("a")])
    kinds = {a.engine.replica: type(a) for a in decision.actions}
    assert kinds == {
        0: StopEngine,
        1: StopEngine,
        2: DeleteEngine,
        3: DeleteEngine,
        5: DeleteEngine,
        6: DeleteEngine,
    }
    assert [a.engine.replica for a in decision.actions] == [6, 5, 3, 2, 1, 0]
    assert all(
        a.reason == "deployment deleted" for a in decision.actions if isinstance(a, DeleteEngine)
    )


def test_node_loss_marks_lost_then_replaces_elsewhere() -> None:
    running = eng(0, S.RUNNING, node="a", device="cpu", endpoint="h:1", pid=7)
    (lost,) = run([spec(device="cpu")], [running], [cpu_node("b")]).actions
    assert isinstance(lost, MarkLost)
    assert (lost.engine.state, lost.engine.reason) == (S.LOST, "node a lost its lease")

    (again,) = run([spec(device="cpu")], [lost.engine], [cpu_node("b")]).actions
    assert isinstance(again, ScheduleEngine)
    e = again.engine
    assert (e.node, e.restarts, e.endpoint, e.pid) == ("b", 1, "", 0)
    assert e.reason == "re-placed on node b (cpu)"
    assert [t.state for t in e.history] == [S.LOST, S.SCHEDULED]


def test_lost_engine_that_cannot_fit_goes_pending_with_reason() -> None:
    lost = eng(0, S.LOST, node="a")
    (action,) = run([spec(device="cuda")], [lost], [cpu_node("b")]).actions
    assert isinstance(action, SetPending)
    assert (action.engine.restarts, action.engine.node) == (1, "")
    assert "no GPU" in action.engine.reason


def test_stopping_engine_on_a_lost_node_is_lost_then_deleted() -> None:
    stopping = eng(0, S.STOPPING, node="a")
    (lost,) = run([], [stopping], []).actions
    assert isinstance(lost, MarkLost)
    (gone,) = run([], [lost.engine], []).actions
    assert isinstance(gone, DeleteEngine)


@pytest.mark.parametrize(
    ("restarts", "next_restart_at", "updated_at", "expected"),
    [
        (0, NOW + 5, NOW, "wait"),  # worker's backoff not yet over
        (1, NOW - 1, NOW - 10, "restart"),  # due
        (5, NOW - 1, NOW - 10, "give up"),  # max_restarts (5) reached
        (2, 0.0, NOW - 7, "wait"),  # no next_restart_at: 2 * 2**2 = 8 s after
        (2, 0.0, NOW - 9, "restart"),
    ],
)
def test_failed_engine_backoff_and_max_restarts(
    restarts: int, next_restart_at: float, updated_at: float, expected: str
) -> None:
    failed = eng(
        0,
        S.FAILED,
        node="a",
        restarts=restarts,
        next_restart_at=next_restart_at,
        error="exit code 1: CUDA out of memory",
    ).model_copy(update={"updated_at": updated_at})
    decision = run(
        [spec(device="cpu")], [failed], [cpu_node("a")], backoff=Backoff(base_s=2.0, max_s=60.0)
    )
    if expected == "restart":
        (action,) = decision.actions
        assert isinstance(action, ScheduleEngine)
        assert action.engine.restarts == restarts + 1
        assert action.engine.reason == "restart on node a (cpu)"
        assert action.engine.error == "exit code 1: CUDA out of memory"
        assert decision.wake_at is None
    elif expected == "wait":
        assert decision.actions == []
        due = next_restart_at or updated_at + 2.0 * 2**restarts
        assert decision.wake_at == pytest.approx(due)
    else:
        assert decision.actions == [] and decision.wake_at is None


def test_permanently_failed_engine_is_never_restarted() -> None:
    """A launch-policy refusal: 0 restarts used, yet no restart (the spec must change)."""
    refused = eng(0, S.FAILED, node="a", permanent=True, error="launch policy refused ...")
    decision = run([spec(device="cpu")], [refused], [cpu_node("a")])
    assert decision.actions == [] and decision.wake_at is None


def test_backoff_is_capped() -> None:
    b = Backoff(base_s=2.0, max_s=60.0)
    assert [b.delay(r) for r in (0, 1, 2, 5, 100)] == [2.0, 4.0, 8.0, 60.0, 60.0]


def test_scaled_back_up_reuses_a_stopped_record() -> None:
    stopped = eng(1, S.STOPPED, node="a")
    (action,) = run(
        [spec(replicas=2, device="cpu")], [eng(0, S.RUNNING, node="a"), stopped], [cpu_node("a")]
    ).actions
    assert isinstance(action, SetPending)
    assert (action.engine.id, action.engine.reason) == ("d-1-x", "replica wanted again")


def test_steady_state_has_nothing_to_do() -> None:
    engines = [
        eng(0, S.RUNNING, node="a"),
        eng(1, S.STARTING, node="b"),
        eng(2, S.SCHEDULED, node="a"),
    ]
    decision = run([spec(replicas=3)], engines, [cpu_node("a"), cpu_node("b")])
    assert decision.actions == [] and decision.wake_at is None


def test_active_engines_hold_their_gpu_against_other_deployments() -> None:
    # d-0 holds 0.9 of the only GPU; e-0 (0.9 too) cannot fit beside it.
    engines = [
        eng(0, S.RUNNING, node="b", device="cuda", gpus=[0], gpu_fraction=0.9),
        eng(0, dep="e"),
    ]
    decision = run([spec(), spec("e")], engines, [gpu_node("b")])
    (action,) = decision.actions
    assert isinstance(action, SetPending) and "already promised" in action.engine.reason


@pytest.mark.parametrize(
    ("placement", "default", "nodes_used"),
    [
        ({}, "spread", {"a", "b"}),  # no strategy on the deployment: the controller's default
        ({}, "binpack", {"a"}),
        ({"strategy": "spread"}, "binpack", {"a", "b"}),  # the deployment's own choice wins
    ],
)
def test_deployment_strategy_or_the_controller_default(
    placement: dict[str, str], default: str, nodes_used: set[str]
) -> None:
    d = spec(replicas=2, gpu_memory_utilization=0.4, placement=placement)
    decision = run([d], [eng(0), eng(1)], [gpu_node("a"), gpu_node("b")], strategy=default)
    assert {a.engine.node for a in decision.actions} == nodes_used
