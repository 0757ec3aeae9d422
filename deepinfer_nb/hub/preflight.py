"""Checks before a deployment is written, shared by every entry point (Python API and magic, HTTP
API, CLI): find the model's config.json (local alias, folder, node cache or one quick request to
the hub), estimate its memory (`fit.py`) and refuse at once, with the numbers, when no node can
hold it.

    result = preflight.run(spec, nodes, hub=Hub(cache=None, endpoint=""))
    if result.problems: refuse(" ; ".join(result.problems))
    spec = result.spec                      # with `facts` for the scheduler

Only sure things refuse: a model larger than every node (from config.json, or from the size in
its id when config.json is out of reach), or a hub model that is neither cached here nor
reachable while every node runs on this host (so the workers cannot do better). Everything else
(a gated or private repository that a worker's own HF_TOKEN may open, a hub only the workers
reach) is left to the worker, which fails the engine at once with the reason (`failures.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import urllib.error
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..config import AgentSettings, hub_access
from ..engine import local_models
from ..models import DeploymentSpec, ModelFacts, Node
from . import fit, http
from .failures import not_cached

__all__ = ["Hub", "Result", "is_hub_id", "run"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_TIMEOUT_S = 3.0
MAX_JSON_BYTES = 16 << 20
INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Hub:
    cache: Path | None = None
    """The hub cache of this host (None: huggingface_hub's)."""
    endpoint: str = ""

    @classmethod
    def of(cls, agent: AgentSettings) -> Hub:
        """The hub a node with these settings uses."""
        cache = Path(agent.hub_cache).expanduser() if agent.hub_cache else None
        return cls(cache=cache, endpoint=agent.hub_endpoint)


@dataclasses.dataclass(frozen=True)
class Result:
    spec: DeploymentSpec
    problems: list[str]


def is_hub_id(model: str) -> bool:
    """`org/name` that is neither a local alias nor an existing path."""
    if local_models.lookup(model) is not None or model.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(model)) and not Path(model).exists()


def run(spec: DeploymentSpec, nodes: Iterable[Node], *, hub: Hub | None = None) -> Result:
    """The spec with the model's facts, and the reasons to refuse it (none: go ahead)."""
    nodes = list(nodes)
    facts, unreachable = _facts(spec, hub or Hub())
    problems = []
    guess = facts or fit.facts_from_name(spec.model)
    too_big = fit.check(spec, guess, nodes) if guess is not None else ""
    if too_big:
        problems.append(too_big)
    here = socket.gethostname()
    if unreachable and (problems or (nodes and all(n.host == here for n in nodes))):
        problems.append(unreachable)
        if guess is not None and not too_big:
            # Not a reason on its own (it fits in RAM), but the user should hear it now.
            problems += [note for note in [fit.no_gpu(spec, guess, nodes)] if note]
    return Result(spec.model_copy(update={"facts": facts}), problems)


def _facts(spec: DeploymentSpec, hub: Hub) -> tuple[ModelFacts | None, str]:
    """(facts or None, why the hub could not be asked: "" when it could or need not be)."""
    local = local_models.lookup(spec.model)
    if local is not None:
        return _read(local_models.model_dir(local)), ""
    if not is_hub_id(spec.model):
        # os.path.expanduser: "~name" of no such user stays as written (pathlib raises)
        return _read(Path(os.path.expanduser(spec.model))), ""
    cached = _cached(spec.model, spec.revision, hub)
    if cached is not None:
        return cached, ""
    access = hub_access(endpoint=hub.endpoint)
    host = socket.gethostname()
    if access.offline:
        return None, not_cached(
            repo=spec.model, node=host, endpoint=access.endpoint, offline=True
        ).message
    try:
        config = _get(access.endpoint, spec.model, spec.revision, "config.json", access.token)
    except OSError:
        return None, not_cached(
            repo=spec.model, node=host, endpoint=access.endpoint, offline=False
        ).message
    if config is None:
        return None, ""  # not found, gated, ...: the worker's download says so with its token
    try:
        index = _get(access.endpoint, spec.model, spec.revision, INDEX, access.token)
    except OSError:
        index = None
    return fit.facts_from_config(config, index_total_size=_total_size(index)), ""


def _read(folder: Path) -> ModelFacts | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        index = None
    return fit.facts_from_config(config, index_total_size=_total_size(index))


def _cached(repo: str, revision: str, hub: Hub) -> ModelFacts | None:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "config.json", cache_dir=hub.cache, revision=revision)
    return _read(Path(path).parent) if isinstance(path, str) else None


def _get(
    endpoint: str, repo: str, revision: str, name: str, token: str | None
) -> Mapping[str, Any] | None:
    """One small JSON file from the hub (None: not there or not for us); OSError: no hub."""
    url = f"{endpoint}/{repo}/resolve/{revision}/{name}"
    try:
        with http.get(url, token=token, timeout=HUB_TIMEOUT_S) as resp:
            body = resp.read(MAX_JSON_BYTES)
    except urllib.error.HTTPError:
        return None  # the hub answered: not found, gated, ...
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _total_size(index: Mapping[str, Any] | None) -> int:
    meta = (index or {}).get("metadata") or {}
    size = meta.get("total_size") if isinstance(meta, dict) else None
    return int(size) if isinstance(size, (int, float)) else 0
