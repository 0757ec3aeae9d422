"""Structured logs for the long-running services (worker, controller, gateway).

Every line carries `node` and `engine` ("-" when a line concerns neither), in text or JSON:

    2026-01-01T10:00:00 INFO deepinfer_nb.control.worker node=w1 engine=chat-0-ab12 claimed
    {"ts": "...", "level": "INFO", "logger": "...", "node": "w1", "engine": "chat-0-ab12", ...}

`bind(logger, node=..., engine=...)` returns a `LoggerAdapter` that adds those fields;
`setup(fmt)` installs the formatter on the root logger (the CLI calls it once).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

__all__ = ["FIELDS", "ContextAdapter", "JsonFormatter", "TextFormatter", "bind", "setup"]

FIELDS = ("node", "engine")


def _field(record: logging.LogRecord, name: str) -> str:
    return str(getattr(record, name, "") or "-")


def _timestamp(record: logging.LogRecord) -> str:
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{base}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """One line: time, level, logger, node=, engine=, message (traceback below it)."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{name}={_field(record, name)}" for name in FIELDS)
        line = (
            f"{_timestamp(record)} {record.levelname} {record.name} {context} {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `exc` holds the formatted traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            **{name: _field(record, name) for name in FIELDS},
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class ContextAdapter(logging.LoggerAdapter):
    """Adds its context (node, engine) to every record; a call's own `extra` wins."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def bind(logger: logging.Logger | ContextAdapter, **context: str) -> ContextAdapter:
    """A logger whose lines carry `context` (e.g. node=..., engine=...), nesting adapters."""
    if isinstance(logger, ContextAdapter):
        return ContextAdapter(logger.logger, {**(logger.extra or {}), **context})
    return ContextAdapter(logger, context)


def setup(fmt: str = "text", *, level: int | str = logging.INFO) -> None:
    """Route the root logger to stderr with the text or JSON formatter."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
