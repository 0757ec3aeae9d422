"""The llama.cpp shim's start-up arguments: which GGUF file, how many threads, which device.

Pure apart from file lookups: a model name becomes a GGUF path (`resolve_gguf`: a local alias,
a `.gguf` file, or a folder holding one), threads default to the CPUs this process may use
(`cpu_allotment`: its affinity mask and its cgroup's CPU quota) less one, and vLLM-only
settings that would silently mean nothing here are refused with what to do instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

from ..errors import DeepInferError
from . import local_models
from .backends.llamacpp import LlamaCppSettings


class ArgsError(Exception):
    """A one-line start-up error; `code` is the shim's exit code (2: bad arguments)."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def settings(args: argparse.Namespace, extra: list[str]) -> LlamaCppSettings:
    own = _extra_args(extra)
    if args.tensor_parallel_size != 1:
        raise ArgsError(
            "llama.cpp serves a model on one device: drop --tensor-parallel-size", code=2
        )
    if args.dtype not in ("auto", ""):
        raise ArgsError(
            f"--dtype {args.dtype}: a GGUF's weights keep the type they were quantised to; "
            "pick another GGUF file instead",
            code=2,
        )
    require_llama_cpp()
    path = resolve_gguf(args.model)
    if own.n_gpu_layers is not None:
        layers = own.n_gpu_layers
    else:
        layers = 0 if args.device == "cpu" else -1  # all layers where the build has CUDA
    return LlamaCppSettings(
        model_path=path,
        n_ctx=args.max_model_len or 0,
        threads=args.threads or default_threads(),
        n_gpu_layers=layers,
        flash_attn=own.flash_attn,
    )


def _extra_args(extra: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llama.cpp engine args", add_help=False, exit_on_error=False)
    p.add_argument("--n-gpu-layers", type=int, default=None)
    p.add_argument("--flash-attn", action="store_true")
    try:
        ns, unknown = p.parse_known_args(extra)
    except argparse.ArgumentError as exc:
        raise ArgsError(f"bad engine args: {exc}", code=2) from None
    if unknown:
        raise ArgsError(
            f"bad engine args: {' '.join(unknown)} (llama.cpp takes --n-gpu-layers N and "
            "--flash-attn)",
            code=2,
        )
    return ns


def require_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise ArgsError(
            f"llama-cpp-python is not installed for {sys.executable}: pip install "
            "'deepinfer-nb[llamacpp]' (it builds llama.cpp from source; `make setup` caches the "
            "wheel), or deploy with engine vllm"
        )


def resolve_gguf(name: str) -> str:
    """The GGUF file for `name`: a local alias (its GGUF as shipped), a .gguf file, or a folder
    with exactly one .gguf; else a "model not found" ArgsError."""
    model = local_models.lookup_gguf(name)
    if model is not None:
        try:
            return str(local_models.gguf_path(model))
        except DeepInferError as exc:
            raise ArgsError(f"model {name!r}: {exc}") from None
    path = Path(os.path.expanduser(name))  # pathlib raises for "~name" of no such user
    if path.is_file():
        return str(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(ggufs[0])
        what = "no .gguf file" if not ggufs else f"{len(ggufs)} .gguf files (name one)"
        raise ArgsError(f"model not found: {name} is a folder with {what}")
    known = ", ".join(sorted(local_models.GGUF_ALIASES))
    raise ArgsError(
        f"model not found: {name} (llama.cpp serves GGUF files: give a .gguf path or a local "
        f"alias: {known})"
    )


def default_threads() -> int:
    """llama.cpp's threads: the CPU allotment less one (at least one). The shim's own event loop
    and gRPC threads need a core: given every core of a busy 2-CPU host, llama.cpp's thread pool
    stalled here (llama_decode never returned, the process asleep)."""
    return max(1, cpu_allotment() - 1)


def cpu_allotment() -> int:
    """CPUs this process may use: its affinity mask, lowered by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus
