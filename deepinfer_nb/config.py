"""Settings: defaults < TOML file < environment (DEEPINFER_*) < explicit flags.

The only module that reads `os.environ` for settings. Sections follow the original deepinfer
config (server, scheduler, agent, storage) plus `engine` and `paths`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "DEEPINFER_"


def home_dir() -> Path:
    """The user's deepinfer directory (models, logs, state, local etcd data)."""
    base = os.environ.get("DEEPINFER_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deepinfer-nb"
    )
    return Path(base)


@dataclasses.dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    """Gateway bind address. Anything but loopback requires an API key."""
    port: int = 8082
    api_key_env: str = ""
    """Name of the environment variable holding gateway API key(s) with BOTH scopes (admin and
    inference), comma-separated ("" = none). One key here keeps the single-key meaning."""
    admin_keys_env: str = ""
    """Variable holding named admin keys, `name:key,name:key` (deployments, cluster, metrics)."""
    inference_keys_env: str = ""
    """Variable holding named inference keys, `name:key,...` (OpenAI routes and /v1/models)."""
    keys_file: str = ""
    """TOML file of named keys: `[admin]` and `[inference]` tables of `name = "key"`."""
    metrics_open: bool = False
    """Serve /metrics without a key even when keys are configured."""
    metrics_interval_s: float = 5.0
    """Seconds between the gateway's polls of engine metrics (GetMetrics) and the store's metrics
    snapshots, and between each process's own snapshot writes (controller, worker, store)."""
    max_body_bytes: int = 4 * 1024 * 1024
    max_connections: int = 0
    """Most connections the gateway serves at once; more get 503 (0 = no limit)."""
    hold_timeout_s: float = 60.0
    """How long a request waits for a replica that is starting (a restart, a scale from zero,
    a rollout) before it gets 503 with Retry-After (0 = fail at once)."""
    max_held_requests: int = 256
    """Most requests waiting per deployment; more get 503 with Retry-After at once."""
    activity_interval_s: float = 5.0
    """How often (at most) the gateway reports a deployment's last request time to the store,
    for scale to zero (deployments with an idle_timeout only; a quarter of a shorter timeout)."""
    public_url: str = ""
    """The gateway's address for browsers and external clients when something in front of it
    (an SSH tunnel, an ingress) decides it; may contain `{port}`. "" = found out: the notebook
    server's proxy, else loopback (client/urls.py)."""


@dataclasses.dataclass
class SchedulerSettings:
    strategy: str = "spread"
    """spread | binpack | idle_first."""
    reconcile_interval_s: float = 2.0
    restart_backoff_s: float = 2.0
    restart_backoff_max_s: float = 60.0
    restart_reset_s: float = 600.0
    """An engine that fails after running this long starts its restart count (backoff and
    max_restarts budget) afresh: a crash loop is Failed for good, a crash a day is not."""
    leader_ttl_s: int = 5


@dataclasses.dataclass
class AgentSettings:
    heartbeat_ttl_s: int = 6
    """The node lease TTL; the worker refreshes it every TTL/3."""
    gpu_sample_interval_s: float = 3.0
    reconcile_interval_s: float = 2.0
    health_check_interval_s: float = 2.0
    health_check_failures: int = 3
    start_timeout_s: float = 600.0
    stop_grace_s: float = 20.0
    engine_python: str = ""
    """Python interpreter for engine processes ("" = this one)."""
    hub_cache: str = ""
    """Where the node keeps hub models ("" = huggingface_hub's cache: HF_HUB_CACHE, HF_HOME or
    ~/.cache/huggingface/hub), shared by every engine of the node."""
    hub_endpoint: str = ""
    """The hub to download from ("" = HF_ENDPOINT, else https://huggingface.co)."""
    model_dirs: list[str] = dataclasses.field(default_factory=list)
    """Launch policy: the only folders local model paths may resolve into ([] = <home>/models)."""
    allow_code_loading: bool = False
    """Launch policy: allow --trust-remote-code and other flags that load code from a model."""
    allowed_env: list[str] = dataclasses.field(default_factory=list)
    """Launch policy: extra environment variable names a deployment's `env` may set."""
    secrets_file: str = ""
    """`NAME=value` lines the worker resolves a deployment's `secrets` from (after its env)."""
    warm_pool: int = -1
    """Warm engine processes kept waiting for a vLLM CPU deployment (torch and vLLM imported):
    -1 = 1 on a node without GPUs, 0 with GPUs; 0 = none (control/warmpool.py)."""


