"""A deployment scaled to zero as every entry point shows and takes it: `--idle-timeout` in the
magic and the CLI, the Python API's spec, "Idle (scaled to zero)" in status, `ls` and the
monitor's table (notebook and CLI, from the gateway's view), and `deploy --wait` counting it
ready."""

from __future__ import annotations

import argparse

import pytest

from deepinfer_nb.cli import deploy as cli_deploy
from deepinfer_nb.cli import snapshot as cli_snapshot
from deepinfer_nb.cli.inspect import deployment_rows
from deepinfer_nb.client import cluster as api
from deepinfer_nb.client import render
from deepinfer_nb.client.view import Snapshot, status_of
from deepinfer_nb.errors import DeploymentError
from deepinfer_nb.gateway.deployments import deployment_view
from deepinfer_nb.models import Activity, DeploymentSpec, Engine, EngineState
from deepinfer_nb.nb import parsing

IDLE = "Idle (scaled to zero)"


def snap(*, idle: bool, engines: tuple[Engine, ...] = ()) -> Snapshot:
    spec = DeploymentSpec(name="d", model="m", idle_timeout="15m", created_at=1.0)
    activity = {"d": Activity(deployment="d", idle=idle, idle_since=5.0)}
    return Snapshot(
        deployments={"d": spec},
        engines={e.id: e for e in engines},
        nodes={},
        gpus={},
        revision=1,
        activity=activity,
    )


def test_status_tables_and_wait_show_an_idle_deployment() -> None:
    idle = snap(idle=True)
    assert status_of(idle, "d") == IDLE
    rows = render.engine_rows(idle)
    assert [(r["deployment"], r["state"]) for r in rows] == [("d", IDLE)]
    assert IDLE in render.engines_text(idle) and "#78909c" in render.engines_html(idle)
    assert IDLE in render.deployment_text(idle, "d")
    assert api.Waiter("d", None)(idle) is True  # deploy --wait: ready, a request wakes it
    awake = snap(idle=False, engines=(Engine(id="d-0-x", deployment="d", state="Starting"),))
    assert status_of(awake, "d") == "Starting 0/1"
    assert [r["state"] for r in render.engine_rows(awake)] == ["Starting"]
    assert api.Waiter("d", None)(awake) is False
    # engines still stopping after going idle: the deployment says idle, the engines show
    stopping = snap(idle=True, engines=(Engine(id="d-0-x", deployment="d", state="Stopping"),))
    assert status_of(stopping, "d") == IDLE
    assert [r["state"] for r in render.engine_rows(stopping)] == [EngineState.STOPPING.value]


def test_the_cli_reads_idle_from_the_gateway_view() -> None:
    spec = DeploymentSpec(name="d", model="m", idle_timeout=900)
    view = deployment_view(spec, [], idle=True)
    assert view["idle"] is True and view["idle_timeout"] == 900.0
    assert view["message"] == f"{IDLE}: the next request starts an engine"
    assert deployment_rows([view])[0]["status"] == IDLE
    assert status_of(cli_snapshot.snapshot(deployments=[view]), "d") == IDLE
    assert deployment_view(spec, [])["idle"] is False


def test_idle_timeout_from_the_magic_the_cli_and_the_api() -> None:
    _, ns = parsing.parse("deploy m --idle-timeout 15m")
    assert ns.idle_timeout == "15m"
    assert "[--idle-timeout 30s|15m|1h]" in parsing.HELP
    args = argparse.Namespace(task=None, tool_call_parser=None, idle_timeout="1h")
    assert cli_deploy._spec_flags(args) == {"idle_timeout": "1h"}
    spec = api.build_spec(
        "m", name="d", gpus=0, replicas=1, device="cpu", engine_args={"idle_timeout": "15m"}
    )
    assert spec.idle_timeout == 900.0
    with pytest.raises(DeploymentError, match="not a duration"):
        api.build_spec(
            "m", name="d", gpus=0, replicas=1, device="cpu", engine_args={"idle_timeout": "x"}
        )
