"""Client code for the gateway: the openai SDK and curl, as `%deepinfer snippet` and the
gateway's landing page print them.

Keys appear by environment variable name, never by value: the gateway key (with a comment saying
which key it is) and, behind a Jupyter proxy, the Jupyter token. With both, the token travels in
the `token` query parameter, since the gateway key takes the Authorization header.
"""

from __future__ import annotations

import json
import shlex

QUESTION = "What is the capital of France? Answer in one word."
JUPYTER_TOKEN_ENV = "JUPYTER_TOKEN"
"""The variable snippets read the notebook server's token from, behind its proxy."""


def snippet(
    *,
    lang: str,
    api_base: str,
    model: str,
    key_env: str = "",
    key_note: str = "",
    token_env: str = "",
) -> str:
    """Client code that works against the gateway at `api_base` as it runs now."""
    note = f"# {key_note}\n" if key_note else ""
    if token_env:
        note += f"# {token_env}: the notebook server's token (its proxy lets only you in)\n"
    if lang == "python":
        return note + _python(api_base=api_base, model=model, key_env=key_env, token_env=token_env)
    if lang == "curl":
        return note + _curl(api_base=api_base, model=model, key_env=key_env, token_env=token_env)
    raise ValueError(f"unknown snippet language {lang!r}")


def _python(*, api_base: str, model: str, key_env: str, token_env: str) -> str:
    key_var = key_env or token_env
    key = f'os.environ["{key_var}"]' if key_var else '"none"'
    query = ""
    if key_env and token_env:
        query = f', default_query={{"token": os.environ["{token_env}"]}}'
    return (
        "import os\n"
        "from openai import OpenAI\n\n"
        f"client = OpenAI(base_url={api_base!r}, api_key={key}{query})\n"
        "reply = client.chat.completions.create(\n"
        f"    model={model!r},\n"
        f'    messages=[{{"role": "user", "content": "{QUESTION}"}}],\n'
        "    max_tokens=64,\n"
        "    temperature=0,\n"
        ")\n"
        "print(reply.choices[0].message.content)\n"
    )


def _curl(*, api_base: str, model: str, key_env: str, token_env: str) -> str:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 64,
            "temperature": 0,
        }
    )
    url = f"{api_base}/chat/completions"
    if key_env and token_env:
        url = f'"{url}?token=${token_env}"'
    auth = ""
    if key_env:
        auth = f' \\\n  -H "Authorization: Bearer ${key_env}"'
    elif token_env:
        auth = f' \\\n  -H "Authorization: token ${token_env}"'
    return (
        f"curl -s {url} \\\n"
        f'  -H "Content-Type: application/json"{auth} \\\n'
        f"  -d {shlex.quote(body)}\n"
    )
