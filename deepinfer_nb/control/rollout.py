"""Rolling updates, without I/O: which engines run an older spec and what to do about them.

Every engine record carries the hash of the engine settings it was created (controller) and
launched (worker) with (`specs.spec_hash`). When the
deployment's hash changes (PATCH, apply, a re-run deploy, rollback, a rolling restart), each
replica slot is rolled, `max_surge` + `max_unavailable` slots at a time:

    surge:        new engine created beside the old one -> Running -> old one Stopping (out of
                  routing, drained by its worker) -> Stopped -> deleted
    unavailable:  old one Stopping first, then the new engine in its slot

A slot whose old engine is not serving (Failed, Pending, Starting) is replaced at once. A new
engine that fails *halts* the rollout: no further slot starts, the old engines keep serving, and
`specs.status()` reports why until the engine recovers (its restarts) or the spec is changed
again (e.g. rolled back). `plan` is called by `reconcile.decide`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..models import DeploymentSpec, Engine, EngineState
from ..specs import is_outdated, spec_hash

S = EngineState


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
