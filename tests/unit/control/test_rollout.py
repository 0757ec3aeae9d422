"""Rolling updates decided by `reconcile.decide` + `rollout.plan`, driven round by round by a
small honest simulation of the workers (Scheduled -> Starting -> Running, Stopping -> Stopped),
checking the promises at every step: never fewer Running replicas than wanted (unavailable 0),
never more than one extra engine (surge 1), one slot at a time, a failing new engine halts."""

from __future__ import annotations

from typing import Any

from deepinfer_nb import specs
from deepinfer_nb.control.reconcile import (
    CreateEngine,
    DeleteEngine,
    MarkLost,
    ScheduleEngine,
    SetPending,
    StopEngine,
    decide,
)
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, Node, RolloutPolicy

S = EngineState
NODES = {"a": Node(id="a")}


class Sim:
    """The store's engines, the controller's decisions applied, and workers that make each
    engine take one step per round (or fail it, for engines whose spec `breaks`)."""

    def __init__(self, spec: DeploymentSpec) -> None:
        self.spec = spec
        self.engines: dict[str, Engine] = {}
        self.ids = 0
        self.breaks: set[str] = set()  # spec hashes whose engines fail to start
        self.history: list[list[Engine]] = []

    def new_id(self, dep: str, replica: int) -> str:
        self.ids += 1
        return f"{dep}-{replica}-{self.ids}"

    def round(self) -> None:
        decision = decide(
            deployments={self.spec.name: self.spec},
            engines=list(self.engines.values()),
            nodes=NODES,
            now=0.0,
            new_id=self.new_id,
        )
        for action in decision.actions:
            e = action.engine
            if isinstance(action, DeleteEngine):
                del self.engines[e.id]
            elif isinstance(
                action, CreateEngine | ScheduleEngine | SetPending | StopEngine | MarkLost
            ):
                self.engines[e.id] = e
        for e in list(self.engines.values()):  # the workers
            step = {S.SCHEDULED: S.STARTING, S.STARTING: S.RUNNING, S.STOPPING: S.STOPPED}
            if e.state in step:
                launched = specs.spec_hash(self.spec) if e.state is S.SCHEDULED else e.spec_hash
                nxt = step[e.state]
                if nxt is S.RUNNING and e.spec_hash in self.breaks:
                    failed = e.transition(S.FAILED, "exited").model_copy(
                        update={"error": "bad engine argument --nope"}
                    )
                    self.engines[e.id] = failed
                    continue
                self.engines[e.id] = e.transition(nxt).model_copy(update={"spec_hash": launched})
        self.history.append(list(self.engines.values()))

    def running(self) -> list[Engine]:
        return [e for e in self.engines.values() if e.state is S.RUNNING]

    def settle(self, rounds: int = 40) -> None:
        for _ in range(rounds):
            self.round()


def spec(**kw: Any) -> DeploymentSpec:
    return DeploymentSpec(name="d", model="m", device="cpu", created_at=1.0, **kw)


def steady(replicas: int = 2, **kw: Any) -> Sim:
    sim = Sim(spec(replicas=replicas, **kw))
    sim.settle()
    assert len(sim.running()) == replicas
    return sim


def test_hash_ignores_in_place_fields_and_defaults() -> None:
    base = spec(max_model_len=2048)
    assert specs.spec_hash(base) == specs.spec_hash(
        base.model_copy(update={"replicas": 5, "max_restarts": 1})
    )
    assert specs.spec_hash(base) != specs.spec_hash(base.model_copy(update={"max_model_len": 1024}))
    assert specs.spec_hash(base) != specs.spec_hash(
        base.model_copy(update={"restart_generation": 1})
    )


def test_a_spec_change_rolls_every_replica_surge_1_unavailable_0() -> None:
    sim = steady(replicas=2, max_model_len=2048)
    before = {e.id for e in sim.running()}
    sim.spec = sim.spec.model_copy(update={"max_model_len": 1024})
    new_hash = specs.spec_hash(sim.spec)
    assert specs.status(sim.spec, sim.engines.values())["state"] == "progressing"
    sim.settle()
    for engines in sim.history[-40:]:
        running = [e for e in engines if e.state is S.RUNNING]
        holding = [e for e in engines if e.state in (S.SCHEDULED, S.STARTING, S.RUNNING)]
        assert len(running) >= 2  # unavailable 0: never fewer than the replicas
        assert len(holding) + sum(e.state is S.STOPPING for e in engines) <= 3  # surge 1
    after = sim.running()
    assert len(after) == 2 and not before & {e.id for e in after}
    assert {e.spec_hash for e in after} == {new_hash} and len(sim.engines) == 2
    assert specs.status(sim.spec, sim.engines.values()) | {"spec_hash": ""} == {
        "state": "complete",
        "updated": 2,
        "replicas": 2,
        "spec_hash": "",
        "reason": "",
        "can_roll_back": False,
    }


def test_one_slot_at_a_time() -> None:
    sim = steady(replicas=3)
    sim.spec = sim.spec.model_copy(update={"restart_generation": 1})
    sim.settle()
    new_hash = specs.spec_hash(sim.spec)
    for engines in sim.history[-40:]:
        slots_in_flight = {
            e.replica for e in engines if e.spec_hash != new_hash and e.state is not S.RUNNING
        } | {e.replica for e in engines if e.spec_hash == new_hash and e.state is not S.RUNNING}
        assert len(slots_in_flight) <= 1
    assert {e.spec_hash for e in sim.running()} == {new_hash}


def test_a_failing_new_engine_halts_and_old_ones_keep_serving() -> None:
    sim = steady(replicas=2)
    old_ids = {e.id for e in sim.running()}
    old_spec = sim.spec
    sim.spec = sim.spec.model_copy(update={"engine_args": ["--nope"], "max_restarts": 0})
    sim.breaks.add(specs.spec_hash(sim.spec))
    sim.settle()
    assert {e.id for e in sim.running()} == old_ids  # both old engines still serve
    failed = [e for e in sim.engines.values() if e.state is S.FAILED]
    assert len(failed) == 1  # halted after the first: the second slot never started
    state = specs.status(sim.spec, sim.engines.values())
    assert state["state"] == "halted" and "--nope" in state["reason"]
    assert "roll back" in state["reason"]
    # rolling back: the old engines are current again, the failed new one is removed
    sim.spec = old_spec.model_copy(update={"max_restarts": 0})
    sim.settle()
    assert {e.id for e in sim.engines.values()} == old_ids
    assert specs.status(sim.spec, sim.engines.values())["state"] == "complete"


def test_max_unavailable_takes_the_old_engine_out_first() -> None:
    sim = steady(replicas=2, rollout=RolloutPolicy(max_surge=0, max_unavailable=1))
    sim.spec = sim.spec.model_copy(update={"dtype": "float32"})
    sim.settle()
    for engines in sim.history[-40:]:
        active = [e for e in engines if e.state is not S.STOPPED]
        assert len(active) <= 2  # no surge
        assert sum(e.state is S.RUNNING for e in engines) >= 1  # at most one down
    assert {e.spec_hash for e in sim.running()} == {specs.spec_hash(sim.spec)}
    assert len(sim.running()) == 2


def test_policy_must_allow_progress() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot both be 0"):
        RolloutPolicy(max_surge=0, max_unavailable=0)
