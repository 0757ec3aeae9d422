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
- a changed spec rolls the replicas (control/rollout.py decides which slot moves when);
- a Failed engine waits `min(backoff * 2**restarts, cap)` and stays Failed for good once
  `restarts >= spec.max_restarts` (the worker zeroes the count of an engine that failed after
  running `restart_reset_s`, so only a crash loop uses the budget up), or at once when the
  worker marked it `permanent` (see hub/failures.py; the launch policy refused the spec);
- scale to zero: a deployment with an `idle_timeout` whose last request (its `activity/` record,
  written by the gateways) and whose engines' start are both older than that is set idle
  (`SetIdle`, a compare-and-swap on the activity record as read, so a request recorded meanwhile
  wins); an idle deployment wants no engines (its engines stop like a scale-down) until a request
  clears the flag. Its spec is untouched: scaling to zero is not a spec change;
- activity records of deleted deployments are deleted.

At most one action per engine per round: each is a compare-and-swap on the record as read, so a
round never races with itself; the next round (triggered by the resulting watch event) continues.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence

from .. import specs
from ..models import (
    Activity,
    DeploymentSpec,
    Engine,
    EngineState,
    GpuSamples,
    Node,
    format_duration,
)
from . import rollout, scheduler
from .memory_need import engine_memory_need
from .scheduler import Assignment, NoFit, PlacementRequest, Strategy

S = EngineState
HOLDS_PROCESS = (S.DOWNLOADING, S.STARTING, S.RUNNING)
ON_NODE = (S.SCHEDULED, S.DOWNLOADING, S.STARTING, S.RUNNING, S.STOPPING)


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


@dataclasses.dataclass(frozen=True)
class SetIdle:
    activity: Activity
    """The new record (idle); written only if the one read is unchanged (or still absent)."""
    reason: str


@dataclasses.dataclass(frozen=True)
class ForgetActivity:
    activity: Activity
    """The record of a deleted deployment, as read (deleted only if unchanged)."""


EngineAction = CreateEngine | ScheduleEngine | SetPending | MarkLost | StopEngine | DeleteEngine
ActivityAction = SetIdle | ForgetActivity
Action = EngineAction | ActivityAction


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
    activity: Mapping[str, Activity] | None = None,
) -> Decision:
    """`strategy` is the default for deployments whose placement names none; `activity` holds
    the deployments' `activity/` records (scale to zero)."""
    backoff = backoff or Backoff()
    all_engines = sorted(engines, key=lambda e: (e.deployment, e.replica, e.id))
    actions: list[Action] = []
    touched: set[str] = set()
    wake: list[float] = []

    activity = activity or {}
    actions += [ForgetActivity(a) for name, a in activity.items() if name not in deployments]
    deployments = _scaled_to_zero(deployments, activity)

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
        action = _retire(e, deployments, activity)
        if action is not None:
            actions.append(action)
            touched.add(e.id)

    snaps = scheduler.snapshot(
        nodes.values(), [e for e in all_engines if e.id not in touched], samples
    )
    memo = scheduler.Memo()  # one per round: snapshots change one node per placement
    ordered = sorted(deployments.values(), key=lambda d: (d.created_at, d.name))
    for spec in ordered:
        idle = _idle_decision(spec, by_deployment.get(spec.name, []), activity.get(spec.name), now)
        if isinstance(idle, SetIdle):
            actions.append(idle)  # its engines stop next round, once the flag is written
        elif idle is not None:
            wake.append(idle)
        slots: dict[int, list[Engine]] = {}
        for e in by_deployment.get(spec.name, []):
            slots.setdefault(e.replica, []).append(e)
        current = specs.spec_hash(spec)
        rolls = rollout.plan(
            spec, {r: [e for e in es if e.id not in touched] for r, es in slots.items()}
        )
        for replica in range(spec.replicas):
            engines_in_slot = [e for e in slots.get(replica, []) if e.id not in touched]
            roll = rolls.get(replica)
            if roll is not None:
                for e in roll.retire:
                    action = _retire_outdated(e, roll.reason)
                    if action is not None:
                        actions.append(action)
                    touched.add(e.id)
                if roll.create:
                    actions.append(_create(spec, replica, current, new_id, roll.reason))
                engines_in_slot = [e for e in engines_in_slot if e.id not in touched]
            elif not slots.get(replica):
                actions.append(_create(spec, replica, current, new_id, "waiting for placement"))
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


