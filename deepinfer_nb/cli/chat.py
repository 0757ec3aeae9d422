"""`deepinfer-nb chat NAME [PROMPT]`: talk to a deployment through the gateway.

With PROMPT: one answer, streamed to stdout as it is generated. Without: an interactive loop
(one prompt per line on stdin; the conversation is kept; an empty line, `exit` or Ctrl-D ends
it). `-o json|yaml` prints the whole answer with its usage instead of streaming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .output import add_output_flag, emit
from .remote import EXIT_USAGE, CommandError, Gateway, add_client_flags


def register(sub: Any) -> None:
    p = sub.add_parser("chat", help="chat with a deployment (streams; no PROMPT: interactive)")
    p.add_argument("name")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None)
    add_client_flags(p)
    add_output_flag(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise CommandError("--max-tokens must be >= 1", code=EXIT_USAGE)
    gw = Gateway.from_args(args)
    model = gw.get(f"/v1/deployments/{args.name}")["model_name"]
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    if args.prompt is not None:
        _turn(gw, args, model, [*history, {"role": "user", "content": args.prompt}])
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        prompt = line.strip()
        if not prompt or prompt in ("exit", "quit"):
            return 0
        history.append({"role": "user", "content": prompt})
        answer = _turn(gw, args, model, history)
        history.append({"role": "assistant", "content": answer})


def _turn(gw: Gateway, args: argparse.Namespace, model: str, messages: list[Any]) -> str:
    """One request; streams the answer to stdout (table output) and returns its text."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": args.max_tokens}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.output != "table":
        result = gw.request("POST", "/v1/chat/completions", json=body, timeout=None)
        message = result["choices"][0]["message"]
        data = {
            "content": message.get("content") or "",
            "finish_reason": result["choices"][0].get("finish_reason"),
            "usage": result.get("usage"),
        }
        emit(data, args.output, str)
        return str(data["content"])
    body["stream"] = True
    parts: list[str] = []
    for line in gw.stream_lines("/v1/chat/completions", body):
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            raise CommandError(str(chunk["error"].get("message") or chunk["error"]))
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {}).get("content") or ""
            parts.append(delta)
            print(delta, end="", flush=True)
    print(flush=True)
    return "".join(parts)