@dataclasses.dataclass
class StorageSettings:
    backend: str = "memory"
    """memory | etcd."""
    endpoints: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1:2379"])
    etcd_ca_cert: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_user: str = ""
    etcd_password_env: str = ""

    @property
    def url(self) -> str:
        if self.backend == "memory":
            return "memory://"
        return "etcd://" + ",".join(self.endpoints)

    def use_url(self, url: str) -> None:
        """Point at `url` as a `--store` flag does: memory:// or etcd://HOST:PORT[,HOST:PORT]."""
        scheme, sep, rest = url.partition("://")
        if scheme == "memory" and sep:
            self.backend = "memory"
        elif scheme == "etcd" and sep and rest.strip("/"):
            self.backend = "etcd"
            self.endpoints = [e.strip() for e in rest.strip("/").split(",") if e.strip()]
        else:
            raise ConfigError(f"--store {url!r}: use memory:// or etcd://HOST:PORT[,HOST:PORT]")

    def store_options(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """Keyword options for `store.open_store` (TLS files, user, password from its env var)."""
        env = dict(os.environ) if env is None else env
        opts = {
            "etcd_ca_cert": self.etcd_ca_cert,
            "etcd_cert": self.etcd_cert,
            "etcd_key": self.etcd_key,
            "etcd_user": self.etcd_user,
        }
        if self.etcd_password_env:
            if self.etcd_password_env not in env:
                raise ConfigError(
                    f"[storage] etcd_password_env names {self.etcd_password_env}, which is not set"
                )
            opts["etcd_password"] = env[self.etcd_password_env]
        return {k: v for k, v in opts.items() if v} if self.backend == "etcd" else {}


@dataclasses.dataclass(frozen=True)
class Alias:
    """A key of the original deepinfer's config that means one of ours (same section)."""

    key: str
    factor: int = 1
    why: str = ""


ALIASES: dict[tuple[str, str], Alias] = {
    ("scheduler", "reconcile_interval_secs"): Alias("reconcile_interval_s"),
    ("scheduler", "placement_strategy"): Alias("strategy"),
    ("agent", "heartbeat_interval_secs"): Alias(
        "heartbeat_ttl_s", 3, "the node lease is refreshed every TTL/3"
    ),
    ("agent", "reconcile_interval_secs"): Alias("reconcile_interval_s"),
    ("agent", "health_check_interval_secs"): Alias("health_check_interval_s"),
    ("storage", "etcd_endpoints"): Alias("endpoints"),
}
"""The original deepinfer's key names, read as ours with a one-line note."""


@dataclasses.dataclass
class Settings:
    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    scheduler: SchedulerSettings = dataclasses.field(default_factory=SchedulerSettings)
    agent: AgentSettings = dataclasses.field(default_factory=AgentSettings)
    storage: StorageSettings = dataclasses.field(default_factory=StorageSettings)
    notes: list[str] = dataclasses.field(default_factory=list, compare=False, repr=False)
    """One line per original-deepinfer key that was read as ours (the CLI prints them)."""

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None
    ) -> Settings:
        """Defaults, then the TOML file (if given), then DEEPINFER_SECTION__KEY variables."""
        settings = cls()
        if path is not None:
            settings._apply_file(Path(path))
        settings._apply_env(os.environ if env is None else env)
        return settings

    def _apply_file(self, path: Path) -> None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            for key, value in values.items():
                self.set(
                    section,
                    key,
                    value,
                    source=f"{path}: {section}.{key}" + _line_hint(text, section, key),
                )

    def _apply_env(self, env: Any) -> None:
        for name, raw in env.items():
            if not name.startswith(ENV_PREFIX) or "__" not in name:
                continue
            section, key = name[len(ENV_PREFIX) :].lower().split("__", 1)
            self.set(section, key, raw, source=f"environment {name}")

    def set(self, section: str, key: str, value: Any, *, source: str) -> None:
        """Set one field, type-checked against its default; errors name `source`."""
        alias = ALIASES.get((section, key))
        if alias is not None:
            value = _scaled(value, alias.factor, source)
            why = f" ({alias.why})" if alias.why else ""
            self.notes.append(
                f"{source}: the original deepinfer's {key}; read as "
                f"[{section}] {alias.key} = {value!r}{why}"
            )
            key = alias.key
        group = getattr(self, section, None)
        if group is None or not dataclasses.is_dataclass(group):
            raise ConfigError(f"{source}: unknown section [{section}]")
        fields = {f.name: f for f in dataclasses.fields(group)}
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key {key!r} in [{section}] (known: {known})")
        current = getattr(group, key)
        setattr(group, key, _coerce(current, value, source))


