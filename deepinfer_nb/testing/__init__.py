"""Test doubles that ship with the package, for this project's tests and for users' own.

    with deepinfer_nb.testing.cluster() as c:
        dep = c.deploy("any-model", name="m", wait=True, timeout=60)
        assert "Paris" in dep.chat("Capital of France?").text
        openai.OpenAI(base_url=c.gateway_url + "/v1", api_key="-")  # the gateway works too

- `cluster()`: a whole cluster in this process, through the public `connect()`: the memory store,
  the controller, the OpenAI gateway on a free loopback port and a worker whose engines are real
  shim processes serving a `FakeBackend` (no vLLM, no model; an engine starts in about a second).
  A deployment's `env` configures its engines: DEEPINFER_FAKE_REPLY, _TOKEN_LATENCY_S, _LOAD_S,
  _TASK (generate | embed), _MAX_MODEL_LEN.
- `FakeBackend`: the `EngineBackend` contract with deterministic tokens, latency and failures.
- `running_shim()`: the real servicer over a backend on an in-process gRPC server.
- `FakeNode`, `fake_gpus()`: a fake fleet (nodes with GPUs that serve what is placed on them).
- `MemoryStore`: the embedded store (etcd's semantics, in memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import SchedulerSettings, Settings
from ..store.memory import MemoryStore
from .backend import ENV_NAMES, FakeBackend
from .fleet import FakeNode, fake_gpus
from .shim import InProcessShim, running_shim

if TYPE_CHECKING:
    from ..client.cluster import Cluster

__all__ = [
    "FakeBackend",
    "FakeNode",
    "InProcessShim",
    "MemoryStore",
    "cluster",
    "fake_engine_python",
    "fake_gpus",
    "running_shim",
]

FAST_SCHEDULER = SchedulerSettings(
    reconcile_interval_s=0.2, restart_backoff_s=0.2, restart_backoff_max_s=2.0, leader_ttl_s=2
)


def fake_engine_python(folder: Path, *, python: str = sys.executable) -> str:
    """An engine "python" for a worker (`engine_python`, `--engine-python`) that runs the shim
    over the FakeBackend where the worker asks for `-m deepinfer_nb.engine`, and is `python`
    for anything else (the launcher's parent-death guard)."""
    path = folder / "fake-engine-python"
    py = shlex.quote(python)
    path.write_text(
        "#!/bin/sh\n"
        "# deepinfer_nb.testing: engines of this worker serve the FakeBackend\n"
        'if [ "$1" = "-m" ] && [ "$2" = "deepinfer_nb.engine" ]; then\n'
        f'  shift 2; exec {py} -m deepinfer_nb.testing.shim "$@"\n'
        "fi\n"
        f'exec {py} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)


@contextlib.contextmanager
def cluster(*, settings: Settings | None = None, timeout: float = 60.0) -> Iterator[Cluster]:
    """A working in-process cluster on fake engines (see the module docstring); everything it
    started (engines included) is stopped when the block ends."""
    from ..client.cluster import connect

    settings = dataclasses.replace(settings) if settings is not None else Settings()
    if settings.scheduler == SchedulerSettings():  # defaults: react in tenths of a second
        settings.scheduler = dataclasses.replace(FAST_SCHEDULER)
    with tempfile.TemporaryDirectory(prefix="deepinfer-testing-") as tmp:
        settings.agent = dataclasses.replace(
            settings.agent,
            engine_python=fake_engine_python(Path(tmp)),
            # the launch policy admits the fake engine's settings (a deployment's `env`)
            allowed_env=[*settings.agent.allowed_env, *ENV_NAMES],
        )
        c = connect(
            "memory://",
            gateway_port=0,
            worker=True,
            node_id=f"testing-{uuid.uuid4().hex[:8]}",
            settings=settings,
            timeout=timeout,
        )
        try:
            yield c
        finally:
            c.shutdown(timeout=timeout)
