"""The shim's stderr, kept in view: fd 2 through a pipe, copied on to the real stderr, last lines
remembered.

vLLM's EngineCore (and its workers) are spawned subprocesses that inherit fd 2; when one of them
fails during start-up, the main process only learns "Engine core initialization failed". The
real cause (e.g. `ValueError: ... less than requested memory for kv ...`) is on stderr. Routing
our own fd 2 through a pipe before the load makes every process of the tree write there, so the
shim can quote the child's last error line in its one-line failure message.

The reader thread runs for the life of the process: the children hold the pipe's write end as
their stderr, and a pipe nobody reads fills up and blocks them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading
import time

MAX_LINES = 400
# A traceback's last line: "ValueError: ...", "torch.OutOfMemoryError: ...".
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?\s")
# vLLM's core re-raises a worker's error inside this wrapper; the inner text is the cause.
_WRAPPED = re.compile(r"Worker failed with error '(.+)', please check the stack trace")
# vLLM's prefix on lines from its subprocesses: "(EngineCore_DP0 pid=123) ".
_PROC_PREFIX = re.compile(r"^\([^)]*pid=\d+\)\s*")
# Its log lines: "ERROR 05-04 10:00:00 [core.py:123] message".
_LOG_PREFIX = re.compile(r"^(ERROR|WARNING|INFO|DEBUG)\s+\S+\s+\S+\s+\[[^\]]*\]\s*")
# Lines that report a failure without saying what failed: not worth quoting.
_NOT_A_CAUSE = (
    "engine core initialization failed",
    "engineCore failed to start".lower(),
    "traceback (most recent call last)",
    "see root cause above",
)


class StderrTail:
    """Tee of fd 2 through a pipe; `start()` once, early, before any child is spawned."""

    def __init__(self, max_lines: int = MAX_LINES) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self._real_fd = -1
        self._thread: threading.Thread | None = None
        self._last_read = 0.0

    def start(self) -> None:
        sys.stderr.flush()
        self._real_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)  # fd 2 (ours and the children's) is now the only write end
        self._thread = threading.Thread(
            target=self._pump, args=(read_fd,), name="stderr-tail", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Put the real stderr back on fd 2 and let the reader copy what is left in the pipe
        (it sees EOF once no child holds the write end any more)."""
        if self._real_fd < 0 or self._thread is None:
            return
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        # The pump keeps its own copy of the real stderr (never closed: it may still write).
        os.dup2(self._real_fd, 2)
        thread, self._thread = self._thread, None
        thread.join(timeout)

    def settle(self, *, quiet_s: float = 0.3, limit_s: float = 3.0) -> None:
        """Wait until nothing new arrived for `quiet_s` (at most `limit_s`): a process that
        just died may have its last lines still in the pipe."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and time.monotonic() - self._last_read < quiet_s:
            time.sleep(0.05)

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def last_error(self) -> str:
        return last_error_line(self.lines())

    def _pump(self, read_fd: int) -> None:
        partial = b""
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            self._last_read = time.monotonic()
            _write_all(self._real_fd, chunk)
            *complete, partial = (partial + chunk).split(b"\n")
            if complete:
                with self._lock:
                    self._lines.extend(ln.decode(errors="replace").rstrip("\r") for ln in complete)
        os.close(read_fd)


def last_error_line(lines: list[str]) -> str:
    """The last exception line ("ValueError: ...", a traceback's end), else the last ERROR log
    line, without vLLM's process and log prefixes; lines that only say "it failed" are skipped."""
    logged = ""
    for line in reversed(lines):
        bare = _PROC_PREFIX.sub("", line.strip())
        text = _LOG_PREFIX.sub("", bare)
        if not text or any(p in text.lower() for p in _NOT_A_CAUSE):
            continue
        if _EXCEPTION_LINE.match(text):
            wrapped = _WRAPPED.search(text)
            return wrapped.group(1) if wrapped else text
        if not logged and bare.startswith("ERROR"):
            logged = text
    return logged


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:
            return  # the real stderr is gone (closed terminal): keep pumping, drop the copy
