"""How the project's own long-running processes are set up (any layer may use this; it imports
nothing of the package): the event loop, gRPC core settings, the start-up heap, and children that
die with their parent.

- **Event loop.** `run`/`new_event_loop` use uvloop where it is installed, else asyncio's. uvloop
  is what vLLM's own OpenAI server runs on, and the gateway extra installs it. It does the
  per-token socket, callback and gRPC-completion work of the shim and the gateway in C instead of
  asyncio's Python loop; on a small machine that CPU is taken from the engine. `stop_task` ends a
  background loop (cancel, then wait for it to end).
- **gRPC settings.** `GRPC_EXPERIMENTS` turns off the EventEngine TCP client and listener (on by
  default in current gRPC) and so brings back iomgr's TCP path, still supported by gRPC: there the
  thread that polls the asyncio completion queue reads the socket itself, instead of taking each
  message from an EventEngine thread. Measured here (grpcio 1.85, 2 cores, a shim on a fake
  engine, alternating runs), CPU per one-token unary call: client 0.25-0.36 ms against 0.33-0.55
  ms with EventEngine, shim 0.49-0.75 against 0.61-0.97 ms; the gateway's CPU per streamed token
  about 15% lower (138-155 against 167-183 us at 16 streams). gRPC reads the variable once, when
  `grpc` is imported, so it is set only where we own the process: `apply_grpc_experiments()` at
  the start of the `deepinfer-nb` command and of the engine shim, and `grpc_env()` in the
  environment of the processes we spawn. Importing the package changes nothing (a notebook sets the
  variable itself, before importing grpc, to get the same). A user's own setting is left alone.
- **Heap.** `freeze_heap()` takes what a serving process allocated while starting out of the
  garbage collector's sight. The engine shim imports torch, transformers and vLLM and loads a
  tokenizer: over 600,000 objects that live as long as the process. Each of Python's full
  collections walks all of them (0.4 s measured on a 2-core CPU host), and every stream the
  process serves stalls meanwhile. vLLM's EngineCore freezes its heap after start-up for this
  reason; so do our serving processes, once started.
- **Children.** `die_with_parent(cmd)` runs `cmd` behind a tiny `python -c` guard that asks the
  Linux kernel for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), then execs `cmd`: an
  engine or etcd server started here dies with its command even when that is SIGKILLed. The death
  signal follows the *thread* that started the child: start such children from a thread that
  lives as long as they should (the main thread, or the runtime's loop thread).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "GRPC_EXPERIMENTS",
    "apply_grpc_experiments",
    "die_with_parent",
    "freeze_heap",
    "grpc_env",
    "new_event_loop",
    "run",
    "stop_task",
]

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
PR_SET_PDEATHSIG = 1


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the fastest loop available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop and wait until it has ended (None: nothing to stop)."""
    if task is None:
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def grpc_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The gRPC settings for a process we spawn: `{"GRPC_EXPERIMENTS": ...}`, or nothing when
    `base` (default: this process's environment) sets the variable already."""
    base = os.environ if base is None else base
    return {} if "GRPC_EXPERIMENTS" in base else {"GRPC_EXPERIMENTS": GRPC_EXPERIMENTS}


def apply_grpc_experiments() -> None:
    """In a process of our own, before `grpc` is imported: set the gRPC settings (a user's own
    `GRPC_EXPERIMENTS` stays; nothing happens once grpc is imported)."""
    if "grpc" not in sys.modules:
        os.environ.update(grpc_env())


def freeze_heap() -> int:
    """Collect once, then move every surviving object to the permanent generation, which later
    collections skip; how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# Run by this Python before the child: ask the kernel for SIGTERM when the parent dies, check that
# it has not died already, then exec the child (the pid and the death signal survive exec). A
# wrapper, not a preexec_fn: Python code between fork and exec in a process with gRPC threads can
# crash the child (seen here as SIGSEGV).
PDEATH_GUARD = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, int(signal.SIGTERM))\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('deepinfer-nb: the parent exited before the child started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent(
    cmd: list[str], *, parent_pid: int | None = None, python: str | None = None
) -> list[str]:
    """`cmd` behind the parent-death guard (Linux; elsewhere `cmd` unchanged). `python` runs the
    guard (default: `cmd[0]` when `cmd` is a Python command, else this interpreter)."""
    if not sys.platform.startswith("linux"):
        return cmd
    pid = os.getpid() if parent_pid is None else parent_pid
    return [python or sys.executable, "-c", PDEATH_GUARD, str(pid), *cmd]
