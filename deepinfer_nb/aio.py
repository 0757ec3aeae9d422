"""The event loop of the project's own processes: uvloop where it is installed, else asyncio's.

uvloop is what vLLM's own OpenAI server runs on, and the gateway extra installs it (vLLM depends
on it too). It does the per-token socket, callback and gRPC-completion work of the shim and the
gateway in C instead of asyncio's Python loop; on a small machine that CPU is taken from the
engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["new_event_loop", "run"]


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
