"""The launch policy: what a deployment spec may make a worker run, and the redaction of secrets.

It lives with the engines (whose documented flags it lists) so that the worker (`control`), the
gateway and the notebook's client, which all check it, can import it.

A deployment carries `env`, `engine_args`, `secrets` and a `model` that the worker turns into a
process on its node, so whoever can write a spec could otherwise run code there
(`LD_PRELOAD`, `PYTHONPATH`, `--trust-remote-code`, a "model" that is any folder). The worker
checks every spec it reads from the store with `check()` (whatever wrote it: the gateway, the
notebook or a direct etcd write) and the gateway and the notebook check the same rules early, so
a refusal names its rule at once. Rules (the `rule` of a `PolicyError`):

    env.never             LD_*, DYLD_*, PYTHON*, PATH and variables that point the engine at
                          code or config files: never, whatever the worker allows
    env.reserved          CUDA_VISIBLE_DEVICES: the worker sets it from the placement
    env.secret_in_clear   a secret-looking name (HF_TOKEN, *_API_KEY, ...) given a value: name it
                          in `secrets` instead; the worker fills it in from its own env or file
    env.not_allowed       a name outside the allowlist (vLLM/llama.cpp/NCCL/CUDA/OMP tunables,
                          plus the worker's [agent] allowed_env)
    secrets.name          a `secrets` entry that is not a secret-looking name
    secrets.missing       (worker) a referenced secret that the worker does not have
    args.unknown_flag     an engine argument that is not a documented flag of the backend
    args.code_loading     --trust-remote-code and other flags that load code (plugins, classes,
                          logging configs), unless the worker's [agent] allow_code_loading
    args.secret_in_clear  --hf-token VALUE: use `secrets: ["HF_TOKEN"]`
    args.positional       a bare value that belongs to no flag
    path.outside_model_dirs  a local model path (or path-valued flag) that, after resolving
                          symlinks, is not inside one of [agent] model_dirs (default: the models
                          cache, <home>/models)

Pure apart from resolving paths (`os.path.realpath`). `resolve_secrets` is the worker's side of
`secrets`; `redact_args` / `redact_text` keep secret values out of responses, logs and records.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

from ..config import AgentSettings, home_dir
from ..errors import PolicyError
from ..models import DeploymentSpec
from . import local_models

__all__ = [
    "LaunchPolicy",
    "PolicyError",
    "check",
    "redact_args",
    "redact_text",
    "resolve_secrets",
    "violations",
]

NEVER_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON")
NEVER_ENV = frozenset(
    {
        "PATH",
        "BASH_ENV",
        "ENV",
        # vLLM settings that load code or read config files a spec could choose
        "VLLM_ALLOW_INSECURE_SERIALIZATION",
        "VLLM_PLUGINS",
        "VLLM_LOGGING_CONFIG_PATH",
        "VLLM_CONFIG_ROOT",
        "VLLM_CACHE_ROOT",
        "VLLM_ASSETS_CACHE",
        "VLLM_RPC_BASE_PATH",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        "VLLM_USE_MODELSCOPE",
        "CUDA_HOME",
        "CUDA_PATH",
    }
)
RESERVED_ENV = frozenset({"CUDA_VISIBLE_DEVICES"})
ALLOWED_ENV_PREFIXES = ("VLLM_", "LLAMA_ARG_", "GGML_", "NCCL_", "CUDA_", "OMP_", "MKL_")
ALLOWED_ENV = frozenset(
    {
        "TOKENIZERS_PARALLELISM",
        "PYTORCH_CUDA_ALLOC_CONF",
        "HF_HUB_OFFLINE",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "HF_HUB_DOWNLOAD_TIMEOUT",
        "TRANSFORMERS_OFFLINE",
        "CUBLAS_WORKSPACE_CONFIG",
    }
)
SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)|(^|_)(API_?)?KEY$|^HF_TOKEN$"
)


@dataclasses.dataclass(frozen=True)
class Flag:
    kind: str = "value"  # bool | value | values (nargs +)
    path: bool = False  # its value may be a local path: the model-dirs rule applies
    code: bool = False  # loads code: refused unless the worker allows code loading
    secret: bool = False  # its value is a secret: refused (use `secrets`) and redacted


def _table(**groups: tuple[str, Flag]) -> dict[str, Flag]:
    return {f"--{name}": flag for names, flag in groups.values() for name in names.split() if name}


VLLM_FLAGS = _table(
    values=(
        "max-num-seqs max-num-batched-tokens max-model-len dtype kv-cache-dtype quantization "
        "seed block-size gpu-memory-utilization kv-cache-memory-bytes cpu-offload-gb "
        "max-logprobs logprobs-mode tokenizer-mode revision tokenizer-revision "
        "tensor-parallel-size pipeline-parallel-size data-parallel-size "
        "max-parallel-loading-workers num-gpu-blocks-override scheduling-policy "
        "long-prefill-token-threshold max-cudagraph-capture-size config-format "
        "override-generation-config reasoning-parser limit-mm-per-prompt "
        "prefix-caching-hash-algo attention-backend stream-interval runner convert",
        Flag(),
    ),
    bools=(
        "enforce-eager enable-prefix-caching enable-chunked-prefill disable-sliding-window "
        "disable-cascade-attn enable-expert-parallel disable-custom-all-reduce async-scheduling "
        "disable-log-stats enable-log-requests skip-tokenizer-init",
        Flag("bool"),
    ),
    paths=("tokenizer download-dir generation-config", Flag(path=True)),
    code_values=(
        "code-revision worker-cls worker-extension-cls io-processor-plugin "
        "reasoning-parser-plugin scheduler-cls hf-overrides model-class-overrides "
        "logging-config compilation-config additional-config kv-transfer-config "
        "model-loader-extra-config speculative-config load-format",
        Flag(code=True),
    ),
    code_lists=("logits-processors", Flag("values", code=True)),
    code_bools=("trust-remote-code", Flag("bool", code=True)),
    secrets=("hf-token", Flag(secret=True)),
)
VLLM_FLAGS.update({"-q": VLLM_FLAGS["--quantization"], "-tp": VLLM_FLAGS["--tensor-parallel-size"]})
VLLM_FLAGS.update({"-pp": VLLM_FLAGS["--pipeline-parallel-size"]})
VLLM_FLAGS.update({"-dp": VLLM_FLAGS["--data-parallel-size"]})

BACKEND_FLAGS: dict[str, dict[str, Flag]] = {"vllm": VLLM_FLAGS}
"""The documented engine flags each backend accepts through a deployment's `engine_args`."""
PATH_KEYWORDS = frozenset({"auto", "vllm"})
"""Values of path-valued flags that are keywords, not paths (--generation-config auto)."""


