"""The Python API the notebook (and scripts) use: `connect()`, `Cluster`, `Deployment`.

A `Cluster` is a handle on the kernel's hosted services (`runtime.HostedServices`: store client,
controller, optional worker, gateway) plus a watch-fed `ClusterView`. Every method is synchronous
for the caller and runs its coroutine on the runtime loop with a timeout. The magics in `nb/` call
only this module. Writes follow the record protocol: the notebook writes `deployments/{name}` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import specs
from ..config import jupyter_env
from ..control import specfile
from ..defaults import effective, placed_device
from ..engine import policy
from ..errors import DeepInferError, DeploymentError, EngineUnavailableError
from ..hub import preflight
from ..models import (
    NAME_PATTERN,
    DeploymentSpec,
    Engine,
    EngineSettings,
    EngineState,
    Placement,
    decode,
)
from ..store import keys
from ..store.activity import record_request
from . import runtime as rt
from . import urls
from .view import ClusterView, Snapshot, may_download, stage_of, status_of

if TYPE_CHECKING:
    import pandas as pd

CALL_TIMEOUT_S = 60.0
NOFIT_PATIENCE_S = 8.0
"""How long `deploy(wait=True)` lets an engine stay unplaceable before it explains and gives up."""

ProgressFn = Callable[[str, float, list[Engine]], None]
"""progress(stage, elapsed_s, engines) — called whenever the engines of a deployment change."""

SPEC_FIELDS = {
    "engine",
    "served_model_name",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "max_model_len",
    "dtype",
    "enforce_eager",
    "task",
    "tool_call_parser",
    "env",
    "max_restarts",
    "idle_timeout",
}
NOTEBOOK = "notebook"
"""Who the audit fields of deployment records name for writes made from a kernel."""


def connect(
    store: str = "memory://",
    *,
    gateway_port: int | None = 8082,
    gateway_host: str = "127.0.0.1",
    worker: bool = True,
    node_id: str | None = None,
    settings: Any = None,
    timeout: float = 60.0,
) -> Cluster:
    """Connect to (or start, for `memory://`) a cluster and host its services in this kernel.

    `gateway_port=None` runs no gateway, 0 picks a free port. `worker=False` hosts no worker
    (engines then run on remote `deepinfer-nb worker` processes). Connecting twice with the same
    store reuses the running services.
    """
    runtime = rt.get_runtime()
    hosted = rt.HostedServices.current()
    if hosted is not None and store not in (hosted.store_url, hosted.requested_store):
        raise DeepInferError(
            f"this kernel is connected to {hosted.store_url}; shut it down first "
            "(%deepinfer down / cluster.shutdown())"
        )
    if hosted is None:
        hosted = rt.HostedServices(
            store_url=store,
            settings=settings,
            node_id=node_id,
            with_worker=worker,
            gateway_port=gateway_port,
            gateway_host=gateway_host,
        )
        runtime.run(hosted.start(), timeout=timeout)
    else:
        runtime.run(hosted.ensure(with_worker=worker, gateway_port=gateway_port), timeout=timeout)
    return Cluster(hosted, runtime)


def default_name(model: str) -> str:
    """A deployment name from a model id or path: its last component, lowercased and cleaned."""
    base = model.rstrip("/").rsplit("/", 1)[-1].lower()
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-._")[:63].strip("-._")
    return base or "model"


def build_spec(
    model: str,
    *,
    name: str | None,
    gpus: int,
    replicas: int,
    device: str,
    engine_args: dict[str, Any],
) -> DeploymentSpec:
    """The DeploymentSpec for a `deploy()` call; unknown keyword args become vLLM CLI flags."""
    name = name or default_name(model)
    if not re.match(NAME_PATTERN, name):
        raise DeploymentError(
            f"invalid deployment name {name!r}: use lowercase letters, digits, "
            "'-', '.', '_' (at most 63)"
        )
    fields: dict[str, Any] = {}
    extra: list[str] = list(engine_args.pop("extra_args", []) or [])
    for key, value in engine_args.items():
        if key in SPEC_FIELDS:
            fields[key] = {**fields.get("env", {}), **value} if key == "env" else value
        elif key == "placement":
            fields[key] = value if isinstance(value, Placement) else Placement(**value)
        elif value is True:
            extra.append("--" + key.replace("_", "-"))
        elif value is not False and value is not None:
            extra += ["--" + key.replace("_", "-"), str(value)]
    if gpus > 1:
        fields["tensor_parallel_size"] = gpus
    if gpus > 0 and device == "auto":
        device = "cuda"
    try:
        return DeploymentSpec(
            name=name, model=model, replicas=replicas, device=device, engine_args=extra, **fields
        )
    except ValueError as exc:
        raise DeploymentError(f"invalid deployment: {exc}") from None


class Cluster:
    """A handle on the cluster this kernel is connected to."""

    def __init__(self, hosted: rt.HostedServices, runtime: rt.Runtime) -> None:
        self._hosted = hosted
        self._runtime = runtime
        self._closed = False
        self.public_url = ""
        """The gateway's address for browsers and external clients (may hold `{port}`); ""
        = the `[server] public_url` setting, else found out (client/urls.py)."""
        # read once here, so reprs do no I/O
        self._jupyter = urls.find_jupyter_server(
            jupyter_env(), connection_file=urls.kernel_connection_file()
        )

    # ---- plumbing ----

    @property
    def view(self) -> ClusterView:
        return self._hosted.view

    @property
    def runtime(self) -> rt.Runtime:
        return self._runtime

    @property
    def store_url(self) -> str:
        return self._hosted.store_url

    @property
    def node_id(self) -> str | None:
        """The in-kernel worker's node id (None without one)."""
        return self._hosted.node_id if self._hosted.worker is not None else None

    @property
    def gateway_url(self) -> str | None:
        """Base URL of the in-kernel gateway as seen from this machine (None without one)."""
        return self._hosted.gateway_url

    @property
    def api_key(self) -> str:
        """The admin key this kernel uses with its gateway ("" without keys)."""
        return self._hosted.api_key

    def client_key(self) -> tuple[str, str]:
        """(environment variable, comment) naming the key an external client should use: an
        inference key when one is configured, else one said to be able to deploy too."""
        from ..gateway.security import client_key_hint

        return client_key_hint(self._hosted.api_keys)

    @property
    def gateway_port(self) -> int | None:
        """The in-kernel gateway's port (None without one)."""
        return self._hosted.gateway_port

    def gateway_access(self, audience: urls.Audience = "kernel") -> urls.GatewayAccess:
        """The gateway's address for `audience` (kernel, browser or external) and the auth it
        needs: the one place every link, snippet and client takes its URL from."""
        port, url = self._hosted.gateway_port, self._hosted.gateway_url
        if port is None or url is None:
            raise DeepInferError("no gateway runs in this kernel: %deepinfer gateway start")
        return urls.gateway_access(
            audience,
            port=port,
            host=urlsplit(url).hostname or "127.0.0.1",
            public_url=self.public_url or self._hosted.settings.server.public_url,
            server=self._jupyter,
            keys=self._hosted.api_keys,
        )

    @property
    def browser_url(self) -> str | None:
        """The gateway link for the user's browser (None without a gateway)."""
        return self.gateway_access("browser").url if self.gateway_port is not None else None

    def uses_store(self, store: str) -> bool:
        """Whether this cluster runs on `store` (as connected, or as resolved: etcd://local)."""
        return store in (self._hosted.store_url, self._hosted.requested_store)

    def start_gateway(self, port: int) -> None:
        """Start the in-kernel gateway on `port` (0: a free one) unless one runs."""
        if self._hosted.gateway_port is None:
            self.run(self._hosted.start_gateway(port))

    def stop_gateway(self) -> None:
        self.run(self._hosted.stop_gateway())

    async def engine_metrics(self, engine: Engine) -> Any:
        """One engine's GetMetrics reply (a coroutine for the runtime loop)."""
        return await self._hosted.metrics(engine)

    def last_ttft(self, engine_id: str) -> float | None:
        """Time to first token of this kernel's last chat with the engine, in seconds."""
        return self._hosted.last_ttft.get(engine_id)

    @property
    def connected(self) -> bool:
        return self._hosted.started and not self._closed

    def snapshot(self) -> Snapshot:
        return self.view.snapshot()

    def run(self, coro: Any, *, timeout: float | None = CALL_TIMEOUT_S) -> Any:
        if self._closed:
            coro.close()
            raise DeepInferError("this Cluster handle is closed: deepinfer_nb.connect() again")
        if not self._hosted.started:
            coro.close()
            raise DeepInferError("not connected: run %deepinfer up (or deepinfer_nb.connect())")
        return self._runtime.run(coro, timeout=timeout)

    # ---- deployments ----

    def deploy(
        self,
        model: str,
        *,
        name: str | None = None,
        gpus: int = 0,
        replicas: int = 1,
        device: str = "auto",
        wait: bool = False,
        timeout: float = 900.0,
        progress: ProgressFn | None = None,
        **engine_args: Any,
    ) -> Deployment:
        """Create the deployment (or return the existing one of that name: idempotent).

        `idle_timeout="15m"` (or seconds) scales it to zero after that long without requests;
        the next request (gateway or chat) starts an engine again and waits for it."""
        spec = build_spec(
            model, name=name, gpus=gpus, replicas=replicas, device=device, engine_args=engine_args
        )
        try:  # the workers enforce it anyway: say so now, as the gateway's 422 does
            policy.check(spec, policy.LaunchPolicy.from_settings(self._hosted.settings.agent))
        except policy.PolicyError as exc:
            raise DeploymentError(str(exc)) from None
        spec = self._preflight(spec)
        spec = spec.model_copy(update={"created_by": NOTEBOOK, "updated_by": NOTEBOOK})
        change = self.run(self._apply(spec))
        self._hosted.created.add(spec.name)
        dep = Deployment(self, spec.name, change=change)
        if wait and change == "updated":
            dep.wait_rollout(timeout=timeout)
        elif wait:
            dep.wait(timeout=timeout, progress=progress)
        return dep

    def _preflight(self, spec: DeploymentSpec) -> DeploymentSpec:
        """The spec with the model's size facts, or a DeploymentError saying why no node can
        run it (the same check as POST /v1/deployments)."""
        existing = self.snapshot().deployments.get(spec.name)
        if existing is not None and specs.same_model(existing, spec) and existing.facts is not None:
            # re-running a deploy cell: the model was checked when it was written
            return spec.model_copy(update={"facts": existing.facts})
        return self._checked(spec)

    def _checked(self, spec: DeploymentSpec) -> DeploymentSpec:
        hub = preflight.Hub.of(self._hosted.settings.agent)
        result = preflight.run(spec, self.snapshot().nodes.values(), hub=hub)
        if result.problems:
            raise DeploymentError(f"cannot deploy {spec.model}: " + "; and ".join(result.problems))
        return result.spec

    async def _apply(self, spec: DeploymentSpec) -> str:
        """Create the deployment or change it to `spec` (its engines roll): "created",
        "updated" or "unchanged"."""
        store, key = self._hosted.store, keys.deployment(spec.name)
        while True:
            if await store.create(key, spec.encode()):
                return "created"
            kv = await store.get(key)
            if kv is None:
                continue
            current = decode(DeploymentSpec, key, kv.value)
            if current.model != spec.model:
                raise DeploymentError(
                    f"deployment {spec.name!r} already serves {current.model!r}; "
                    f"pick another --name or remove it first (%deepinfer rm {spec.name})"
                )
            updated = specs.change(current, spec)
            if updated is None:
                return "unchanged"
            if (await store.compare_and_swap(kv, updated.encode())).succeeded:
                return "updated"

    async def _modify(
        self, name: str, fn: Callable[[DeploymentSpec], DeploymentSpec | None]
    ) -> DeploymentSpec:
        store, key = self._hosted.store, keys.deployment(name)
        while True:
            kv = await store.get(key)
            if kv is None:
                raise DeploymentError(f"no deployment named {name!r}")
            spec = decode(DeploymentSpec, key, kv.value)
            updated = fn(spec)
            if updated is None:
                return spec
            if not specs.same_model(spec, updated):  # a rollback to another model: its facts
                updated = await asyncio.to_thread(self._checked, updated)
            if (await store.compare_and_swap(kv, updated.encode())).succeeded:
                return updated

    def may_download(self, spec: DeploymentSpec) -> bool:
        """Whether a worker may download the model of `spec` before starting it (progress
        displays list the Downloading stage only then)."""
        return may_download(spec.model, spec.revision, self._hosted.settings.agent)

    def export(self) -> str:
        """Every deployment as a YAML file `deepinfer-nb apply -f` accepts (env values masked:
        applying the file keeps them)."""
        return specfile.dump(self.snapshot().deployments.values())

    def deployment(self, name: str) -> Deployment:
        """The handle of an existing deployment."""
        if name not in self.snapshot().deployments:
            known = ", ".join(sorted(self.snapshot().deployments)) or "none"
            raise DeploymentError(f"no deployment named {name!r} (deployments: {known})")
        return Deployment(self, name)

    def deployments(self) -> list[Deployment]:
        return [Deployment(self, n) for n in sorted(self.snapshot().deployments)]

    async def set_replicas_async(self, name: str, replicas: int) -> None:
        """Set a deployment's replica count (a coroutine for the runtime loop)."""
        store, key = self._hosted.store, keys.deployment(name)
        while True:
            kv = await store.get(key)
            if kv is None:
                raise DeploymentError(f"no deployment named {name!r}")
            spec = decode(DeploymentSpec, key, kv.value)
            updated = spec.model_copy(update={"replicas": replicas, "updated_by": NOTEBOOK})
            if (await store.compare_and_swap(kv, updated.encode())).succeeded:
                return

    async def wake_async(self, name: str, *, timeout: float) -> None:
        """Wake a deployment scaled to zero and wait until an engine of it runs (a coroutine for
        the runtime loop)."""
        await record_request(self._hosted.store, name, time.time(), wake=True)

        def ready(snap: Snapshot) -> bool:
            if name not in snap.deployments:
                raise DeploymentError(f"deployment {name!r} was removed while waking it")
            return any(e.state is EngineState.RUNNING for e in snap.engines_of(name))

        try:
            await asyncio.wait_for(self.view.wait_for(ready, poll_s=0.5), timeout)
        except asyncio.TimeoutError:
            raise DeploymentError(
                f"{name} was scaled to zero and is not Running {timeout:g} s after a chat woke "
                f"it; see %deepinfer status {name}"
            ) from None

    def note_request(self, name: str) -> None:
        """Tell the store a request reached `name` (chats go to the engine, not through a
        gateway that would): only for deployments with an idle_timeout, in the background."""
        spec = self.snapshot().deployments.get(name)
        if spec is not None and spec.idle_timeout is not None:
            self._runtime.submit(record_request(self._hosted.store, name, time.time()))

    async def delete_async(self, name: str, *, wait_s: float) -> bool:
        """Delete a deployment, waiting up to `wait_s` for its engines to go (a coroutine for the
        runtime loop); whether it existed."""
        existed = await self._hosted.store.delete(keys.deployment(name))
        await self._hosted.store.delete(keys.activity(name))  # a new one of the name starts awake
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.view.wait_for(lambda s: not s.engines_of(name)), wait_s)
        return existed

    # ---- tables ----

    def engines(self) -> pd.DataFrame:
        """One row per engine: state, node, devices, endpoint, restarts, uptime, error."""
        from .render import engines_frame

        return engines_frame(self.snapshot())

    def gpus(self) -> pd.DataFrame:
        """One row per node and GPU (a row saying why for nodes without an NVIDIA GPU)."""
        from .render import gpus_frame

        return gpus_frame(self.snapshot())

    def logs(self, engine_id: str, *, lines: int = 100) -> str:
        return str(self.run(self._hosted.logs(engine_id, lines)))

    # ---- lifecycle ----

    def close(self) -> None:
        """Detach this handle; the kernel's services keep running (connect() reuses them)."""
        self._closed = True

    def shutdown(self, *, timeout: float = 120.0) -> None:
        """Stop everything this kernel started: its deployments, engines, worker, gateway."""
        if self._hosted.started:
            self._runtime.run(self._hosted.shutdown(grace_s=timeout * 0.75), timeout=timeout)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- reprs (no I/O: the view is a local mirror) ----

    def __repr__(self) -> str:
        from .render import cluster_text

        return cluster_text(self)

    def _repr_html_(self) -> str:
        from .render import cluster_html

        return cluster_html(self)


