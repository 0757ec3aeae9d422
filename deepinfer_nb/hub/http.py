"""Plain HTTP GETs to a hub with the standard library (no HTTP client in the core dependencies):
a bearer token that never follows a redirect to another host (the hub sends large files to a
CDN with signed URLs; huggingface_hub's own client drops the token there too), and ranges.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from http.client import HTTPResponse
from typing import Any

__all__ = ["get"]


class _NoTokenAcrossHosts(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != req.host:
            new.headers.pop("Authorization", None)
            new.unredirected_hdrs.pop("Authorization", None)
        return new


_OPENER = urllib.request.build_opener(_NoTokenAcrossHosts)


def get(url: str, *, token: str | None, start: int = 0, timeout: float) -> HTTPResponse:
    """An open response (the caller closes it); HTTP errors raise `urllib.error.HTTPError`,
    unreachable hosts `urllib.error.URLError` (both OSError)."""
    headers = {"Accept-Encoding": "identity", "User-Agent": "deepinfer-nb"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if start:
        headers["Range"] = f"bytes={start}-"
    response: HTTPResponse = _OPENER.open(
        urllib.request.Request(url, headers=headers), timeout=timeout
    )
    return response
