"""The key layout under `/deepinfer/v1/` (see DESIGN.md, Store)."""

from __future__ import annotations

ROOT = "/deepinfer/v1/"
DEPLOYMENTS = ROOT + "deployments/"
ENGINES = ROOT + "engines/"
NODES = ROOT + "nodes/"
LEADER = ROOT + "leader/"
ACTIVITY = ROOT + "activity/"
METRICS = "/deepinfer/metrics/v1/"
"""Each process's metrics snapshot, outside ROOT on purpose: written every few seconds, it must
not wake the controller's and the views' whole-tree watches nor weigh on their whole-tree reads."""
GPU_SUFFIX = "/gpus"


def deployment(name: str) -> str:
    return DEPLOYMENTS + name


def engine(engine_id: str) -> str:
    return ENGINES + engine_id


def node(node_id: str) -> str:
    return NODES + node_id


def node_gpus(node_id: str) -> str:
    return NODES + node_id + GPU_SUFFIX


def activity(deployment: str) -> str:
    return ACTIVITY + deployment


def metrics(process: str) -> str:
    return METRICS + process


def leader(role: str) -> str:
    return LEADER + role


def name_of(key: str, prefix: str) -> str:
    """The last path element of `key` under `prefix` ("" if the key is not directly under it)."""
    rest = key[len(prefix) :] if key.startswith(prefix) else ""
    return rest if rest and "/" not in rest else ""


def is_node_gpus(key: str) -> bool:
    return key.startswith(NODES) and key.endswith(GPU_SUFFIX)
