"""A deployment spec's versions, without I/O: its fingerprint, how it changes, its rollout state.

A deployment's *engine settings* are its spec minus what can change in place (name, replicas,
restart budget, placement, rollout policy, history); `spec_hash` fingerprints them, and every
engine record carries the hash it runs. `change` (POST/PUT/PATCH, apply, a re-run deploy),
`rolled_back` and `restarted` make the next spec, keeping the engine settings it replaces in
`previous`; `status` tells how far the replicas are (control/rollout.py decides the moves).
A change of model (`same_model`) leaves the old model's `facts` behind: every entry point reads
the new model's again before it writes the spec.
The gateway, the controller and the notebook API all use these, so every entry point decides
"updated" or "unchanged" the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from .models import DeploymentSpec, Engine, EngineSettings, EngineState

S = EngineState
IN_PLACE = frozenset(
    {
        "name",
        "replicas",
        "max_restarts",
        "idle_timeout",
        "placement",
        "rollout",
        "previous",
        "facts",
        "created_at",
        "created_by",
        "updated_by",
        "schema_version",
    }
)
"""Spec fields whose change needs no new engine."""


def engine_settings(spec: DeploymentSpec) -> dict[str, Any]:
    """The fields an engine is launched with (everything but IN_PLACE)."""
    return spec.model_dump(mode="json", exclude=set(IN_PLACE))


def spec_hash(spec: DeploymentSpec) -> str:
    """A short fingerprint of the engine settings. Fields at their default are left out, so a
    field added in a later version does not roll every engine on upgrade."""
    data = spec.model_dump(mode="json", exclude=set(IN_PLACE), exclude_defaults=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def is_outdated(engine: Engine, current: str) -> bool:
    return bool(engine.spec_hash) and engine.spec_hash != current


def status(spec: DeploymentSpec, engines: Iterable[Engine]) -> dict[str, Any]:
    """The rollout as the views show it: state complete | progressing | halted, how many
    replicas run the current spec, and why it is halted."""
    current = spec_hash(spec)
    wanted = [e for e in engines if e.replica < spec.replicas]
    updated = {e.replica for e in wanted if not is_outdated(e, current) and e.state is S.RUNNING}
    outdated = [e for e in wanted if is_outdated(e, current)]
    state, reason = "complete", ""
    if outdated:
        failed = [e for e in wanted if not is_outdated(e, current) and e.state is S.FAILED]
        if failed:
            cause = (failed[0].error or failed[0].reason).strip().splitlines()
            state = "halted"
            reason = f"new engine {failed[0].id} failed: {cause[-1] if cause else 'no error'}"
            reason += "; the old engines keep serving (fix the spec, or roll back)"
        else:
            state = "progressing"
    return {
        "state": state,
        "updated": len(updated),
        "replicas": spec.replicas,
        "spec_hash": current,
        "reason": reason,
        "can_roll_back": spec.previous is not None,
    }


SERVER_FIELDS = frozenset(
    {"created_at", "created_by", "updated_by", "schema_version", "previous", "facts"}
)


def desired(spec: DeploymentSpec) -> dict[str, Any]:
    """What a user asked for (what `export` writes and `apply` compares)."""
    return spec.model_dump(mode="json", exclude=set(SERVER_FIELDS))


def _settings_for_rollback(spec: DeploymentSpec) -> dict[str, Any]:
    settings = engine_settings(spec)
    settings.pop("restart_generation", None)  # a rollback is not an undo of a restart
    return settings


def change(existing: DeploymentSpec, incoming: DeploymentSpec) -> DeploymentSpec | None:
    """`existing` changed to what `incoming` asks for, or None when nothing differs. A change of
    engine settings keeps the old ones in `previous`, for `rollback`."""
    updated = incoming.model_copy(
        update={
            "created_at": existing.created_at,
            "created_by": existing.created_by,
            "previous": existing.previous,
            "restart_generation": existing.restart_generation,
        }
    )
    if desired(updated) == desired(existing):
        return None
    if spec_hash(updated) != spec_hash(existing):
        updated = updated.model_copy(update={"previous": _settings_for_rollback(existing)})
    return updated


def same_model(a: DeploymentSpec, b: DeploymentSpec) -> bool:
    """Whether both serve the same model files: a spec's `facts` are those of its model, and a
    change of model (or revision) must find them again (`hub/preflight.py`), never keep them."""
    return (a.model, a.revision) == (b.model, b.revision)


def current_settings(spec: DeploymentSpec, engines: Iterable[Engine]) -> EngineSettings | None:
    """The effective settings a launched engine of the current spec reports (None: none yet).
    An engine of an earlier spec (another model, another context) still serving during a
    rollout does not speak for the new one."""
    current = spec_hash(spec)
    launched = (e.settings for e in engines if not is_outdated(e, current))
    return next((s for s in launched if s is not None), None)


def rolled_back(spec: DeploymentSpec) -> DeploymentSpec | None:
    """The spec with its previous engine settings back (None: there were none); the settings
    it leaves become the new `previous`, so a second rollback goes forward again."""
    if spec.previous is None:
        return None
    data = {**spec.model_dump(), **spec.previous}
    data["previous"] = _settings_for_rollback(spec)
    return DeploymentSpec.model_validate(data)


def restarted(spec: DeploymentSpec) -> DeploymentSpec:
    """The spec with every engine due for replacement (a rolling restart)."""
    return spec.model_copy(update={"restart_generation": spec.restart_generation + 1})
