"""Failure classes: engine exits classified in failures.py, and the controller never restarting
a permanent failure while it restarts a transient one; the device defaults of defaults.py."""

from __future__ import annotations

from deepinfer_nb.control.reconcile import ScheduleEngine, decide
from deepinfer_nb.defaults import effective
from deepinfer_nb.hub.failures import from_engine_exit
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, Node

S = EngineState
NOW = 1_000_000.0


def test_engine_exits() -> None:
    assert from_engine_exit("bad engine args: unrecognized --foo", exit_code=2).permanent
    assert from_engine_exit("model not found: ./nope (no such folder)", exit_code=1).permanent
    arch = "cannot start m: ValueError: Model architectures ['Foo'] are not supported for now"
    assert from_engine_exit(arch, exit_code=1).permanent
    assert not from_engine_exit("engine process killed by SIGKILL", exit_code=-9).permanent
    assert not from_engine_exit("health check failed 3 times in a row", exit_code=None).permanent


def decide_on(engine: Engine) -> list[object]:
    spec = DeploymentSpec(name="d", model="m", created_at=1.0)
    return decide(
        deployments={"d": spec}, engines=[engine], nodes={"a": Node(id="a")}, now=NOW
    ).actions


def test_permanent_failures_are_never_restarted() -> None:
    failed = Engine(id="d-0-x", deployment="d", state=S.FAILED, node="a", next_restart_at=NOW - 1)
    assert [type(a) for a in decide_on(failed)] == [ScheduleEngine]
    assert decide_on(failed.model_copy(update={"permanent": True})) == []


def test_device_defaults_for_every_entry_point() -> None:
    spec = DeploymentSpec(name="d", model="m")
    cpu = effective(spec, "cpu", cpu_dtype="float32")
    assert (cpu.dtype, cpu.enforce_eager, cpu.mode, cpu.max_model_len) == (
        "float32",
        True,
        "eager",
        2048,
    )
    gpu = effective(spec, "cuda", cpu_dtype="float32")
    assert (gpu.dtype, gpu.enforce_eager, gpu.mode, gpu.max_model_len) == (
        "auto",
        False,
        "compiled",
        None,
    )
    chosen = DeploymentSpec(name="d", model="m", enforce_eager=False, max_model_len=4096)
    assert effective(chosen, "cpu").model_dump(include={"enforce_eager", "max_model_len"}) == {
        "enforce_eager": False,
        "max_model_len": 4096,
    }