def _create(
    spec: DeploymentSpec, replica: int, spec_hash: str, new_id: Callable[[str, int], str], why: str
) -> CreateEngine:
    pending = Engine(
        id=new_id(spec.name, replica),
        deployment=spec.name,
        replica=replica,
        state=S.PENDING,
        reason=why,
        spec_hash=spec_hash,
    )
    return CreateEngine(pending.transition(S.PENDING, why))


def _retire_outdated(e: Engine, why: str) -> Action | None:
    if e.state in HOLDS_PROCESS:
        return StopEngine(e.transition(S.STOPPING, why))
    if e.state == S.STOPPING:
        return None
    return DeleteEngine(e, why)


def _scaled_to_zero(
    deployments: Mapping[str, DeploymentSpec], activity: Mapping[str, Activity]
) -> dict[str, DeploymentSpec]:
    """The deployments as this round treats them: an idle one wants 0 replicas (only here: the
    stored spec, and so its hash and rollout, are untouched)."""
    out = dict(deployments)
    for name, spec in deployments.items():
        record = activity.get(name)
        if record is not None and record.idles(spec) and spec.replicas:
            out[name] = spec.model_copy(update={"replicas": 0})
    return out


def running_since(e: Engine) -> float:
    """When `e` last became Running (its history; the record's time if the history is cut)."""
    return next((t.at for t in reversed(e.history) if t.state is S.RUNNING), e.updated_at)


def _idle_decision(
    spec: DeploymentSpec, engines: Sequence[Engine], record: Activity | None, now: float
) -> SetIdle | float | None:
    """SetIdle when `spec` has been without requests for its idle_timeout; else the time it
    will be (to wake the controller then), or None when scale to zero does not apply now."""
    timeout = spec.idle_timeout
    if timeout is None or spec.replicas == 0 or (record is not None and record.idles(spec)):
        return None
    running = [running_since(e) for e in engines if e.state is S.RUNNING]
    if not running:
        return None  # nothing to stop yet: its engines are still coming
    last = max([*running, record.last_request_at if record is not None else 0.0])
    due = last + timeout
    if due > now:
        return due
    base = record or Activity(deployment=spec.name, last_request_at=0.0)
    reason = f"no request for {format_duration(timeout)}: scaled to zero"
    return SetIdle(base.model_copy(update={"idle": True, "idle_since": now}), reason)


def _wanted(e: Engine, deployments: Mapping[str, DeploymentSpec]) -> bool:
    spec = deployments.get(e.deployment)
    return spec is not None and e.replica < spec.replicas


def _retire(
    e: Engine, deployments: Mapping[str, DeploymentSpec], activity: Mapping[str, Activity]
) -> Action | None:
    record = activity.get(e.deployment)
    if e.deployment not in deployments:
        why = "deployment deleted"
    elif record is not None and record.idles(deployments[e.deployment]):
        why = "idle: scaled to zero"
    else:
        why = f"scaled down to {deployments[e.deployment].replicas} replica(s)"
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
    # The one file read in here (a GGUF header, cached per file version), only while placing.
    result = scheduler.place(
        PlacementRequest.for_spec(spec, memory_bytes=engine_memory_need(spec)),
        snaps,
        strategy=_strategy(spec, strategy),
        memo=memo,
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
            "unplaced": False,
            "download": None,
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
            "unplaced": True,
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


def describe(action: EngineAction) -> tuple[str, Engine]:
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
