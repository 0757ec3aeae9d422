"""A fake fleet: nodes with fake GPUs that register like workers and serve what is placed on them.

`FakeNode` writes a node record and its GPU samples under a lease (so the scheduler places GPU
deployments on it and `GET /v1/gpus` shows it), and acts as that node's worker: it claims each
engine the controller schedules there, serves it with a `FakeBackend` behind the real shim on an
in-process gRPC server, marks it Running with that endpoint, and stops it when asked. No process
and no GPU is involved; the store records are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from ..models import Engine, EngineState, GpuInfo, GpuSamples, Node, decode
from ..store import MetaStore, keys
from ..store.base import Lease
from .backend import FakeBackend
from .shim import running_shim

__all__ = ["GIB", "FakeNode", "fake_gpus"]

GIB = 1 << 30
POLL_S = 0.05


def fake_gpus(count: int, *, memory_gib: int = 80, name: str = "Fake H100") -> list[GpuInfo]:
    """`count` idle devices of `memory_gib` each."""
    return [
        GpuInfo(
            index=i,
            uuid=f"GPU-fake-{i:04d}",
            name=name,
            memory_total=memory_gib * GIB,
            memory_used=0,
            memory_free=memory_gib * GIB,
            utilization=0.0,
        )
        for i in range(count)
    ]


class FakeNode:
    """One fake node (see the module docstring). Use as `async with FakeNode(store, "n1"):`."""

    def __init__(
        self,
        store: MetaStore,
        node_id: str,
        *,
        gpus: int = 1,
        memory_gib: int = 80,
        ttl: int = 5,
        backend: Callable[[Engine], FakeBackend] = lambda _engine: FakeBackend(),
    ) -> None:
        self.store = store
        self.node = Node(id=node_id, host="fake", gpus=fake_gpus(gpus, memory_gib=memory_gib))
        self.ttl = ttl
        self.backend = backend
        """Makes the backend of each engine placed here (vary replies or failures per engine)."""
        self.shims: dict[str, Any] = {}
        self._stacks: dict[str, contextlib.AsyncExitStack[bool | None]] = {}
        self._lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.node.id

    async def start(self) -> FakeNode:
        self._lease = await self.store.grant_lease(self.ttl)
        await self.store.put(keys.node(self.id), self.node.encode(), lease=self._lease.id)
        samples = GpuSamples(node=self.id, gpus=self.node.gpus)
        await self.store.put(keys.node_gpus(self.id), samples.encode(), lease=self._lease.id)
        self._task = asyncio.create_task(self._loop(), name=f"fake-node-{self.id}")
        return self

    async def stop(self) -> None:
        """Stop serving and deregister (the node's keys go with its lease)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for eid in list(self._stacks):
            await self._stacks.pop(eid).aclose()
        if self._lease is not None:
            await self._lease.revoke()

    async def __aenter__(self) -> FakeNode:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _loop(self) -> None:
        while True:
            for kv in (await self.store.range(keys.ENGINES)).items:
                engine = decode(Engine, kv.key, kv.value)
                if engine.node == self.id:
                    nxt = await self._advance(engine)
                    if nxt is not None:
                        await self.store.compare_and_swap(kv, nxt.encode())
            await asyncio.sleep(POLL_S)

    async def _advance(self, e: Engine) -> Engine | None:
        """The engine's next record, as a worker would write it (None: nothing to do)."""
        if e.state == EngineState.SCHEDULED and e.id not in self._stacks:
            stack = contextlib.AsyncExitStack()
            token = f"fake-token-{e.id}"
            shim = await stack.enter_async_context(
                running_shim(self.backend(e), token=token, model_name=e.deployment)
            )
            self._stacks[e.id], self.shims[e.id] = stack, shim
            return e.transition(EngineState.RUNNING, f"ready on {shim.endpoint}").model_copy(
                update={"endpoint": shim.endpoint, "auth_token": token, "started_at": time.time()}
            )
        if e.state == EngineState.STOPPING:
            self.shims.pop(e.id, None)
            if e.id in self._stacks:
                await self._stacks.pop(e.id).aclose()
            return e.transition(EngineState.STOPPED, "fake node stopped it")
        return None
