"""The deployment commands as a terminal user runs them: the real `deepinfer-nb` executable in
subprocesses against a real `deepinfer-nb up` (embedded store, one worker, the gateway) serving
ONE real SmolLM2 engine on CPU for the whole module.

deploy --wait (staged progress), ls, status, logs, chat (Paris; streamed, interactive, json),
gpus, scale, stop; `-o json|yaml` parsed; every error path: its exit code and one stderr line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deepinfer_nb.netutil import free_port

from . import helpers

pytestmark = pytest.mark.engine

NAME = "smol"
EXE = helpers.EXE
START_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`deepinfer-nb up` on a free loopback port; its URL. Stopped (engines drained) after."""
    log = tmp_path_factory.mktemp("up") / "up.log"
    port = free_port()
    node = f"cli-{uuid.uuid4().hex[:8]}"
    url = f"http://127.0.0.1:{port}"
    proc = helpers.start(["up", "--node", node, "--gateway-port", str(port)], url=url, log=log)
    try:
        yield url
    finally:
        helpers.stop(proc)


def cli(
    gateway: str, *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEEPINFER_GATEWAY": gateway}
    env.pop("DEEPINFER_API_KEY", None)
    return subprocess.run(
        [EXE, *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert the command failed with `code` and said why in exactly one stderr line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deepinfer-nb"), lines[0]
    return lines[0]


# ---- a deployment's life, in order (the module shares the one engine)


def test_deploy_wait_shows_stages_and_reaches_running(gateway: str) -> None:
    result = cli(
        gateway,
        "deploy",
        "smollm2-135m-instruct",
        "--name",
        NAME,
        "--device",
        "cpu",
        "--wait",
        timeout=START_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert f"{NAME}: created" in result.stderr
    assert "Starting (" in result.stderr, result.stderr  # staged progress, as in the notebook
    assert "[Pending -> Scheduled -> Starting -> Running]" in result.stderr  # a local model
    assert result.stderr.strip().splitlines()[-1].startswith(f"{NAME}: Running (")
    assert "Running 1/1" in result.stdout
    again = cli(gateway, "deploy", "smollm2-135m-instruct", "--name", NAME, "--device", "cpu")
    assert again.returncode == 0 and f"{NAME}: unchanged" in again.stderr


def test_ls_table_json_and_yaml(gateway: str) -> None:
    table = cli(gateway, "ls")
    assert table.returncode == 0, table.stderr
    assert NAME in table.stdout and "Running 1/1" in table.stdout and "Running" in table.stdout
    data = json.loads(cli(gateway, "ls", "-o", "json").stdout)
    assert [d["name"] for d in data["deployments"]] == [NAME]
    assert [e["state"] for e in data["engines"]] == ["Running"]
    as_yaml = yaml.safe_load(cli(gateway, "ls", "-o", "yaml").stdout)
    assert as_yaml["deployments"][0]["name"] == NAME
    assert as_yaml["engines"][0]["id"] == data["engines"][0]["id"]


def test_status(gateway: str) -> None:
    table = cli(gateway, "status", NAME)
    assert table.returncode == 0 and f"Deployment '{NAME}'" in table.stdout
    view = json.loads(cli(gateway, "status", NAME, "-o", "json").stdout)
    assert view["ready_replicas"] == 1 and view["engines"][0]["state"] == "Running"
    effective = view["effective"]  # the CPU defaults every entry point gets (defaults.py)
    assert effective["max_model_len"] == 2048 and effective["enforce_eager"]


def test_logs_and_follow(gateway: str) -> None:
    result = cli(gateway, "logs", NAME, "--lines", "50")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"==> {NAME}-") and "(Running on cli-" in result.stdout
    assert len(result.stdout.splitlines()) > 2  # the engine's own output under the header
    engine_id = json.loads(cli(gateway, "status", NAME, "-o", "json").stdout)["engines"][0]["id"]
    only = json.loads(cli(gateway, "logs", NAME, "--engine", engine_id, "-o", "json").stdout)
    assert list(only) == [engine_id] and only[engine_id]["lines"]
    env = {**os.environ, "DEEPINFER_GATEWAY": gateway}
    follow = subprocess.Popen(
        [EXE, "logs", NAME, "-f", "-n", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    time.sleep(4)
    assert follow.poll() is None  # still following
    follow.send_signal(signal.SIGINT)
    out, err = follow.communicate(timeout=20)
    assert follow.returncode == 130 and out.startswith(f"==> {NAME}-"), err


def test_chat_streams_paris(gateway: str) -> None:
    result = cli(
        gateway, "chat", NAME, "What is the capital of France?", "--max-tokens", "40",
        "--temperature", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    data = json.loads(
        cli(gateway, "chat", NAME, "What is the capital of France?", "-o", "json").stdout
    )
    assert "Paris" in data["content"] and data["usage"]["completion_tokens"] > 0


def test_chat_interactive_keeps_the_conversation(gateway: str) -> None:
    result = cli(
        gateway,
        "chat",
        NAME,
        "--max-tokens",
        "40",
        "--temperature",
        "0",
        stdin="What is the capital of France?\nRepeat your last answer.\n",
    )
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2 and "Paris" in answers[0]
    assert "Paris" in result.stdout.split(answers[0], 1)[1]  # the second turn saw the first


def test_gpus(gateway: str) -> None:
    table = cli(gateway, "gpus")
    assert table.returncode == 0 and "cli-" in table.stdout
    data = json.loads(cli(gateway, "gpus", "-o", "json").stdout)
    assert [n["id"] for n in data["nodes"] if n["id"].startswith("cli-")]


def test_error_paths_exit_codes_and_one_line(gateway: str, tmp_path: Path) -> None:
    # usage (2): argparse, values checked before any request, the gateway's 422
    assert "the following arguments are required" in one_line_error(cli(gateway, "deploy"), 2)
    assert "invalid choice" in one_line_error(cli(gateway, "ls", "-o", "xml"), 2)
    assert ">= 0" in one_line_error(cli(gateway, "scale", NAME, "-1"), 2)
    assert "device" in one_line_error(cli(gateway, "deploy", "m", "--device", "gpu7"), 2)
    assert "KEY=VALUE" in one_line_error(cli(gateway, "deploy", "m", "--engine-arg", "=1"), 2)
    assert "http://" in one_line_error(cli(gateway, "ls", "--gateway", "localhost:1"), 2)
    unset = f"UNSET_{uuid.uuid4().hex[:6].upper()}"
    assert unset in one_line_error(cli(gateway, "ls", "--api-key-env", unset), 2)
    # failed (1)
    line = one_line_error(cli(gateway, "status", "nope"), 1)
    assert "does not exist" in line and "deepinfer-nb ls" in line
    assert "does not exist" in one_line_error(cli(gateway, "logs", "nope"), 1)
    assert "does not exist" in one_line_error(cli(gateway, "chat", "nope", "hi"), 1)
    assert "does not exist" in one_line_error(cli(gateway, "stop", "nope"), 1)
    conflict = one_line_error(cli(gateway, "deploy", "other-model", "--name", NAME), 1)
    assert "serves smollm2-135m-instruct, not other-model" in conflict
    closed = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(cli(gateway, "ls", "--gateway", closed), 1)
    assert "cannot reach the gateway" in line and "deepinfer-nb up" in line


def test_deploy_wait_on_a_failing_engine_says_why(gateway: str) -> None:
    result = cli(
        gateway,
        "deploy",
        "no-such-local-model",
        "--name",
        "broken",
        "--device",
        "cpu",
        "--engine-arg",
        "max_restarts=0",
        "--wait",
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    # progress lines, then the error: one line that says why and what to do next
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("deepinfer-nb: error: broken-") and "failed:" in error, result.stderr
    assert "deepinfer-nb logs broken" in error and "%deepinfer" not in error
    assert cli(gateway, "rm", "broken").returncode == 0


def test_api_key_gateway(tmp_path: Path) -> None:
    """A gateway with a key: 401 without it is one line naming the variable; with it, ok."""
    port = free_port()
    log = tmp_path / "gw.log"
    env = {**os.environ, "CLI_TEST_KEY": "s3cret"}
    url = f"http://127.0.0.1:{port}"
    args = ["gateway", "--port", str(port), "--api-key-env", "CLI_TEST_KEY"]
    proc = helpers.start(args, url=url, log=log, env=env)
    try:
        line = one_line_error(cli(url, "ls"), 1)
        assert "DEEPINFER_API_KEY" in line
        ok = subprocess.run(
            [EXE, "ls", "--gateway", url, "--api-key-env", "CLI_TEST_KEY", "-o", "json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert ok.returncode == 0 and json.loads(ok.stdout)["deployments"] == []
    finally:
        helpers.stop(proc)


def test_scale_then_stop(gateway: str) -> None:
    scaled = cli(gateway, "scale", NAME, "0", "-o", "json")
    assert scaled.returncode == 0 and json.loads(scaled.stdout)["replicas"] == 0
    deadline = time.monotonic() + 90
    while json.loads(cli(gateway, "status", NAME, "-o", "json").stdout)["engines"]:
        assert time.monotonic() < deadline, "the engine did not stop after scale 0"
        time.sleep(1)
    stopped = cli(gateway, "stop", NAME)
    assert stopped.returncode == 0 and f"{NAME}: stopped and removed" in stopped.stderr
    assert json.loads(cli(gateway, "ls", "-o", "json").stdout)["deployments"] == []
