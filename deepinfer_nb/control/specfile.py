"""Deployments as a file: what `export` (CLI and `%deepinfer export`) writes and `apply` reads.

    deployments:
      - name: chat
        model: smollm2-135m-instruct
        device: cpu
        max_model_len: 2048

Each entry is a deployment spec with its name and model and every field that differs from the
default (server-side fields such as `created_at`, `previous` and `restart_generation` left out),
so that applying an exported file changes nothing. Env values that were masked ("***") stay so:
the deployments API reads "***" as "keep the current value".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

from ..models import DeploymentSpec
from ..specs import desired

HIDDEN = frozenset({"restart_generation"})
"""Server-side counters that a file neither sets nor shows."""


def fields(spec: DeploymentSpec) -> dict[str, Any]:
    """Everything a file can set, for comparing a deployment with a file entry."""
    return {k: v for k, v in desired(spec).items() if k not in HIDDEN}


def entry(spec: DeploymentSpec) -> dict[str, Any]:
    """One deployment as a file entry: name and model first, then every non-default field."""
    mine = fields(spec)
    defaults = fields(DeploymentSpec(name=spec.name, model=spec.model))
    return {k: v for k, v in mine.items() if k in ("name", "model") or v != defaults.get(k)}


def dump(specs: Iterable[DeploymentSpec], *, masked_env: bool = True) -> str:
    """The YAML text of a `deployments:` file for `specs` (sorted by name)."""
    entries = []
    for spec in sorted(specs, key=lambda s: s.name):
        item = entry(spec)
        if masked_env and "env" in item:
            item["env"] = {k: "***" for k in item["env"]}
        entries.append(item)
    return yaml.safe_dump({"deployments": entries}, sort_keys=False)