@dataclasses.dataclass(frozen=True)
class LaunchPolicy:
    model_dirs: tuple[str, ...]
    """Real paths (symlinks resolved) that local models must lie in."""
    allow_code_loading: bool = False
    allowed_env: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, agent: AgentSettings) -> LaunchPolicy:
        dirs = agent.model_dirs or [str(home_dir() / "models")]
        return cls(
            model_dirs=tuple(os.path.realpath(os.path.expanduser(d)) for d in dirs),
            allow_code_loading=agent.allow_code_loading,
            allowed_env=frozenset(agent.allowed_env),
        )


def check(spec: DeploymentSpec, policy: LaunchPolicy) -> None:
    """Raise the first `PolicyError` of `spec`, if any."""
    for error in violations(spec, policy):
        raise error


def violations(spec: DeploymentSpec, policy: LaunchPolicy) -> list[PolicyError]:
    return [
        *_env_violations(spec.env, policy),
        *_secret_violations(spec.secrets),
        *_args_violations(spec.engine_args, spec.engine, policy),
        *_model_violations(spec.model, policy),
    ]


# ---- environment --------------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def _never(name: str) -> bool:
    return name in NEVER_ENV or name.startswith(NEVER_ENV_PREFIXES)


def _env_violations(env: Mapping[str, str], policy: LaunchPolicy) -> Iterator[PolicyError]:
    for name in env:
        param = f"env.{name}"
        if _never(name):
            yield PolicyError(
                "env.never",
                param,
                f"{name} changes what code or configuration the engine process loads; "
                "it is never allowed",
            )
        elif name in RESERVED_ENV:
            yield PolicyError(
                "env.reserved", param, f"{name} is set by the worker from the engine's placement"
            )
        elif is_secret_name(name):
            yield PolicyError(
                "env.secret_in_clear",
                param,
                f"{name} looks like a secret: do not send its value; list it in `secrets` "
                f'(e.g. "secrets": ["{name}"]) and set it on the worker (its environment or '
                "[agent] secrets_file)",
            )
        elif not (
            name in policy.allowed_env
            or name in ALLOWED_ENV
            or name.startswith(ALLOWED_ENV_PREFIXES)
        ):
            yield PolicyError(
                "env.not_allowed",
                param,
                f"{name} is not an engine tunable the launch policy knows (allowed: "
                f"{', '.join(p + '*' for p in ALLOWED_ENV_PREFIXES)} and a few HF/tokenizer "
                "settings); a worker admits more names with [agent] allowed_env",
            )


def _secret_violations(names: Iterable[str]) -> Iterator[PolicyError]:
    for name in names:
        if _never(name) or not is_secret_name(name):
            yield PolicyError(
                "secrets.name",
                f"secrets.{name}",
                f"{name} is not a secret name (HF_TOKEN, *_TOKEN, *_API_KEY, *_SECRET, "
                "*_PASSWORD); ordinary settings go in `env`",
            )


