"""Gateway links and client snippets.

The link a browser should open differs from the URL code in the kernel should call: on JupyterHub
the gateway is reached through jupyter-server-proxy under the user's service prefix
(`JUPYTERHUB_SERVICE_PREFIX` + `proxy/{port}/`). Snippets use the URL a client on this machine
dials, the deployment's served model name and the gateway key (by variable name, never its value),
with a comment saying which key that is: an inference key when one is configured, else a key that
can also deploy, and the snippet says so.
"""

from __future__ import annotations

import html
import json
import os
import shlex

DEFAULT_TEMPLATE = "http://{host}:{port}/"
HUB_TEMPLATE = "{hub_prefix}proxy/{port}/"


def browser_url(*, host: str, port: int, template: str = "", hub_prefix: str | None = None) -> str:
    """The gateway link for a browser; `template` may use {host}, {port}, {hub_prefix}."""
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "") if hub_prefix is None else hub_prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    chosen = template or (HUB_TEMPLATE if prefix else DEFAULT_TEMPLATE)
    return chosen.format(host=host, port=port, hub_prefix=prefix)


class GatewayLink:
    """Rich display of the gateway: a clickable link plus the base URL for clients."""

    def __init__(self, *, browser: str, api_base: str, key_note: str = "") -> None:
        self.browser = browser
        self.api_base = api_base
        self.key_note = key_note
        """Which key external clients use (and whether it can also deploy); "" without keys."""

    def _repr_html_(self) -> str:
        b, a = html.escape(self.browser), html.escape(self.api_base)
        note = f"<br><small>key: {html.escape(self.key_note)}</small>" if self.key_note else ""
        return (
            f"<div>Gateway: <a href='{b}' target='_blank'>{b}</a> · "
            f"OpenAI base URL <code>{a}</code>{note}</div>"
        )

    def __repr__(self) -> str:
        note = f"\nkey: {self.key_note}" if self.key_note else ""
        return f"Gateway: {self.browser} (OpenAI base URL {self.api_base}){note}"


def snippet(*, lang: str, api_base: str, model: str, key_env: str = "", key_note: str = "") -> str:
    """Client code that works against the gateway as it runs now."""
    note = f"# {key_note}\n" if key_note else ""
    if lang == "python":
        key = f'os.environ["{key_env}"]' if key_env else '"none"'
        return note + (
            "import os\n"
            "from openai import OpenAI\n\n"
            f"client = OpenAI(base_url={api_base!r}, api_key={key})\n"
            "reply = client.chat.completions.create(\n"
            f"    model={model!r},\n"
            '    messages=[{"role": "user", "content": "What is the capital of France?"}],\n'
            "    max_tokens=64,\n"
            "    temperature=0,\n"
            ")\n"
            "print(reply.choices[0].message.content)\n"
        )
    if lang == "curl":
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 64,
                "temperature": 0,
            }
        )
        auth = f' \\\n  -H "Authorization: Bearer ${key_env}"' if key_env else ""
        return note + (
            f"curl -s {api_base}/chat/completions \\\n"
            f'  -H "Content-Type: application/json"{auth} \\\n'
            f"  -d {shlex.quote(body)}\n"
        )
    raise ValueError(f"unknown snippet language {lang!r}")


class Snippet:
    def __init__(self, code: str, lang: str) -> None:
        self.code = code
        self.lang = lang

    def __repr__(self) -> str:
        return self.code

    def _repr_markdown_(self) -> str:
        fence = "python" if self.lang == "python" else "bash"
        return f"```{fence}\n{self.code}```"
