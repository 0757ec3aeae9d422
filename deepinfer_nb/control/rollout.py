"""Rolling updates, without I/O: which engines run an older spec and what to do about them.

A deployment's *engine settings* are its spec minus what can change in place (name, replicas,
restart budget, placement, rollout policy, history); `spec_hash` fingerprints them. Every engine
record carries the hash it was created (controller) and launched (worker) with. When the
deployment's hash changes (PATCH, apply, a re-run deploy, rollback, a rolling restart), each
replica slot is rolled, `max_surge` + `max_unavailable` slots at a time:

    surge:        new engine created beside the old one -> Running -> old one Stopping (out of
                  routing, drained by its worker) -> Stopped -> deleted
    unavailable:  old one Stopping first, then the new engine in its slot

A slot whose old engine is not serving (Failed, Pending, Starting) is replaced at once. A new
engine that fails *halts* the rollout: no further slot starts, the old engines keep serving, and
`status()` reports why until the engine recovers (its restarts) or the spec is changed again
(e.g. rolled back). `slot_actions` is called by `reconcile.decide`; `status` by the views.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..models import DeploymentSpec, Engine, EngineState

S = EngineState
IN_PLACE = frozenset(
    {
        "name",
        "replicas",
        "max_restarts",
        "placement",
        "rollout",
        "previous",
        "created_at",
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


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """What to do with one replica slot this round."""

    create: bool = False
    """Create a new engine (current spec) in the slot."""
    retire: tuple[Engine, ...] = ()
    """Outdated engines to take out (stop if they hold a process, else delete)."""
    reason: str = ""


def plan(spec: DeploymentSpec, slots: dict[int, Sequence[Engine]]) -> dict[int, SlotPlan]:
    """The rollout's moves for the wanted slots (0..replicas-1) that hold outdated engines.

    Slots without outdated engines are not in the answer (the reconciler's usual rules apply).
    """
    current = spec_hash(spec)
    out: dict[int, SlotPlan] = {}
    surging = unavailable = 0
    halted = False
    waiting: list[int] = []
    for r in range(spec.replicas):
        engines = slots.get(r, ())
        old = [e for e in engines if is_outdated(e, current)]
        new = [e for e in engines if not is_outdated(e, current)]
        serving = any(e.state is S.RUNNING for e in engines)
        if not serving:
            unavailable += 1
        if not old:
            continue
        if any(e.state is S.FAILED for e in new):
            halted = True
        if new and any(e.state is S.RUNNING for e in new):
            out[r] = SlotPlan(retire=tuple(old), reason="replaced by the rollout")
            if any(e.state in (S.RUNNING, S.STOPPING) for e in old):
                surging += 1  # one slot at a time: the next waits until this one is drained
        elif new:
            surging += 1  # the new engine is on its way: the old ones keep serving meanwhile
            idle = tuple(e for e in old if e.state is not S.RUNNING)
            if idle:
                out[r] = SlotPlan(retire=idle, reason="replaced by the rollout")
        elif not any(e.state is S.RUNNING for e in old):
            # nothing to keep available: replace at once (an old Stopping engine finishes first)
            stopping = any(e.state is S.STOPPING for e in old)
            out[r] = SlotPlan(
                create=not stopping, retire=tuple(old), reason="replaced by the rollout"
            )
        else:
            waiting.append(r)
    if halted:
        return out
    for r in waiting:
        if surging < spec.rollout.max_surge:
            surging += 1
            out[r] = SlotPlan(create=True, reason="rollout: new engine first")
        elif unavailable < spec.rollout.max_unavailable:
            unavailable += 1
            first_out = tuple(e for e in slots[r] if is_outdated(e, current))
            out[r] = SlotPlan(retire=first_out, reason="rollout: old engine out first")
    return out


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


# ---- spec changes (the gateway's POST/PUT/PATCH/rollback and the notebook's deploy share them)

SERVER_FIELDS = frozenset({"created_at", "schema_version", "previous"})


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
            "previous": existing.previous,
            "restart_generation": existing.restart_generation,
        }
    )
    if desired(updated) == desired(existing):
        return None
    if spec_hash(updated) != spec_hash(existing):
        updated = updated.model_copy(update={"previous": _settings_for_rollback(existing)})
    return updated


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
