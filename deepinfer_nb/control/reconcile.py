"""The controller's decisions, without I/O: records in, actions out.

`decide(deployments=..., engines=..., nodes=..., now=...)` looks at one consistent snapshot of the
store and returns what the leader should write (see the engine record protocol in DESIGN.md):

- one engine record per replica slot (`{deployment}-{replica}-{random}`), created Pending;
- Pending, Lost and due Failed engines placed by the scheduler -> Scheduled (a NoFit leaves the
  engine Pending with the reason, written only when it changes);
- engines on a node whose lease is gone -> Lost (then placed again next round);
- replicas beyond `spec.replicas`, or of a deleted deployment: engines holding a process ->
  Stopping (highest replica first), records without one (Pending, Scheduled before its claim,
  Failed, Lost, Stopped) deleted;
- a Failed engine waits `min(backoff * 2**restarts, cap)` and stays Failed for good once
  `restarts >= spec.max_restarts` (the worker zeroes the count of an engine that failed after
  running `restart_reset_s`, so only a crash loop uses the budget up), and at once when the
  worker marked the failure `permanent` (the launch policy refused the spec).

At most one action per engine per round: each is a compare-and-swap on the record as read, so a
round never races with itself; the next round (triggered by the resulting watch event) continues.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..models import DeploymentSpec, Engine, EngineState, GpuSamples, Node
from . import scheduler
from .scheduler import Assignment, NoFit, PlacementRequest, Strategy

S = EngineState
HOLDS_PROCESS = (S.STARTING, S.RUNNING)
ON_NODE = (S.SCHEDULED, S.STARTING, S.RUNNING, S.STOPPING)


@dataclasses.dataclass(frozen=True)
class CreateEngine:
    engine: Engine


@dataclasses.dataclass(frozen=True)
class ScheduleEngine:
    engine: Engine
    """The new record, in state Scheduled with node and devices."""


@dataclasses.dataclass(frozen=True)
class SetPending:
    engine: Engine
    """The new record, Pending with the NoFit reason."""


@dataclasses.dataclass(frozen=True)
class MarkLost:
    engine: Engine


@dataclasses.dataclass(frozen=True)
class StopEngine:
    engine: Engine


@dataclasses.dataclass(frozen=True)
class DeleteEngine:
    engine: Engine
    """The record as read (deleted only if unchanged)."""
    reason: str


Action = CreateEngine | ScheduleEngine | SetPending | MarkLost | StopEngine | DeleteEngine


@dataclasses.dataclass(frozen=True)
class Backoff:
    base_s: float = 2.0
    max_s: float = 60.0

    def delay(self, restarts: int) -> float:
        return float(min(self.base_s * 2 ** min(restarts, 30), self.max_s))


@dataclasses.dataclass(frozen=True)
class Decision:
    actions: list[Action]
    wake_at: float | None = None
    """The earliest time a waiting Failed engine becomes due (None: nothing waits)."""


def new_engine_id(deployment: str, replica: int) -> str:
    return f"{deployment}-{replica}-{secrets.token_hex(3)}"


def decide(
    *,
    deployments: Mapping[str, DeploymentSpec],
    engines: Iterable[Engine],
    nodes: Mapping[str, Node],
    now: float,
    samples: Mapping[str, GpuSamples] | None = None,
    backoff: Backoff | None = None,
    new_id: Callable[[str, int], str] = new_engine_id,
    strategy: Strategy = "spread",
) -> Decision:
    """`strategy` is the default for deployments whose placement names none."""
    backoff = backoff or Backoff()
    all_engines = sorted(engines, key=lambda e: (e.deployment, e.replica, e.id))
    actions: list[Action] = []
    touched: set[str] = set()
    wake: list[float] = []

    # Lost first: an engine on a vanished node must not count as holding resources below.
    for e in all_engines:
        if e.state in ON_NODE and e.node not in nodes:
            lost = e.transition(S.LOST, f"node {e.node} lost its lease")
            actions.append(MarkLost(lost))
            touched.add(e.id)

    by_deployment: dict[str, list[Engine]] = {}
    for e in all_engines:
        by_deployment.setdefault(e.deployment, []).append(e)

    # Unwanted engines (deleted deployment or replica >= replicas), highest replica first.
    unwanted = [e for e in all_engines if e.id not in touched and not _wanted(e, deployments)]
    for e in sorted(unwanted, key=lambda e: (e.deployment, -e.replica, e.id)):
        action = _retire(e, deployments)
        if action is not None:
            actions.append(action)
            touched.add(e.id)

    snaps = scheduler.snapshot(
        nodes.values(), [e for e in all_engines if e.id not in touched], samples
    )
    memo = scheduler.Memo()  # one per round: snapshots change one node per placement
    ordered = sorted(deployments.values(), key=lambda d: (d.created_at, d.name))
    for spec in ordered:
        slots: dict[int, list[Engine]] = {}
        for e in by_deployment.get(spec.name, []):
            slots.setdefault(e.replica, []).append(e)
        for replica in range(spec.replicas):
            engines_in_slot = [e for e in slots.get(replica, []) if e.id not in touched]
            if not slots.get(replica):
                pending = Engine(
                    id=new_id(spec.name, replica),
                    deployment=spec.name,
                    replica=replica,
                    state=S.PENDING,
                    reason="waiting for placement",
                )
                actions.append(CreateEngine(pending.transition(S.PENDING, pending.reason)))
                continue
            for e in engines_in_slot:
                action, snaps = _advance(
                    e,
                    spec,
                    snaps,
                    now=now,
                    backoff=backoff,
                    wake=wake,
                    memo=memo,
                    strategy=strategy,
                )
                if action is not None:
                    actions.append(action)
    return Decision(actions, min(wake) if wake else None)


def _wanted(e: Engine, deployments: Mapping[str, DeploymentSpec]) -> bool:
    spec = deployments.get(e.deployment)
    return spec is not None and e.replica < spec.replicas


def _retire(e: Engine, deployments: Mapping[str, DeploymentSpec]) -> Action | None:
    why = (
        "deployment deleted"
        if e.deployment not in deployments
        else f"scaled down to {deployments[e.deployment].replicas} replica(s)"
    )
    if e.state in HOLDS_PROCESS:
        return StopEngine(e.transition(S.STOPPING, why))
    if e.state == S.STOPPING:
        return None  # the worker finishes it and writes Stopped
    # No process to stop: Pending/Failed/Lost/Stopped, or Scheduled but not yet claimed (the
    # delete is a CAS, so a worker claiming it at the same moment makes the delete fail instead).
    return DeleteEngine(e, why)


def _advance(
    e: Engine,
    spec: DeploymentSpec,
    snaps: list[scheduler.NodeSnapshot],
    *,
    now: float,
    backoff: Backoff,
    wake: list[float],
    memo: scheduler.Memo,
    strategy: Strategy,
) -> tuple[Action | None, list[scheduler.NodeSnapshot]]:
    """The next step for a wanted engine, and the snapshot with any new placement booked."""
    if e.state == S.STOPPED:
        # Scaled down and back up before the record was removed: reuse the slot's record.
        return SetPending(_unplaced(e, "replica wanted again")), snaps
    if e.state == S.FAILED:
        if e.permanent or e.restarts >= spec.max_restarts:
            return None, snaps
        due = e.next_restart_at or (e.updated_at + backoff.delay(e.restarts))
        if due > now:
            wake.append(due)
            return None, snaps
    elif e.state not in (S.PENDING, S.LOST):
        return None, snaps
    result = scheduler.place(
        PlacementRequest.for_spec(spec), snaps, strategy=_strategy(spec, strategy), memo=memo
    )
    restarts = e.restarts + (1 if e.state in (S.FAILED, S.LOST) else 0)
    if isinstance(result, NoFit):
        if e.state == S.PENDING and e.reason == result.reason:
            return None, snaps
        pending = _unplaced(e, result.reason).model_copy(update={"restarts": restarts})
        return SetPending(pending), snaps
    a = result.assignments[0]
    verb = {S.FAILED: "restart", S.LOST: "re-placed"}.get(e.state, "placed")
    scheduled = e.transition(S.SCHEDULED, f"{verb} on {_where(a)}").model_copy(
        update={
            "node": a.node,
            "device": a.device,
            "gpus": list(a.gpus),
            "gpu_fraction": a.gpu_fraction,
            "restarts": restarts,
            "error": e.error if e.state == S.FAILED else "",
            "permanent": False,
            "endpoint": "",
            "auth_token": "",
            "pid": 0,
            "pid_start_time": 0.0,
            "started_at": 0.0,
            "next_restart_at": 0.0,
        }
    )
    booked = [scheduler.apply(n, a, deployment=spec.name) if n.id == a.node else n for n in snaps]
    return ScheduleEngine(scheduled), booked


def _unplaced(e: Engine, reason: str) -> Engine:
    return e.transition(S.PENDING, reason).model_copy(
        update={
            "node": "",
            "gpus": [],
            "gpu_fraction": 0.0,
            "endpoint": "",
            "auth_token": "",
            "pid": 0,
            "pid_start_time": 0.0,
        }
    )


def _strategy(spec: DeploymentSpec, default: Strategy) -> Strategy:
    return spec.placement.strategy or default


def _where(a: Assignment) -> str:
    if a.device == "cpu":
        return f"node {a.node} (cpu)"
    return f"node {a.node} GPU {','.join(map(str, a.gpus))} ({a.gpu_fraction:.2f} each)"


def describe(action: Action) -> tuple[str, Engine]:
    """A short verb and the engine, for logs."""
    verbs: Sequence[tuple[type, str]] = (
        (CreateEngine, "create"),
        (ScheduleEngine, "schedule"),
        (SetPending, "pending"),
        (MarkLost, "lost"),
        (StopEngine, "stop"),
        (DeleteEngine, "delete"),
    )
    verb = next(v for t, v in verbs if isinstance(action, t))
    return verb, action.engine
