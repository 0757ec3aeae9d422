"""A warm engine process waiting for its assignment (one member of a worker's warm pool, see
control/warmpool.py).

    python -m deepinfer_nb.engine --pooled

It starts the warm forkserver (warmfork.py) with the environment it was started with, imports
torch, vLLM and the shim's own modules, writes `READY_LINE` on stdout, then reads ONE line from
stdin: the JSON assignment

    {"argv": [shim flags, as after `python -m deepinfer_nb.engine`], "env": {...}, "log": PATH}

and becomes that engine: stdout and stderr appended to PATH, `os.environ` replaced by `env`, and
the shim's `main(argv)` runs as in a cold start, so every launch rule (flags, token variable,
policy-checked env, redaction) is the same. Only the variables read once at interpreter start
must already match (the worker takes a pooled process only when they do: `control/warmpool.py`).
EOF on stdin (the worker let it go, or died) ends the process with exit 0.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

from .. import procenv

__all__ = ["READY_LINE", "Assignment", "read_assignment", "serve"]

READY_LINE = "deepinfer-nb pooled engine: warm"
"""Written once imports are done and the forkserver runs (the pool reads it from the log)."""
WARM_IMPORTS = (
    "torch",
    "vllm",
    "vllm.engine.arg_utils",
    "vllm.utils.argparse_utils",
    "vllm.v1.engine.async_llm",
    "vllm.v1.metrics.loggers",
    "deepinfer_nb.engine.server",
    "deepinfer_nb.engine.vllm_backend",
)
"""What the shim itself imports on its way to AsyncLLM (the EngineCore's and worker's modules
are the forkserver's: warmfork.PRELOAD). Only these, so that a member taken before it is warm
has no extra imports in the way."""


class Assignment:
    """One engine for a pooled process: its shim flags, full environment and log file."""

    def __init__(self, *, argv: Sequence[str], env: dict[str, str], log: str) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log = log

    def encode(self) -> bytes:
        return (json.dumps({"argv": self.argv, "env": self.env, "log": self.log}) + "\n").encode()

    @classmethod
    def decode(cls, line: str) -> Assignment:
        data = json.loads(line)
        return cls(argv=data["argv"], env=data["env"], log=data["log"])


def read_assignment(line: str) -> Assignment | None:
    """The assignment in `line`; None for EOF (an empty string)."""
    return Assignment.decode(line) if line.strip() else None


def _warm_up() -> None:
    import importlib

    from . import warmfork

    warmfork.start_server()  # the server imports in its own process meanwhile
    for name in WARM_IMPORTS:
        importlib.import_module(name)
    warmfork.install()


def _become(assignment: Assignment) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(assignment.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(assignment.env)


def serve(main: Callable[[Sequence[str]], int]) -> int:
    """Warm up, wait for the assignment, run `main` with its flags."""
    procenv.apply_grpc_experiments()  # before server.py imports grpc, as in a cold start
    _warm_up()
    print(READY_LINE, flush=True)
    assignment = read_assignment(sys.stdin.readline())
    if assignment is None:
        return 0
    _become(assignment)
    print(f"deepinfer-nb engine: warm process {os.getpid()} assigned", flush=True)
    return main(assignment.argv)
