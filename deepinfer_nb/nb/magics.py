"""`%deepinfer` / `%%deepinfer`: the magics class, its settings and the subcommand dispatch.

Settings are traitlets (`%config DeepInferMagics.gateway_port = 8090`), also read from the user
file `<deepinfer home>/notebook.toml` ([magics] table). Every subcommand calls the Python API in
`cluster.py`; package errors become short `UsageError`s, raised so notebook runners fail the cell.
"""

from __future__ import annotations

import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.display import display
from traitlets import Bool, Float, Int, Unicode, observe
from traitlets.config import Configurable

from .. import errors as E
from ..client import cluster as api
from ..client import render
from ..client.view import stages
from ..models import EngineState
from . import parsing

CONFIG_FILE = "notebook.toml"

# The magics' boundary table: the next step a user can take, added to the error's own message
# (the nearest class of an error decides; most messages already say what to do).
_NEXT_STEP: dict[type[E.DeepInferError], str] = {
    E.StoreUnavailableError: "is the store running? %deepinfer doctor checks the set-up",
    E.RecordError: "the store holds a record this version cannot read; %deepinfer rm NAME "
    "removes a deployment",
    E.RuntimeTimeoutError: "the cluster is busy or stuck: run the cell again, or %deepinfer down",
}


def usage_error(exc: E.DeepInferError) -> UsageError:
    """The short, traceback-free error a cell shows for a package error."""
    step = next((_NEXT_STEP[c] for c in type(exc).__mro__ if c in _NEXT_STEP), "")
    return UsageError(f"{exc} ({step})" if step else str(exc))


