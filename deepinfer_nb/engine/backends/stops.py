"""Stop strings over a token stream: which text is safe to send now, and where a stop string ends
the output (vLLM's rule: the stop string and anything after it are left out).

Pure: fed decoded text piece by piece, it holds back only a tail that could still grow into a
stop string, so a stop string split across tokens is caught and never half-sent.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, piece: str) -> tuple[str, str]:
        """Text safe to send now, and the stop string that ended the output ("" if none)."""
        self._pending += piece
        if not self._stops:
            return self.flush(), ""
        found = [(i, s) for s in self._stops if (i := self._pending.find(s)) >= 0]
        if found:
            at, stop = min(found)
            text = self._pending[:at]
            self._pending = ""
            return text, stop
        keep = self._partial_tail()
        cut = len(self._pending) - keep
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, ""

    def flush(self) -> str:
        """The held-back text (the output ended without a stop string)."""
        text, self._pending = self._pending, ""
        return text

    def _partial_tail(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
