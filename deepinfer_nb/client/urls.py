"""Where the gateway is, for each audience, and what a caller must send to get in.

Three audiences see the in-kernel gateway at different addresses:

- `kernel`: code in this kernel (and anything on this machine) dials loopback.
- `browser`: the user's browser, which may be far away. In order: an explicit `public_url`
  (an SSH tunnel, an ingress); JupyterHub's `JUPYTERHUB_SERVICE_PREFIX` + `proxy/{port}/`; the
  Jupyter server that launched this kernel (its `jpserver-<pid>.json` names its base_url) +
  `proxy/{port}/` when jupyter-server-proxy is installed; else loopback (a browser on this
  machine). Proxy links are host-relative, so they work whatever name the browser uses.
- `external`: an openai client or curl elsewhere: the browser's route made absolute where it
  can be, with the auth it needs said plainly (the Jupyter token for the proxy, the gateway key
  for the gateway).

`gateway_access` is the one pure decision; `find_jupyter_server` is the only file reading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ..config import ApiKey, JupyterEnv
from ..snippets import JUPYTER_TOKEN_ENV

Audience = Literal["kernel", "browser", "external"]
AUDIENCES: tuple[Audience, ...] = ("kernel", "browser", "external")
LOOPBACK, PUBLIC, PROXY = "loopback", "public_url", "jupyter-server-proxy"


@dataclasses.dataclass(frozen=True)
class JupyterServer:
    """The notebook server in front of this kernel."""

    base_url: str
    """Its path prefix, with slashes at both ends ("/", "/user/alice/")."""
    url: str = ""
    """Its absolute address ending in base_url; "" when unknown (a hub that does not publish it)."""
    hub: bool = False
    proxy: bool = True
    """Whether jupyter-server-proxy is installed (so `{base_url}proxy/{port}/` answers)."""


@dataclasses.dataclass(frozen=True)
class GatewayAccess:
    """The gateway as one audience reaches it."""

    audience: Audience
    url: str
    """The gateway's root, ending in "/" (host-relative for a browser behind a proxy)."""
    route: str
    """loopback | public_url | jupyter-server-proxy"""
    auth: str
    """What a caller sends, in words ("" = nothing)."""
    key_env: str = ""
    """Environment variable a snippet reads the gateway key from ("" = no key)."""
    token_env: str = ""
    """Environment variable a snippet reads the Jupyter token from ("" = not behind Jupyter)."""
    note: str = ""
    """Why the route is not a better one (e.g. jupyter-server-proxy is missing)."""

    @property
    def api_base(self) -> str:
        """The OpenAI base URL (`.../v1`)."""
        return self.url + "v1"


def _slashed(prefix: str) -> str:
    return "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"


def gateway_access(
    audience: Audience,
    *,
    port: int,
    host: str = "127.0.0.1",
    public_url: str = "",
    server: JupyterServer | None = None,
    keys: Sequence[ApiKey] = (),
) -> GatewayAccess:
    """The gateway's address for `audience` and the auth it needs (pure: no I/O)."""
    if audience not in AUDIENCES:
        raise ValueError(f"audience must be one of {', '.join(AUDIENCES)}, not {audience!r}")
    from ..gateway.security import client_key_hint  # FastAPI only once a gateway runs

    key_env, key_note = client_key_hint(keys)
    local = f"http://{host}:{port}/"
    if audience == "kernel":
        auth = "the admin key (Cluster.api_key)" if keys else ""
        return GatewayAccess(audience, local, LOOPBACK, auth, key_env=key_env if keys else "")
    if public_url:
        url = public_url.format(port=port)
        url = url if url.endswith("/") else url + "/"
        auth = key_note or f"no gateway key; whatever guards {url} applies"
        return GatewayAccess(audience, url, PUBLIC, auth, key_env=key_env)
    if server is not None and server.proxy:
        return _proxied(audience, port=port, server=server, key_env=key_env, key_note=key_note)
    note = (
        "install jupyter-server-proxy (the `notebook` extra) where the notebook server runs to "
        "reach the gateway through it"
        if server is not None
        else ""
    )
    if audience == "browser":
        auth = "a browser cannot send the gateway key: use a client for /v1" if keys else ""
        return GatewayAccess(audience, local, LOOPBACK, auth, note=note)
    auth = "from this machine only (loopback)" + (f"; {key_note}" if key_note else "")
    return GatewayAccess(audience, local, LOOPBACK, auth, key_env=key_env, note=note)


def _proxied(
    audience: Audience, *, port: int, server: JupyterServer, key_env: str, key_note: str
) -> GatewayAccess:
    path = f"{_slashed(server.base_url)}proxy/{port}/"
    if audience == "browser":
        auth = "your notebook login"
        if key_env:
            auth += "; a browser cannot send the gateway key: use a client for /v1"
        return GatewayAccess(audience, path, PROXY, auth)
    parts = urlsplit(server.url)
    url = f"{parts.scheme}://{parts.netloc}{path}" if parts.netloc else path
    token = (
        "a JupyterHub API token (the hub's Token page)"
        if server.hub
        else "the Jupyter server's token (`jupyter server list` shows it)"
    )
    if key_env:
        auth = (
            f"{token} in the `token` query parameter (openai: default_query={{'token': ...}}), "
            f"and the gateway key as the API key: {key_note}"
        )
    else:
        auth = f"{token} as the API key (sent as `Authorization: Bearer <token>`)"
    note = "" if parts.netloc else "prefix the URL with your hub's address"
    return GatewayAccess(
        audience, url, PROXY, auth, key_env=key_env, token_env=JUPYTER_TOKEN_ENV, note=note
    )


# ---- finding the notebook server (the only I/O here) ------------------------------------------


def find_jupyter_server(env: JupyterEnv, *, connection_file: str = "") -> JupyterServer | None:
    """The notebook server that launched this kernel: JupyterHub from its service prefix, a
    plain Jupyter server from the `jpserver-<JPY_PARENT_PID>.json` it wrote into its runtime dir
    (next to this kernel's connection file); None outside Jupyter."""
    proxy = importlib.util.find_spec("jupyter_server_proxy") is not None
    if env.hub_prefix:
        prefix = _slashed(env.hub_prefix)
        return JupyterServer(base_url=prefix, url=env.hub_public_url, hub=True, proxy=proxy)
    if not env.parent_pid:
        return None
    for folder in _runtime_dirs(env, connection_file):
        path = Path(folder) / f"jpserver-{env.parent_pid}.json"
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("base_url"), str):
            base = _slashed(info["base_url"])
            return JupyterServer(base_url=base, url=str(info.get("url") or ""), proxy=proxy)
    return None


def _runtime_dirs(env: JupyterEnv, connection_file: str) -> list[str]:
    dirs = [str(Path(connection_file).parent)] if connection_file else []
    if env.runtime_dir:
        dirs.append(env.runtime_dir)
    with contextlib.suppress(ImportError):
        from jupyter_core.paths import jupyter_runtime_dir

        dirs.append(jupyter_runtime_dir())
    return list(dict.fromkeys(dirs))


def kernel_connection_file() -> str:
    """This kernel's connection file ("" outside an ipykernel)."""
    with contextlib.suppress(ImportError):
        from ipykernel.kernelapp import IPKernelApp

        if IPKernelApp.initialized():
            return str(IPKernelApp.instance().connection_file or "")
    return ""