@magics_class
class DeepInferMagics(Magics, Configurable):
    """Deploy and chat with LLMs from this notebook. `%deepinfer help` lists the subcommands."""

    store = Unicode("memory://", help="store for `up`: memory://, etcd (local) or etcd://H:P").tag(
        config=True
    )
    gateway_port = Int(8082, help="gateway port for `up` (0: a free port)").tag(config=True)
    gateway = Bool(True, help="run the OpenAI-compatible gateway in the kernel").tag(config=True)
    worker = Bool(True, help="run a worker (engines) in the kernel").tag(config=True)
    default_device = Unicode("auto", help="device for deploy when --device is not given").tag(
        config=True
    )
    wait_timeout = Float(900.0, help="seconds deploy --wait waits for Running").tag(config=True)
    chat_max_tokens = Int(256, help="default max tokens for %%deepinfer chat").tag(config=True)
    chat_temperature = Float(0.0, help="default temperature for %%deepinfer chat (0 = greedy)").tag(
        config=True
    )
    public_url = Unicode(
        "",
        help="the gateway's address for browsers and external clients (an SSH tunnel, an "
        "ingress; may hold {port}); '' = [server] public_url, else the notebook server's "
        "proxy (JupyterHub or Jupyter + jupyter-server-proxy), else loopback",
    ).tag(config=True)

    @observe("public_url")
    def _public_url_changed(self, change: Any) -> None:
        """A `%config` after `up` moves the links of the running cluster too."""
        cluster = getattr(self, "cluster", None)  # None until `up`; set while loading the user file
        if cluster is not None:
            cluster.public_url = change["new"]

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._load_user_file()
        self.cluster: api.Cluster | None = None
        self.handles: dict[str, api.Deployment] = {}
        self.monitors: list[Any] = []

    def _load_user_file(self) -> None:
        from ..config import home_dir, tomllib

        path = home_dir() / CONFIG_FILE
        if not path.is_file():
            return
        try:
            data = tomllib.loads(path.read_text()).get("magics", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{path}: {exc}") from None
        for key, value in data.items():
            if not self.has_trait(key):
                raise UsageError(f"{path}: unknown setting {key!r} in [magics]")
            setattr(self, key, value)

    # ---- entry point ----

    @no_var_expand
    @line_cell_magic
    def deepinfer(self, line: str, cell: str | None = None) -> Any:
        """Deploy and use LLMs. Run `%deepinfer help` for the subcommands."""
        cmd, ns = parsing.parse(line)
        if cell is not None and cmd != "chat":
            raise UsageError(f"%%deepinfer {cmd} takes no cell body; only %%deepinfer chat does")
        if cmd == "chat" and cell is None:
            raise UsageError(
                "chat is a cell magic: put `%%deepinfer chat NAME` on the first "
                "line and the prompt below it"
            )
        if cmd == "help":
            print(parsing.HELP)
            return None
        handler = getattr(self, "_cmd_" + cmd)
        try:
            return handler(ns, cell) if cmd == "chat" else handler(ns)
        except E.DeepInferError as exc:
            raise usage_error(exc) from None

    deepinfer.__doc__ = "Deploy and use LLMs from this notebook.\n\n" + parsing.HELP

    def _need(self) -> api.Cluster:
        if self.cluster is None or not self.cluster.connected:
            raise UsageError("not connected: run %deepinfer up first")
        return self.cluster

    def _dep(self, name: str) -> api.Deployment:
        cluster = self._need()
        if name not in cluster.snapshot().deployments:
            known = ", ".join(sorted(cluster.snapshot().deployments)) or "none"
            raise UsageError(
                f"no deployment named {name!r} (deployments: {known}); "
                f"create it with %deepinfer deploy MODEL --name {name}"
            )
        handle = self.handles.get(name)
        if handle is None or handle.cluster is not cluster:
            handle = self.handles[name] = api.Deployment(cluster, name)
        return handle

    # ---- cluster ----

    def _cmd_up(self, ns: Any) -> Any:
        store = ns.store or self.store
        port = ns.gateway_port if ns.gateway_port is not None else self.gateway_port
        if ns.no_gateway or not self.gateway:
            port = None
        current = self.cluster
        if current is not None and current.connected and current.uses_store(store):
            print("already up; reusing the running cluster")
        self.cluster = api.connect(
            store, gateway_port=port, worker=self.worker and not ns.no_worker, node_id=ns.node
        )
        self.cluster.public_url = self.public_url
        display(self.cluster)
        if self.cluster.gateway_url:
            display(self._link())
        return None

    def _link(self) -> Any:
        from .links import GatewayLink

        cluster = self._need()
        return GatewayLink(
            browser=cluster.gateway_access("browser"),
            external=cluster.gateway_access("external"),
            kernel=cluster.gateway_access("kernel"),
        )

    def _cmd_down(self, ns: Any) -> None:
        for monitor in self.monitors:
            from .widgets import close_quietly

            close_quietly(monitor)
        self.monitors.clear()
        if self.cluster is None:
            print("nothing to stop")
            return
        self.cluster.shutdown()
        self.cluster = None
        self.handles.clear()
        print("stopped: deployments, engines, worker and gateway of this kernel")

    def _cmd_gateway(self, ns: Any) -> Any:
        cluster = self._need()
        if ns.action == "stop":
            cluster.stop_gateway()
            print("gateway stopped")
            return None
        if ns.action == "start":
            cluster.start_gateway(ns.port if ns.port is not None else self.gateway_port)
        return self._link()

    def _cmd_snippet(self, ns: Any) -> Any:
        from ..snippets import snippet
        from .links import Snippet

        cluster = self._need()
        dep = self._dep(ns.name)
        access = cluster.gateway_access("external")
        code = snippet(
            lang=ns.lang,
            api_base=access.api_base,
            model=dep.model_name,
            key_env=access.key_env,
            key_note=cluster.client_key()[1],
            token_env=access.token_env,
        )
        return Snippet(code, ns.lang)

    def _cmd_doctor(self, ns: Any) -> Any:
        from ..client.doctor import run_checks

        return run_checks(self.cluster)

    # ---- deployments ----

    def _cmd_deploy(self, ns: Any) -> Any:
        cluster = self._need()
        device = ns.device or self.default_device
        kwargs: dict[str, Any] = {"extra_args": ns.extra} if ns.extra else {}
        if ns.engine:
            kwargs["engine"] = ns.engine
        if ns.task:
            kwargs["task"] = ns.task
        if ns.tool_call_parser:
            kwargs["tool_call_parser"] = ns.tool_call_parser
        if ns.idle_timeout:
            kwargs["idle_timeout"] = ns.idle_timeout
        dep = cluster.deploy(
            ns.model, name=ns.name, gpus=ns.gpus, replicas=ns.replicas, device=device, **kwargs
        )
        self.handles.setdefault(dep.name, dep)
        if dep.change != "created":
            print(f"{dep.name}: {dep.change}")  # a re-run with other arguments rolls the engines
        if ns.wait and dep.change == "updated":
            dep.wait_rollout(timeout=ns.timeout or self.wait_timeout)
        elif ns.wait:
            self._wait(dep, ns.timeout or self.wait_timeout)
        return self.handles[dep.name]

    def _wait(self, dep: api.Deployment, timeout: float) -> None:
        spec = dep.spec
        downloads = spec is not None and self._need().may_download(spec)
        order = stages(dep.engines, may_download=downloads)
        handle: Any = display(_Progress(dep.name, "Pending", 0.0, "", order), display_id=True)

        def progress(stage: str, elapsed: float, engines: list[Any]) -> None:
            nonlocal order
            order = stages(engines, may_download=downloads)
            where = ", ".join(f"{e.id} on {e.node}" for e in engines if e.node)
            fetching = [render.download_text(e.download) for e in engines if e.download]
            detail = "; ".join([*fetching, where])
            handle.update(_Progress(dep.name, stage, elapsed, detail, order))

        start = time.monotonic()
        dep.wait(timeout=timeout, progress=progress)
        handle.update(_Progress(dep.name, "Running", time.monotonic() - start, "ready", order))

    def _cmd_ls(self, ns: Any) -> Any:
        return EngineTable(self._need().snapshot())

    def _cmd_status(self, ns: Any) -> Any:
        if ns.name is None:
            return self._need()
        return self._dep(ns.name)

    def _cmd_logs(self, ns: Any) -> None:
        print(self._dep(ns.name).logs(lines=ns.lines))

    def _cmd_stop(self, ns: Any) -> None:
        self._dep(ns.name).stop()
        self.handles.pop(ns.name, None)
        print(f"{ns.name}: stopped and removed")

    _cmd_rm = _cmd_stop

    def _cmd_scale(self, ns: Any) -> Any:
        dep = self._dep(ns.name)
        dep.scale(ns.replicas)
        if ns.wait and ns.replicas > 0:
            self._wait(dep, self.wait_timeout)
        return dep

    def _cmd_rollback(self, ns: Any) -> Any:
        dep = self._dep(ns.name).rollback()
        print(f"{dep.name}: rolling back")
        if ns.wait:
            dep.wait_rollout(timeout=self.wait_timeout)
        return dep

    def _cmd_restart(self, ns: Any) -> Any:
        dep = self._dep(ns.name).restart()
        print(f"{dep.name}: rolling restart")
        if ns.wait:
            dep.wait_rollout(timeout=self.wait_timeout)
        return dep

    def _cmd_export(self, ns: Any) -> None:
        text = self._need().export()
        if ns.file is None:
            print(text, end="")
            return
        with open(ns.file, "w") as f:
            f.write(text)
        print(f"deployments written to {ns.file} (apply with: deepinfer-nb apply -f {ns.file})")

    def _cmd_gpus(self, ns: Any) -> Any:
        return GpuTable(self._need().snapshot())

    def _cmd_monitor(self, ns: Any) -> Any:
        from .widgets import EngineMonitor, GpuMonitor

        cluster = self._need()
        monitor: Any = GpuMonitor(cluster) if ns.gpus else EngineMonitor(cluster)
        self.monitors.append(monitor)
        return monitor

    # ---- chat ----

    def _cmd_chat(self, ns: Any, cell: str) -> Any:
        from .chat_cell import stream_chat

        prompt = cell.strip()
        if not prompt:
            raise UsageError("the chat cell is empty: write the prompt below the magic line")
        dep = self._dep(ns.name)
        if ns.new:
            dep.reset()
        max_tokens = ns.max_tokens or self.chat_max_tokens
        temperature = ns.temperature if ns.temperature is not None else self.chat_temperature
        stream_chat(dep, prompt, system=ns.system, max_tokens=max_tokens, temperature=temperature)
        return None


class _Progress:
    """`deploy --wait`'s progress line: the stage reached among `stages` (view.stages)."""

    def __init__(
        self, name: str, stage: str, elapsed: float, detail: str, stages: list[EngineState]
    ) -> None:
        self.name, self.stage, self.elapsed, self.detail = name, stage, elapsed, detail
        self.stages = stages

    def __repr__(self) -> str:
        return render.progress_text(self.name, self.stage, self.elapsed, self.stages, self.detail)

    def _repr_html_(self) -> str:
        import html

        marks = []
        reached = True
        for s in self.stages:
            marks.append(
                render.badge(s.value) if reached else f"<span style='color:#bbb'>{s.value}</span>"
            )
            if s.value == self.stage:
                reached = False
        return (
            f"<div><code>{html.escape(self.name)}</code> {' → '.join(marks)} · "
            f"{self.elapsed:.1f} s <span style='color:#888'>{html.escape(self.detail)}"
            "</span></div>"
        )


class EngineTable:
    """A snapshot of the engines (HTML with state colours, text, and `.df` as a DataFrame)."""

    def __init__(self, snap: Any) -> None:
        self.snap = snap

    @property
    def df(self) -> Any:
        return render.engines_frame(self.snap)

    def __repr__(self) -> str:
        return render.engines_text(self.snap)

    def _repr_html_(self) -> str:
        return render.engines_html(self.snap)


class GpuTable:
    """A snapshot of GPUs per node (or why a node has none)."""

    def __init__(self, snap: Any) -> None:
        self.snap = snap

    @property
    def df(self) -> Any:
        return render.gpus_frame(self.snap)

    def __repr__(self) -> str:
        return render.gpus_text(self.snap)

    def _repr_html_(self) -> str:
        return render.gpus_html(self.snap)