def resolve_secrets(
    names: Iterable[str], *, env: Mapping[str, str], file_text: str | None, file_name: str = ""
) -> dict[str, str]:
    """The values of the secrets `names` on this worker: its environment first, then the
    `NAME=value` lines of its secrets file. A missing one is a `PolicyError` (secrets.missing)."""
    from_file: dict[str, str] = {}
    for line in (file_text or "").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, raw = line.partition("=")
            from_file[key.strip()] = raw.strip().strip("'\"")
    out = {}
    for name in names:
        value = env.get(name) or from_file.get(name, "")
        if not value:
            where = f"its environment or {file_name}" if file_name else "its environment"
            raise PolicyError(
                "secrets.missing",
                f"secrets.{name}",
                f"the worker has no {name} in {where}: set it there "
                "(or name a file of NAME=value lines in [agent] secrets_file)",
            )
        out[name] = value
    return out


# ---- engine arguments ---------------------------------------------------------------------------


def _args_violations(
    args: Sequence[str], backend: str, policy: LaunchPolicy
) -> Iterator[PolicyError]:
    table = BACKEND_FLAGS.get(backend, {})
    i = 0
    while i < len(args):
        item = args[i]
        i += 1
        if not item.startswith("-") or item in ("-", "--"):
            yield PolicyError(
                "args.positional",
                "engine_args",
                f"{item!r} belongs to no flag: give engine arguments as --flag [value]",
            )
            continue
        raw, eq, inline = item.partition("=")
        name, flag = _lookup(table, raw)
        if flag is None:
            yield PolicyError(
                "args.unknown_flag",
                f"engine_args.{raw}",
                f"{raw} is not a documented {backend} flag the launch policy admits",
            )
            continue
        values: list[str] = [inline] if eq else []
        if flag.kind == "value" and not eq and i < len(args):
            values, i = [args[i]], i + 1
        elif flag.kind == "values" and not eq:
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
        yield from _flag_violations(name, flag, values, policy)


def _lookup(table: Mapping[str, Flag], raw: str) -> tuple[str, Flag | None]:
    # vLLM's parser reads --max_num_seqs as --max-num-seqs
    name = "--" + raw[2:].replace("_", "-") if raw.startswith("--") else raw
    flag = table.get(name)
    if flag is None and name.startswith("--no-"):
        positive = table.get("--" + name[5:])
        if positive is not None and positive.kind == "bool":
            return name, positive
    return name, flag


def _flag_violations(
    name: str, flag: Flag, values: list[str], policy: LaunchPolicy
) -> Iterator[PolicyError]:
    param = f"engine_args.{name}"
    if flag.secret:
        yield PolicyError(
            "args.secret_in_clear",
            param,
            f'{name} would store a secret in the deployment: use "secrets": ["HF_TOKEN"] and '
            "set HF_TOKEN on the worker",
        )
    elif flag.code and not policy.allow_code_loading and not name.startswith("--no-"):
        yield PolicyError(
            "args.code_loading",
            param,
            f"{name} loads code chosen by the deployment; a worker runs it only with "
            "[agent] allow_code_loading = true",
        )
    elif flag.path:
        for value in values:
            if value not in PATH_KEYWORDS and _is_local(value):
                yield from _path_violations(param, value, policy)


# ---- local paths --------------------------------------------------------------------------------


def _is_local(value: str) -> bool:
    """Whether the engine would read `value` as a local path (vLLM loads an existing path
    before it asks the hub)."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..") or _exists(value)


def _exists(value: str) -> bool:
    try:
        return os.path.exists(value)
    except (OSError, ValueError):
        return False


def _path_violations(param: str, value: str, policy: LaunchPolicy) -> Iterator[PolicyError]:
    real = os.path.realpath(os.path.expanduser(value))
    if not any(real == d or real.startswith(d.rstrip(os.sep) + os.sep) for d in policy.model_dirs):
        yield PolicyError(
            "path.outside_model_dirs",
            param,
            f"{value} (resolved: {real}) is not inside a model folder of the worker "
            f"({', '.join(policy.model_dirs)}); put the model there or add its folder to "
            "[agent] model_dirs",
        )


def _model_violations(model: str, policy: LaunchPolicy) -> Iterator[PolicyError]:
    if local_models.lookup(model) is not None:
        return  # a catalog alias: the worker builds and serves it from its own models cache
    if _is_local(model):
        yield from _path_violations("model", model, policy)


# ---- redaction ----------------------------------------------------------------------------------

REDACTED = "***"


def redact_args(args: Sequence[str]) -> list[str]:
    """`args` with the values of secret-carrying flags (--hf-token) replaced by ***."""
    out: list[str] = []
    hide_next = False
    for item in args:
        raw, eq, _ = item.partition("=")
        flag = _lookup(VLLM_FLAGS, raw)[1] if item.startswith("-") else None
        if hide_next and not item.startswith("-"):
            out.append(REDACTED)
        elif flag is not None and flag.secret and eq:
            out.append(f"{raw}={REDACTED}")
        else:
            out.append(item)
        hide_next = flag is not None and flag.secret and not eq
    return out


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of a secret value replaced by ***."""
    for value in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text
