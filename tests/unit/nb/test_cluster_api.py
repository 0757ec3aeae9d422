"""The Python API on an in-kernel memory-store cluster without a worker (no engine can start):
connect/reuse, idempotent deploy, scale, context manager, close vs shutdown, tables, reprs."""

from __future__ import annotations

import time

import pytest

import deepinfer_nb
from deepinfer_nb.client import cluster as api
from deepinfer_nb.errors import DeepInferError, EngineUnavailableError


@pytest.fixture
def cluster():
    c = deepinfer_nb.connect("memory://", worker=False, gateway_port=None)
    yield c
    c.shutdown()


def test_connect_reuses_and_refuses_another_store(cluster) -> None:
    again = deepinfer_nb.connect("memory://", worker=False, gateway_port=None)
    assert again._hosted is cluster._hosted
    with pytest.raises(DeepInferError, match="shut it down first"):
        deepinfer_nb.connect("etcd://127.0.0.1:1", worker=False, gateway_port=None)


def test_deploy_scale_stop(cluster) -> None:
    dep = cluster.deploy("smollm2-135m-instruct", name="a", device="cpu", max_num_seqs=2)
    again = cluster.deploy("smollm2-135m-instruct", name="a", device="cpu", max_num_seqs=2)
    assert (again.name, again.change, dep.change) == ("a", "unchanged", "created")
    assert dep.spec.engine_args == ["--max-num-seqs", "2"]
    other = cluster.deploy("smollm2-135m-instruct", name="a", device="cpu")  # other arguments
    assert other.change == "updated" and dep.spec.engine_args == []
    dep.scale(3)
    assert dep.spec.replicas == 3
    assert "Deployment 'a'" in repr(dep) and "<div>" in dep._repr_html_()
    with pytest.raises(EngineUnavailableError, match="no Running engine"):
        dep.chat("hi")
    assert dep.stop(wait_s=5)
    assert dep.status == "Removed"
    with pytest.raises(api.DeploymentError, match="no deployment named 'a'"):
        cluster.deployment("a")


def test_context_manager_removes_the_deployment(cluster) -> None:
    with cluster.deploy("m", name="ctx", device="cpu") as dep:
        assert "ctx" in cluster.snapshot().deployments
        assert dep.model_name == "ctx"
    assert "ctx" not in cluster.snapshot().deployments


def test_tables_are_dataframes(cluster) -> None:
    cluster.deploy("m", name="t", device="cpu", replicas=2)

    deadline = time.monotonic() + 10
    while len(cluster.engines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    frame = cluster.engines()
    assert list(frame["state"]) == ["Pending", "Pending"]
    assert list(cluster.gpus().columns)[:2] == ["node", "gpu"]


def test_close_detaches_and_shutdown_stops(cluster) -> None:
    other = deepinfer_nb.connect("memory://", worker=False, gateway_port=None)
    other.close()
    assert not other.connected and cluster.connected
    with pytest.raises(DeepInferError, match="closed"):
        other.deploy("m", name="x")
    cluster.deploy("m", name="gone", device="cpu")
    cluster.shutdown()
    assert not cluster.connected
    assert "not connected" in repr(cluster)
    fresh = deepinfer_nb.connect("memory://", worker=False, gateway_port=None)
    try:
        assert "gone" not in fresh.snapshot().deployments
    finally:
        fresh.shutdown()
