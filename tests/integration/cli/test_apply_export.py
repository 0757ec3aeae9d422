"""`deepinfer-nb apply` and `export` as run from a shell against a real gateway (its own
embedded store; no engines are needed to change deployment records): created/updated/unchanged
said per deployment, export -> apply is the identity, --dry-run changes nothing, --prune."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from deepinfer_nb.netutil import free_port

from . import helpers

EXE = helpers.EXE

FILE = """
deployments:
  - name: chat
    model: smollm2-135m-instruct
    device: cpu
    replicas: 2
    max_model_len: 2048
    env: {OMP_NUM_THREADS: "2"}
  - name: tools
    model: smollm2-135m-instruct
    device: cpu
    engine_args: ["--max-num-seqs", "8"]
    rollout: {max_surge: 0, max_unavailable: 1}
  - name: big
    model: Qwen/Qwen2.5-7B-Instruct
    device: "cuda:0"
    tensor_parallel_size: 1
    gpu_memory_utilization: 0.9
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("gw") / "gw.log"
    url = f"http://127.0.0.1:{port}"
    proc = helpers.start(["gateway", "--port", str(port)], url=url, log=log)
    try:
        yield url
    finally:
        helpers.stop(proc)


def cli(gateway: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEEPINFER_GATEWAY": gateway}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=60)


def test_apply_export_round_trip_dry_run_and_prune(gateway: str, tmp_path: Path) -> None:
    spec_file = tmp_path / "deployments.yaml"
    spec_file.write_text(FILE)
    first = cli(gateway, "apply", "-f", str(spec_file))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["chat: created", "tools: created", "big: created"]

    exported = cli(gateway, "export")
    assert exported.returncode == 0, exported.stderr
    data = yaml.safe_load(exported.stdout)
    chat = next(d for d in data["deployments"] if d["name"] == "chat")
    assert chat["env"] == {"OMP_NUM_THREADS": "***"} and chat["max_model_len"] == 2048
    assert "created_at" not in chat and "previous" not in chat and "replicas" in chat
    out = tmp_path / "exported.yaml"
    out.write_text(exported.stdout)
    again = cli(gateway, "apply", "-f", str(out))
    assert sorted(again.stdout.splitlines()) == [
        "big: unchanged",
        "chat: unchanged",
        "tools: unchanged",
    ]
    assert cli(gateway, "export").stdout == exported.stdout  # the round trip is the identity
    secret = httpx.get(gateway + "/v1/deployments/chat").json()
    assert secret["previous"] is None  # "***" kept the secret: no change was recorded

    # a change, dry run first: the diff is printed, nothing changes
    changed = FILE.replace("max_model_len: 2048", "max_model_len: 1024")
    spec_file.write_text(changed)
    dry = cli(gateway, "apply", "-f", str(spec_file), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "(dry run) chat: update" in dry.stdout and "max_model_len: 2048 -> 1024" in dry.stdout
    assert "(dry run) tools: unchanged" in dry.stdout
    assert httpx.get(gateway + "/v1/deployments/chat").json()["max_model_len"] == 2048
    applied = cli(gateway, "apply", "-f", str(spec_file))
    assert "chat: updated" in applied.stdout and "tools: unchanged" in applied.stdout
    view = httpx.get(gateway + "/v1/deployments/chat").json()
    assert view["max_model_len"] == 1024 and view["previous"]["max_model_len"] == 2048

    # prune: the file without `big`
    spec_file.write_text(changed.split("  - name: big")[0])
    dry = cli(gateway, "apply", "-f", str(spec_file), "--prune", "--dry-run")
    assert "(dry run) big: delete" in dry.stdout
    assert httpx.get(gateway + "/v1/deployments/big").status_code == 200
    pruned = cli(gateway, "apply", "-f", str(spec_file), "--prune")
    assert pruned.returncode == 0 and "big: deleted" in pruned.stdout
    names = [d["name"] for d in httpx.get(gateway + "/v1/deployments").json()["data"]]
    assert names == ["chat", "tools"]

    as_json = json.loads(cli(gateway, "export", "-o", "json").stdout)
    assert [d["name"] for d in as_json["deployments"]] == ["chat", "tools"]


def test_apply_errors_are_one_line_usage(gateway: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    for text, words in (
        ("deployments:\n  - name: x\n    model: m\n    gpu: 1\n", "unknown field 'gpu'"),
        ("deployments:\n  - model: m\n", "has no name"),
        ("deployments:\n  - {name: x, model: m, device: tpu}\n", "device"),
        ("deployments: [\n", "not YAML or JSON"),
        ("- {name: x, model: m}\n- {name: x, model: m}\n", "listed twice"),
    ):
        bad.write_text(text)
        result = cli(gateway, "apply", "-f", str(bad))
        assert result.returncode == 2, (text, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (text, result.stderr)
    missing = cli(gateway, "apply", "-f", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
