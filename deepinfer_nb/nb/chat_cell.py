"""Inline chat for `%%deepinfer chat NAME`: stream tokens into the cell output.

Deltas go into one display handle, updated at most `UPDATES_PER_S` times a second (each update is a
message to the front end); the end shows the answer as Markdown with usage and tokens/s. A kernel
interrupt stops the stream, which aborts the request in the engine, and leaves the partial answer
marked as interrupted.
"""

from __future__ import annotations

import time
from typing import Any

from IPython.display import Markdown, display

from ..client.chat import ChatResult
from ..client.cluster import Deployment

UPDATES_PER_S = 10.0


class _Partial:
    """The in-progress answer: plain text and a light HTML rendering."""

    def __init__(self, text: str, note: str) -> None:
        self.text = text
        self.note = note

    def __repr__(self) -> str:
        return self.text + (f"\n[{self.note}]" if self.note else "")

    def _repr_html_(self) -> str:
        import html

        note = f"<div style='color:#888'>{html.escape(self.note)}</div>" if self.note else ""
        return f"<div style='white-space:pre-wrap'>{html.escape(self.text)}</div>{note}"


def stream_chat(
    deployment: Deployment,
    prompt: str,
    *,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    min_interval: float = 1.0 / UPDATES_PER_S,
) -> ChatResult:
    """Stream an answer into the output; returns the finished result (history is kept)."""
    waiting = "waiting for the first token…"
    if deployment.status.startswith("Idle"):  # the chat wakes it: say why the wait is longer
        waiting = "scaled to zero: starting an engine, then the first token…"
    handle: Any = display(_Partial("", waiting), display_id=True)
    stream = deployment.chat(
        prompt,
        system=system,
        max_tokens=max_tokens,
        temperature=temperature,
        stream=True,
        remember=True,
    )
    last = 0.0
    try:
        for _delta in stream:
            now = time.monotonic()
            if now - last >= min_interval:
                handle.update(_Partial(stream.text, "streaming…"))
                last = now
    except KeyboardInterrupt:
        handle.update(_Partial(stream.text, "interrupted: the engine request was aborted"))
        raise
    result = stream.result
    assert result is not None
    handle.update(Markdown(f"{result.text}\n\n---\n*{result.usage_line()}*"))
    return result
