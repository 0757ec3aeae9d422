"""Scale to zero without I/O: the controller's idle decision, the activity record's writes,
`idle_timeout` parsing, and that going idle is no spec change."""

from __future__ import annotations

from typing import Any

import pytest

from deepinfer_nb import specs
from deepinfer_nb.control.reconcile import (
    CreateEngine,
    ForgetActivity,
    SetIdle,
    SetPending,
    StopEngine,
    decide,
)
from deepinfer_nb.models import (
    Activity,
    DeploymentSpec,
    Engine,
    EngineState,
    Node,
    Transition,
    format_duration,
    parse_duration,
)
from deepinfer_nb.store.activity import read_all, record_request, recorded
from deepinfer_nb.store.memory import MemoryStore

S = EngineState
T0 = 1_000_000.0


def running(replica: int = 0, *, since: float = T0) -> Engine:
    return Engine(
        id=f"d-{replica}-x",
        deployment="d",
        replica=replica,
        state=S.RUNNING,
        node="a",
        history=[Transition(state=S.RUNNING, reason="ready", at=since)],
    )


def run(spec: DeploymentSpec, engines: list[Engine], now: float, **activity: Activity) -> Any:
    return decide(
        deployments={spec.name: spec},
        engines=engines,
        nodes={"a": Node(id="a")},
        now=now,
        activity=activity,
        new_id=lambda dep, r: f"{dep}-{r}-new",
    )


def test_idle_after_the_timeout_since_the_last_request_or_the_start() -> None:
    spec = DeploymentSpec(name="d", model="m", idle_timeout="10s", replicas=2, created_at=1.0)
    engines = [running(0), running(1, since=T0 + 4)]
    # never a request: counted from when the last engine became Running
    assert run(spec, engines, T0 + 13).wake_at == T0 + 14
    last = Activity(deployment="d", last_request_at=T0 + 20)
    decision = run(spec, engines, T0 + 25, d=last)
    assert decision.actions == [] and decision.wake_at == T0 + 30
    (idle,) = run(spec, engines, T0 + 31, d=last).actions
    assert isinstance(idle, SetIdle)
    assert idle.activity.idle and idle.activity.idle_since == T0 + 31
    assert idle.reason == "no request for 10s: scaled to zero"


def test_an_idle_deployment_stops_its_engines_and_its_spec_is_unchanged() -> None:
    spec = DeploymentSpec(name="d", model="m", idle_timeout=60, replicas=2, created_at=1.0)
    idle = Activity(deployment="d", last_request_at=T0, idle=True, idle_since=T0 + 60)
    engines = [running(0), running(1)]
    actions = run(spec, engines, T0 + 61, d=idle).actions
    assert [type(a) for a in actions] == [StopEngine, StopEngine]
    assert {a.engine.reason for a in actions} == {"idle: scaled to zero"}
    # stopped engines of an idle deployment are deleted, no new ones are created
    stopped = [e.transition(S.STOPPED, "drained") for e in engines]
    assert not any(isinstance(a, CreateEngine) for a in run(spec, stopped, T0 + 62, d=idle).actions)
    # woken (a request cleared the flag): the slots are wanted again
    woken = idle.model_copy(update={"idle": False, "last_request_at": T0 + 70})
    again = run(spec, stopped, T0 + 70, d=woken).actions
    assert [type(a) for a in again] == [SetPending, SetPending]
    # scaling to zero is no spec change: no rollout, same hash with or without the option
    assert specs.spec_hash(spec) == specs.spec_hash(spec.model_copy(update={"idle_timeout": None}))
    assert specs.change(spec, spec.model_copy(update={"idle_timeout": 900.0})) is not None


def test_no_idle_while_starting_without_timeout_or_scaled_to_zero_replicas() -> None:
    starting = Engine(id="d-0-x", deployment="d", state=S.STARTING, node="a")
    spec = DeploymentSpec(name="d", model="m", idle_timeout=1)
    assert run(spec, [starting], T0 + 1e6).actions == []
    plain = DeploymentSpec(name="d", model="m")
    assert run(plain, [running()], T0 + 1e6).actions == []


def test_an_idle_flag_older_than_the_deployment_is_not_its_own() -> None:
    spec = DeploymentSpec(name="d", model="m", idle_timeout=60, created_at=T0)
    stale = Activity(deployment="d", last_request_at=1.0, idle=True, idle_since=2.0)
    assert not stale.idles(spec)
    assert run(spec, [running()], T0 + 1, d=stale).wake_at == T0 + 60  # not stopped


def test_activity_of_a_deleted_deployment_is_forgotten() -> None:
    gone = Activity(deployment="gone", last_request_at=T0)
    spec = DeploymentSpec(name="d", model="m")
    actions = run(spec, [running()], T0, gone=gone).actions
    assert actions == [ForgetActivity(gone)]


def test_recorded_moves_forward_and_wakes_only_for_newer_requests() -> None:
    assert recorded(None, "d", 5.0) == Activity(deployment="d", last_request_at=5.0)
    active = Activity(deployment="d", last_request_at=5.0)
    assert recorded(active, "d", 4.0) is None  # another gateway's older report
    assert recorded(active, "d", 6.0).last_request_at == 6.0  # type: ignore[union-attr]
    idle = Activity(deployment="d", last_request_at=5.0, idle=True, idle_since=9.0)
    assert recorded(idle, "d", 8.0) is None  # served before it went idle: no wake
    assert recorded(idle, "d", 10.0) == idle.model_copy(
        update={"idle": False, "last_request_at": 10.0}
    )
    # a request waiting now wakes it whatever the clocks say
    woken = recorded(idle, "d", 8.0, wake=True)
    assert woken is not None and not woken.idle


async def test_record_request_in_the_store() -> None:
    store = MemoryStore()
    try:
        assert await record_request(store, "d", 5.0) is False
        assert await record_request(store, "d", 3.0) is False
        assert (await read_all(store))["d"].last_request_at == 5.0
        idle = Activity(deployment="d", last_request_at=5.0, idle=True, idle_since=9.0)
        await store.put("/deepinfer/v1/activity/d", idle.encode())
        assert await record_request(store, "d", 12.0) is True
        woken = (await read_all(store))["d"]
        assert (woken.idle, woken.last_request_at) == (False, 12.0)
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("15m", 900.0), ("1h", 3600.0), ("1.5h", 5400.0), ("250ms", 0.25), (90, 90.0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert DeploymentSpec(name="d", model="m", idle_timeout=text).idle_timeout == seconds


def test_duration_errors_and_off() -> None:
    for bad in ("soon", "-5m", "0s", "15 minutes"):
        with pytest.raises(ValueError, match="duration"):
            DeploymentSpec(name="d", model="m", idle_timeout=bad)
    for off in (None, "", "off", 0):
        assert DeploymentSpec(name="d", model="m", idle_timeout=off).idle_timeout is None
    assert [format_duration(s) for s in (900, 3600, 90, 2.5)] == ["15m", "1h", "90s", "2.5s"]