class Deployment:
    """A handle on one deployment; reads come from the cluster view, writes go to the store."""

    def __init__(self, cluster: Cluster, name: str, *, change: str = "") -> None:
        self.cluster = cluster
        self.name = name
        self.change = change
        """What the `deploy()` that made this handle did: created, updated or unchanged."""
        self.history: list[dict[str, str]] = []
        self._rr = itertools.count()

    # ---- state ----

    @property
    def spec(self) -> DeploymentSpec | None:
        return self.cluster.snapshot().deployments.get(self.name)

    @property
    def engines(self) -> list[Engine]:
        return self.cluster.snapshot().engines_of(self.name)

    @property
    def status(self) -> str:
        """ "Running 2/2", "Starting 0/1", "Failed 0/1: <error>", "Removed"."""
        return status_of(self.cluster.snapshot(), self.name)

    @property
    def model_name(self) -> str:
        spec = self.spec
        return spec.model_name if spec else self.name

    @property
    def settings(self) -> EngineSettings | None:
        """The effective engine settings (dtype, eager or compiled, context length): a launched
        engine's, else what the device defaults give; the same as the HTTP API's `effective`."""
        snap = self.cluster.snapshot()
        spec = snap.deployments.get(self.name)
        if spec is None:
            return None
        launched = specs.current_settings(spec, snap.engines_of(self.name))
        if launched is not None:
            return launched
        any_gpu = any(n.gpus for n in snap.nodes.values())
        return effective(spec, placed_device(spec, any_gpu=any_gpu))

    def wait(
        self, *, timeout: float = 900.0, progress: ProgressFn | None = None, poll_s: float = 0.2
    ) -> Deployment:
        """Block until every replica runs; `progress` sees each stage with the elapsed time.

        Polls the local mirror from the calling thread (no store I/O), so progress callbacks
        run on the caller's thread and a KeyboardInterrupt simply ends the wait."""
        waiter = Waiter(self.name, progress)
        deadline = time.monotonic() + timeout
        while not waiter(self.cluster.snapshot()):
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{self.name} is not Running after {timeout:g} s ({self.status}); "
                    f"see %deepinfer logs {self.name}"
                )
            time.sleep(poll_s)
        return self

    @property
    def rollout_status(self) -> dict[str, Any]:
        """The rollout's state (complete | progressing | halted), replicas updated, reason."""
        spec = self.spec
        if spec is None:
            raise DeploymentError(f"deployment {self.name!r} was removed")
        return specs.status(spec, self.engines)

    def wait_rollout(self, *, timeout: float = 900.0, poll_s: float = 0.5) -> Deployment:
        """Block until every replica runs the current settings; a halted rollout raises."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.rollout_status
            running = sum(e.state is EngineState.RUNNING for e in self.engines)
            if state["state"] == "complete" and self.spec and running >= self.spec.replicas:
                return self
            if state["state"] == "halted":
                raise DeploymentError(f"{self.name}: rollout halted: {state['reason']}")
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{self.name}: rollout not done after {timeout:g} s "
                    f"({state['updated']}/{state['replicas']} updated); "
                    f"see %deepinfer status {self.name}"
                )
            time.sleep(poll_s)

    # ---- changes ----

    def rollback(self) -> Deployment:
        """Return to the engine settings before the last change (the engines roll)."""

        def back(spec: DeploymentSpec) -> DeploymentSpec:
            previous = specs.rolled_back(spec)
            if previous is None:
                raise DeploymentError(f"{self.name} has no earlier settings to roll back to")
            return previous

        self.cluster.run(self.cluster._modify(self.name, back))
        return self

    def restart(self) -> Deployment:
        """Replace every engine, one at a time, each new one Running before an old one stops."""
        self.cluster.run(self.cluster._modify(self.name, specs.restarted))
        return self

    def scale(self, replicas: int, *, wait: bool = False, timeout: float = 900.0) -> Deployment:
        if replicas < 0:
            raise DeploymentError("replicas must be >= 0")
        self.cluster.run(self.cluster.set_replicas_async(self.name, replicas))
        if wait and replicas > 0:
            self.wait(timeout=timeout)
        return self

    def stop(self, *, wait_s: float = 60.0) -> bool:
        """Delete the deployment; its engines stop. True if it existed."""
        existed = bool(
            self.cluster.run(
                self.cluster.delete_async(self.name, wait_s=wait_s), timeout=wait_s + 10
            )
        )
        self.cluster._hosted.created.discard(self.name)
        return existed

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, *, lines: int = 100) -> str:
        """The last `lines` lines of each engine's log (engines on this kernel's worker)."""
        parts = []
        for e in self.engines:
            parts.append(f"==> {e.id} ({e.state.value} on {e.node or '-'}) <==")
            parts.append(self.cluster.logs(e.id, lines=lines).rstrip())
        return "\n".join(parts) if parts else f"{self.name}: no engines yet"

    # ---- chat ----

    def _running(self) -> list[Engine]:
        return [
            e
            for e in self.engines
            if e.state is EngineState.RUNNING and e.endpoint and e.auth_token
        ]

    def _pick(self, *, timeout: float) -> Engine:
        """A Running engine; one scaled to zero is woken first and waited for (as the gateway
        holds its requests)."""
        if not self._running() and self.cluster.snapshot().is_idle(self.name):
            self.cluster.run(self.cluster.wake_async(self.name, timeout=timeout), timeout=None)
        running = self._running()
        if not running:
            raise EngineUnavailableError(
                f"{self.name} has no Running engine ({self.status}); "
                f"wait for it: %deepinfer status {self.name}"
            )
        return running[next(self._rr) % len(running)]

    def _messages(
        self, prompt: str | Sequence[dict[str, str]], system: str | None, remember: bool
    ) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        if system:
            msgs.append({"role": "system", "content": system})
        if remember:
            msgs += [m for m in self.history if m["role"] != "system" or not system]
        if isinstance(prompt, str):
            msgs.append({"role": "user", "content": prompt})
        else:
            msgs += [dict(m) for m in prompt]
        return msgs

    def chat(
        self,
        prompt: str | Sequence[dict[str, str]],
        *,
        system: str | None = None,
        max_tokens: int | None = 256,
        temperature: float | None = None,
        stream: bool = False,
        remember: bool = False,
        via: str = "engine",
        timeout: float = 300.0,
    ) -> Any:
        """Chat with the deployment. Returns a `ChatResult`, or with `stream=True` a `ChatStream`
        (iterate it for text deltas; its `.result` is set when it ends).

        `via="engine"` talks gRPC to a Running engine; `via="gateway"` goes through the
        OpenAI-compatible gateway. `remember=True` keeps a multi-turn history on this handle.
        """
        from .chat import ChatResult, ChatStream, build_request

        msgs = self._messages(prompt, system, remember)
        if via == "gateway":
            result = self._chat_gateway(msgs, max_tokens=max_tokens, temperature=temperature)
            if remember:
                self._remember(msgs, result.text)
            if stream:
                return ChatStream.finished(result)
            return result
        if via != "engine":
            raise DeepInferError("via must be 'engine' or 'gateway'")
        engine = self._pick(timeout=timeout)
        self.cluster.note_request(self.name)
        request = build_request(msgs, max_tokens=max_tokens, temperature=temperature)

        def done(result: ChatResult) -> None:
            self.cluster.note_request(self.name)  # a long answer is activity until its end
            if remember:
                self._remember(msgs, result.text)

        chat_stream = ChatStream(
            self.cluster.runtime,
            self.cluster._hosted.stream_chat(engine, request),
            timeout=timeout,
            on_done=done,
        )
        if stream:
            return chat_stream
        for _ in chat_stream:
            pass
        assert chat_stream.result is not None
        return chat_stream.result

    def _remember(self, msgs: list[dict[str, str]], answer: str) -> None:
        self.history = [*msgs, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        """Forget the multi-turn history."""
        self.history = []

    def _chat_gateway(
        self, msgs: list[dict[str, str]], *, max_tokens: int | None, temperature: float | None
    ) -> Any:
        from .chat import ChatResult

        client = self.openai_client()
        t0 = time.monotonic()
        kwargs: dict[str, Any] = {"model": self.model_name, "messages": msgs}
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if temperature is not None:
            kwargs["temperature"] = temperature
        resp = client.chat.completions.create(**kwargs)
        usage = resp.usage
        return ChatResult(
            text=resp.choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            elapsed_s=time.monotonic() - t0,
            ttft_s=0.0,
            finish_reason=resp.choices[0].finish_reason or "",
            engine="gateway",
        )

    def openai_client(self) -> Any:
        """An `openai.OpenAI` client pointed at the gateway (model name: `.model_name`)."""
        import openai

        access = self.cluster.gateway_access("kernel")
        return openai.OpenAI(base_url=access.api_base, api_key=self.cluster.api_key or "none")

    # ---- reprs (no I/O) ----

    def __repr__(self) -> str:
        from .render import deployment_text

        return deployment_text(self.cluster.snapshot(), self.name)

    def _repr_html_(self) -> str:
        from .render import deployment_html

        return deployment_html(self.cluster.snapshot(), self.name)


# ---- pure helpers (tested without a cluster)


class Waiter:
    """The `deploy --wait` check: True once all replicas run; raises with the next step when an
    engine failed or stayed unplaceable for NOFIT_PATIENCE_S; reports stage changes."""

    def __init__(
        self, name: str, progress: ProgressFn | None, *, command: str = "%deepinfer"
    ) -> None:
        self.name = name
        self.progress = progress
        self.command = command  # how hints name the next step: "%deepinfer" or "deepinfer-nb"
        self.start = time.monotonic()
        self._last: tuple[Any, ...] = ()
        self._nofit_since: float | None = None

    def __call__(self, snap: Snapshot) -> bool:
        spec = snap.deployments.get(self.name)
        if spec is None:
            raise DeploymentError(f"deployment {self.name!r} was removed while waiting")
        if snap.is_idle(self.name):
            return True  # scaled to zero: ready, its next request starts an engine
        engines = [e for e in snap.engines_of(self.name) if e.replica < spec.replicas]
        stage = stage_of(engines, spec.replicas)
        key = (stage, tuple((e.id, e.state, e.reason, e.node, e.download) for e in engines))
        if self.progress is not None and key != self._last:
            self.progress(stage, time.monotonic() - self.start, engines)
        self._last = key
        for e in engines:
            if e.state is EngineState.FAILED:
                raise DeploymentError(
                    failure_hint(self.name, e, spec.max_restarts, command=self.command)
                )
        stuck = [e for e in engines if e.state is EngineState.PENDING and e.reason]
        if stuck:
            self._nofit_since = self._nofit_since or time.monotonic()
            if time.monotonic() - self._nofit_since > NOFIT_PATIENCE_S:
                raise DeploymentError(nofit_hint(stuck[0].reason))
        else:
            self._nofit_since = None
        return sum(e.state is EngineState.RUNNING for e in engines) >= spec.replicas


def failure_hint(
    name: str, engine: Engine, max_restarts: int, *, command: str = "%deepinfer"
) -> str:
    cause = (engine.error or engine.reason or "no error recorded").strip().splitlines()[-1]
    if engine.permanent:
        retry = "no restart can fix this, so it will not be restarted"
    elif engine.restarts < max_restarts:
        retry = f"it restarts automatically ({engine.restarts}/{max_restarts})"
    else:
        retry = "it will not be restarted"
    return f"{engine.id} failed: {cause}; {retry}. See {command} logs {name}"


def nofit_hint(reason: str) -> str:
    low = reason.lower()
    if "--device" in low or "start one" in low:
        return reason  # the scheduler already names the next step
    if "gpu" in low:
        return f"{reason}; try --device cpu or a smaller model"
    if "no node" in low or "no worker" in low or "nodes" in low:
        return f"{reason}; start a worker (%deepinfer up, or `deepinfer-nb worker` on a host)"
    return f"cannot place the engine: {reason}"