def _scaled(value: Any, factor: int, source: str) -> Any:
    if factor == 1:
        return value
    try:
        return int(value) * factor
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: expected a whole number, got {value!r}") from None


def _coerce(current: Any, value: Any, source: str) -> Any:
    kind = type(current)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list):
                return [str(v) for v in value]
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: expected {kind.__name__}, got {value!r}") from None


def _line_hint(text: str, section: str, key: str) -> str:
    """The " (line N)" of `key` inside `[section]` (keys repeat across sections)."""
    current = ""
    key_line = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        header = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1).strip("\"'")
        elif current == section and key_line.match(line):
            return f" (line {number})"
    return ""


@dataclasses.dataclass(frozen=True)
class HubAccess:
    """How this process reaches the Hugging Face Hub, from the standard HF_* variables."""

    endpoint: str
    token: str | None
    """HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN): read where the download runs and never
    written anywhere else."""
    offline: bool


def hub_access(env: Mapping[str, str] | None = None, *, endpoint: str = "") -> HubAccess:
    """The hub settings of this process; `endpoint` (a setting) wins over HF_ENDPOINT."""
    env = os.environ if env is None else env
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    url = endpoint or env.get("HF_ENDPOINT") or "https://huggingface.co"
    return HubAccess(endpoint=url.rstrip("/"), token=token, offline=offline)


@dataclasses.dataclass(frozen=True)
class JupyterEnv:
    """What a kernel's environment says about the notebook server that started it."""

    hub_prefix: str
    """JUPYTERHUB_SERVICE_PREFIX: the single-user server's prefix on a JupyterHub ("" if none)."""
    hub_public_url: str
    """JUPYTERHUB_PUBLIC_URL: this single-user server's public address (e.g.
    https://hub.example.org/user/alice/), set when the hub's `public_url` is configured."""
    parent_pid: int
    """JPY_PARENT_PID: the Jupyter server that launched this kernel (0 if none)."""
    runtime_dir: str
    """JUPYTER_RUNTIME_DIR: where servers write `jpserver-<pid>.json` ("" = Jupyter's default)."""


def jupyter_env(env: Mapping[str, str] | None = None) -> JupyterEnv:
    env = os.environ if env is None else env
    pid = env.get("JPY_PARENT_PID", "").strip()
    return JupyterEnv(
        hub_prefix=env.get("JUPYTERHUB_SERVICE_PREFIX", ""),
        hub_public_url=env.get("JUPYTERHUB_PUBLIC_URL", ""),
        parent_pid=int(pid) if pid.isdigit() else 0,
        runtime_dir=env.get("JUPYTER_RUNTIME_DIR", ""),
    )


