"""Gateway links and client snippets, over the addresses `client/urls.py` decides.

The link a browser opens, the URL an external client dials and the URL code in this kernel calls
differ (jupyter-server-proxy on JupyterHub or a remote Jupyter server, a tunnel's public URL):
`GatewayLink` shows all three with the auth each needs. Snippets use the external address, the
deployment's served model name, and the keys by variable name, never their values: the gateway key
(with a comment saying which key that is, and whether it can also deploy) and, behind a Jupyter
proxy, the Jupyter token.
"""

from __future__ import annotations

import html

from ..client.urls import GatewayAccess


class GatewayLink:
    """Rich display of the gateway: the browser link, then the base URLs for clients."""

    def __init__(
        self, *, browser: GatewayAccess, external: GatewayAccess, kernel: GatewayAccess
    ) -> None:
        self.browser = browser
        self.external = external
        self.kernel = kernel

    def _lines(self) -> list[tuple[str, str]]:
        ext = self.external
        lines = [("OpenAI base URL for external clients", ext.api_base)]
        if ext.auth:
            lines.append(("auth", ext.auth))
        if ext.note:
            lines.append(("note", ext.note))
        lines.append(("in this kernel", self.kernel.api_base))
        return lines

    def _repr_html_(self) -> str:
        b = html.escape(self.browser.url)
        rows = "".join(
            f"<br><small>{html.escape(k)}: <code>{html.escape(v)}</code></small>"
            if k != "auth" and k != "note"
            else f"<br><small>{html.escape(k)}: {html.escape(v)}</small>"
            for k, v in self._lines()
        )
        return f"<div>Gateway: <a href='{b}' target='_blank'>{b}</a>{rows}</div>"

    def __repr__(self) -> str:
        rest = "".join(f"\n{k}: {v}" for k, v in self._lines())
        return f"Gateway: {self.browser.url}{rest}"


class Snippet:
    """Client code with a Markdown repr (a fenced block the notebook highlights)."""

    def __init__(self, code: str, lang: str) -> None:
        self.code = code
        self.lang = lang

    def __repr__(self) -> str:
        return self.code

    def _repr_markdown_(self) -> str:
        fence = "python" if self.lang == "python" else "bash"
        return f"```{fence}\n{self.code}```"
