"""vLLM's engine-core and worker processes forked from a warm parent instead of spawned (CPU).

vLLM 0.32 on CPU starts three interpreters per engine: our shim (imports torch and vLLM, ~6 s
here), the EngineCore it spawns (imports them again, ~8 s) and the worker the EngineCore spawns
(again, ~13 s). Its CPU platform forces `VLLM_WORKER_MULTIPROC_METHOD=spawn` and turns a `uni`
executor back into `mp` ("OMP requires the MP executor"), so neither knob helps. Both processes
are created through `vllm.utils.system_utils.get_mp_context()` (imported by name into
`vllm.v1.engine.utils` and `vllm.v1.executor.multiproc_executor`); `install()` points those at
`WarmContext`: a `multiprocessing` forkserver whose server process has imported torch, vLLM and
the CPU worker's modules once (`PRELOAD`), so each child is a `fork()` of that warm server and
starts in well under a second.

Why a forkserver and not plain `fork` from the shim: when vLLM creates its EngineCore the shim
already runs gRPC's and asyncio's threads, and forking a threaded process can deadlock the child;
the forkserver is single-threaded and has run no OpenMP region, so its children start clean.
Why not the `uni` executor: the CPU worker binds OpenMP threads per process (below), which
vLLM only supports in a process of its own; with the forkserver that process costs a fork.
GPU engines keep vLLM's own start method: `install()` is only called for `--device cpu`.

What a forked child must get right that a spawned one gets for free, all done in
`_WarmProcess.run` before vLLM's code runs:
- **Environment.** A forkserver child inherits the server's environment, not its requester's;
  vLLM sets variables in the parent just before starting a child (the CPU platform's settings, the
  OpenMP binding of each worker). The child takes the requester's `os.environ` as it was at
  `start()`.
- **stdout/stderr.** They are the requester's fds at `start()` (the shim's stderr tee, the
  engine's log), passed over the forkserver's socket, not the server's.
- **OpenMP binding.** vLLM binds a worker's threads with OMP_NUM_THREADS and OMP_PLACES /
  OMP_PROC_BIND (GOMP_CPU_AFFINITY, KMP_AFFINITY with other runtimes), which the OpenMP runtime
  reads only when it is loaded, long before the fork. vLLM always builds one place holding the
  rank's CPUs, so the same binding is this process's CPU affinity (inherited by the threads the
  runtime starts later) plus `torch.set_num_threads(OMP_NUM_THREADS)`.
- **Grandchildren.** The EngineCore (a forkserver child) starts its worker through the same
  server: the server's address is inherited, so `ensure_running` (which would start a new server
  where it did not start one itself) is skipped.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing.context
import multiprocessing.forkserver
import os
import re
import signal
import sys
from collections.abc import Mapping
from multiprocessing import reduction
from typing import Any

__all__ = [
    "PRELOAD",
    "WarmContext",
    "install",
    "omp_cpus",
    "start_server",
    "stop_server",
]

PRELOAD = (
    "torch",
    "vllm",
    "vllm.v1.engine.core",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.cpu_worker",
    "vllm.model_executor.models.llama",
    "deepinfer_nb.engine.warmfork",
)
"""What the forkserver imports before it forks anything (what the EngineCore and a CPU worker
import first; a module missing from this vLLM is skipped)."""
_GET_MP_CONTEXT_USERS = (
    "vllm.utils.system_utils",
    "vllm.v1.engine.utils",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.engine.coordinator",
)


class _InheritedFd:
    """An fd of the requesting process that the child gets as the same open file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        # Pickled while the forkserver Popen is spawning: DupFd queues the fd for the socket.
        return (_detach, (reduction.DupFd(self.fd),))


def _detach(dup: Any) -> int:
    return int(dup.detach())


class _WarmProcess(multiprocessing.context.ForkServerProcess):
    """A forkserver process that starts with its requester's environment and stdio."""

    _warm_env: dict[str, str]
    _warm_stdio: tuple[Any, Any]

    def start(self) -> None:
        self._warm_env = dict(os.environ)
        self._warm_stdio = (_InheritedFd(1), _InheritedFd(2))
        super().start()

    def run(self) -> None:
        _enter_child(self._warm_env, self._warm_stdio)
        super().run()


class WarmContext(multiprocessing.context.ForkServerContext):
    """vLLM's multiprocessing context: forks of the warm server (see the module docstring)."""

    Process = _WarmProcess


_CONTEXT = WarmContext()


def _enter_child(env: Mapping[str, str], stdio: tuple[Any, Any]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for target, fd in zip((1, 2), stdio, strict=True):
        os.dup2(int(fd), target)
        os.close(int(fd))
    os.environ.clear()
    os.environ.update(env)
    bind_openmp(env)
    server: Any = multiprocessing.forkserver._forkserver
    if server._forkserver_address is not None and server._forkserver_pid is None:
        server.ensure_running = lambda: None
    install(load=False)


def omp_cpus(env: Mapping[str, str]) -> list[int]:
    """The CPUs an OpenMP binding in `env` names (vLLM's forms), [] when it names none."""
    places = env.get("OMP_PLACES", "")
    if places and env.get("OMP_PROC_BIND", "").lower() in ("true", "close", "spread", "master"):
        return _numbers(places)
    if env.get("GOMP_CPU_AFFINITY"):
        return _numbers(env["GOMP_CPU_AFFINITY"])
    found = re.search(r"proclist=\[([^\]]*)\]", env.get("KMP_AFFINITY", ""))
    return _numbers(found.group(1)) if found else []


def _numbers(text: str) -> list[int]:
    out: list[int] = []
    for lo, hi in re.findall(r"(\d+)(?:-(\d+))?", text):
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def bind_openmp(env: Mapping[str, str]) -> None:
    """What the OpenMP runtime would have done at load with `env`: the process's CPU affinity
    and torch's thread count (only where `env` asks for them)."""
    cpus = omp_cpus(env)
    if cpus:
        os.sched_setaffinity(0, cpus)
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def _get_mp_context() -> WarmContext:
    return _CONTEXT


def install(*, load: bool = True) -> None:
    """Make vLLM start its EngineCore and workers from the warm forkserver (importing vLLM's
    modules that choose the context; `load=False`: only those imported already, as in a child
    of the server, which preloaded them)."""
    for name in _GET_MP_CONTEXT_USERS:
        module: Any = sys.modules.get(name) or (_import(name) if load else None)
        if module is not None and hasattr(module, "get_mp_context"):
            module.get_mp_context = _get_mp_context


def start_server() -> None:
    """Start the forkserver now, with this process's environment: it imports `PRELOAD` in its
    own process while this one goes on. Call `install()` before vLLM creates its engine."""
    multiprocessing.forkserver.set_forkserver_preload(list(PRELOAD))
    multiprocessing.forkserver.ensure_running()


def stop_server() -> None:
    """End this process's forkserver now, if it started one: after a start-up failure it may
    still be importing, and it holds our stderr open (whoever reads that to its end would wait
    for the imports)."""
    server: Any = multiprocessing.forkserver._forkserver
    pid = server._forkserver_pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    server._stop()


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
