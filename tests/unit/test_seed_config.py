"""The original deepinfer's configs/default.toml and deploy body (tests/data/seed, copied from
its repository) are accepted: its key names map to ours with a one-line note each, a key with
no meaning here is a clear error, and its curl body is a valid deployment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepinfer_nb.config import Settings
from deepinfer_nb.errors import ConfigError
from deepinfer_nb.gateway.deployments import parse_spec

SEED = Path(__file__).parents[1] / "data" / "seed"


def test_the_original_default_toml_loads() -> None:
    s = Settings.load(SEED / "default.toml", env={})
    assert (s.server.host, s.server.port, s.server.max_connections) == ("0.0.0.0", 8082, 1000)
    assert (s.scheduler.reconcile_interval_s, s.scheduler.strategy) == (5.0, "idle_first")
    assert s.agent.heartbeat_ttl_s == 30  # heartbeat every 10 s = a 30 s lease refreshed at TTL/3
    assert (s.agent.reconcile_interval_s, s.agent.health_check_interval_s) == (5.0, 30.0)
    assert s.storage.url == "etcd://127.0.0.1:2379"
    # one line per key read under another name, naming it, its line and what it became
    assert len(s.notes) == 6 and all("\n" not in n for n in s.notes)
    assert any(
        "storage.etcd_endpoints (line 21)" in n and "endpoints = ['127.0.0.1:2379']" in n
        for n in s.notes
    ), s.notes
    assert any("heartbeat_ttl_s = 30" in n and "TTL/3" in n for n in s.notes)


def test_original_names_work_from_the_environment_too() -> None:
    s = Settings.load(env={"DEEPINFER_STORAGE__ETCD_ENDPOINTS": "127.0.0.1:1,127.0.0.1:2"})
    assert s.storage.endpoints == ["127.0.0.1:1", "127.0.0.1:2"]
    assert "environment DEEPINFER_STORAGE__ETCD_ENDPOINTS" in s.notes[0]


def test_a_key_with_no_meaning_here_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nmax_connections = 10\nworker_threads = 4\n")
    with pytest.raises(ConfigError, match=r"server.worker_threads \(line 3\): unknown key"):
        Settings.load(cfg, env={})
    cfg.write_text('[agent]\nheartbeat_interval_secs = "often"\n')
    with pytest.raises(ConfigError, match="expected a whole number"):
        Settings.load(cfg, env={})


def test_the_original_deploy_body_is_a_valid_deployment() -> None:
    body = json.loads((SEED / "deploy_body.json").read_text())
    spec = parse_spec(body)
    assert (spec.name, spec.model, spec.device) == (
        "qwen2.5-7b-instruct",
        "Qwen/Qwen2.5-7B-Instruct",
        "cuda:0",
    )
    assert (spec.tensor_parallel_size, spec.gpu_memory_utilization) == (1, 0.9)