def default_config_path() -> Path:
    """The shipped `configs/default.toml` (every setting at its default, with comments)."""
    return Path(__file__).parent / "configs" / "default.toml"


def read_api_keys(var: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The gateway API keys held in environment variable `var` (comma-separated); none if `var`
    is "". A named variable that is unset or empty is an error, never silently "no auth"."""
    if not var:
        return []
    value = (os.environ if env is None else env).get(var, "")
    keys = [k.strip() for k in value.split(",") if k.strip()]
    if not keys:
        raise ConfigError(
            f"API key variable {var} is not set (or empty): "
            f"export {var}=<key> before starting the gateway"
        )
    return keys


ADMIN = "admin"
INFERENCE = "inference"
BOTH_SCOPES = frozenset({ADMIN, INFERENCE})


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """One gateway key: its name (what logs and deployment records say acted), the secret and
    the scopes it grants (an admin key can also do everything an inference key can)."""

    name: str
    secret: str = dataclasses.field(repr=False)
    scopes: frozenset[str] = BOTH_SCOPES
    source: str = ""
    """Where it was configured: the environment variable's name, or the keys file."""


def read_keys(server: ServerSettings, env: Mapping[str, str] | None = None) -> list[ApiKey]:
    """Every gateway key `server` configures: `api_key_env` (both scopes, named api-key,
    api-key-2, ...), `admin_keys_env` and `inference_keys_env` (`name:key` entries) and
    `keys_file`. Names must be unique; a named variable that is unset is an error."""
    env = os.environ if env is None else env
    legacy = read_api_keys(server.api_key_env, env)
    out = [
        ApiKey("api-key" if i == 0 else f"api-key-{i + 1}", k, BOTH_SCOPES, server.api_key_env)
        for i, k in enumerate(legacy)
    ]
    for var, scope in ((server.admin_keys_env, ADMIN), (server.inference_keys_env, INFERENCE)):
        for name, secret in _named_entries(var, env):
            out.append(ApiKey(name, secret, _scopes(scope), var))
    if server.keys_file:
        out += _keys_from_file(Path(server.keys_file).expanduser())
    seen: set[str] = set()
    for key in out:
        if key.name in seen:
            raise ConfigError(f"API key name {key.name!r} is used twice: give each key its own")
        seen.add(key.name)
    return out


def admin_secret(keys: list[ApiKey]) -> str:
    """The secret our own clients (notebook, CLI) present to the gateway: the first admin key
    ("" when the gateway runs without keys)."""
    return next((k.secret for k in keys if ADMIN in k.scopes), "")


def _scopes(scope: str) -> frozenset[str]:
    return BOTH_SCOPES if scope == ADMIN else frozenset({INFERENCE})


def _named_entries(var: str, env: Mapping[str, str]) -> list[tuple[str, str]]:
    if not var:
        return []
    entries = [e.strip() for e in env.get(var, "").split(",") if e.strip()]
    if not entries:
        raise ConfigError(f"API key variable {var} is not set (or empty): export {var}=name:key")
    out = []
    for i, entry in enumerate(entries, start=1):
        name, sep, secret = entry.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", name) or not secret:
            raise ConfigError(
                f"{var}: entry {i} is not name:key (names: letters, digits, . _ -), e.g. export "
                f"{var}=alice:$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        out.append((name, secret))
    return out


def _keys_from_file(path: Path) -> list[ApiKey]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read keys file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"keys file {path}: invalid TOML: {exc}") from None
    out = []
    for scope, table in data.items():
        if scope not in BOTH_SCOPES or not isinstance(table, dict):
            raise ConfigError(
                f"keys file {path}: [{scope}] is not a key table (use [admin] and [inference] "
                'tables of name = "key")'
            )
        for name, secret in table.items():
            if not isinstance(secret, str) or not secret:
                raise ConfigError(f"keys file {path}: [{scope}] {name} must be a non-empty string")
            out.append(ApiKey(name, secret, _scopes(scope), str(path)))
    return out
