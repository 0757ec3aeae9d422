"""`deepinfer-nb apply -f FILE [--prune] [--dry-run]` and `deepinfer-nb export [-f FILE]`.

The file (YAML or JSON) lists deployments as the deployments API takes them:

    deployments:
      - name: chat
        model: smollm2-135m-instruct
        device: cpu
        replicas: 2
        max_model_len: 2048

`apply` PUTs each one (created / updated, which rolls its engines / unchanged: it says which);
`--prune` deletes the deployments the file does not list; `--dry-run` prints what would change,
field by field, and changes nothing. `export` writes every deployment in that form (fields at
their defaults left out; env values shown as "***", which `apply` reads as "keep the current
value"), so `export` then `apply` changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..control import specfile
from ..models import DeploymentSpec
from .output import note
from .remote import EXIT_USAGE, CommandError, Gateway, add_client_flags


def register(sub: Any) -> None:
    p = sub.add_parser("apply", help="create/update deployments from a YAML or JSON file")
    p.add_argument("-f", "--file", required=True, help="the file ('-' reads stdin)")
    p.add_argument("--prune", action="store_true", help="delete deployments not in the file")
    p.add_argument("--dry-run", action="store_true", help="print the changes, make none")
    add_client_flags(p)
    p.set_defaults(func=_apply)
    p = sub.add_parser("export", help="write the deployments as a file `apply` accepts")
    p.add_argument("-f", "--file", default="-", help="where to write (default stdout)")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    add_client_flags(p)
    p.set_defaults(func=_export)


def read_file(path: str) -> list[dict[str, Any]]:
    """The deployments listed in `path` (a `deployments:` list, a bare list, or one mapping)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}", code=EXIT_USAGE) from None
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise CommandError(f"{path}: not YAML or JSON: {exc}", code=EXIT_USAGE) from None
    items = data.get("deployments") if isinstance(data, dict) and "deployments" in data else data
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CommandError(
            f"{path}: expected `deployments:` with a list of deployments", code=EXIT_USAGE
        )
    names = [str(i.get("name", "")) for i in items]
    for i, name in enumerate(names):
        if not name:
            raise CommandError(f"{path}: deployment #{i + 1} has no name", code=EXIT_USAGE)
        if names.count(name) > 1:
            raise CommandError(f"{path}: {name} is listed twice", code=EXIT_USAGE)
        _spec(items[i], f"{path}: {name}")  # every entry valid before anything is written
    return items


def diff(current: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    """`field: old -> new` lines between a deployment's view and a file entry."""
    new = specfile.fields(_spec(wanted, wanted["name"]))
    if current is None:
        return []
    old = specfile.fields(_spec(_spec_fields(current), current["name"]))
    return [
        f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def _spec_fields(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in view.items() if k in DeploymentSpec.model_fields}


def _spec(data: dict[str, Any], where: str) -> DeploymentSpec:
    unknown = sorted(set(data) - set(DeploymentSpec.model_fields))
    if unknown:
        raise CommandError(f"{where}: unknown field {unknown[0]!r}", code=EXIT_USAGE)
    try:
        return DeploymentSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "value"
        raise CommandError(f"{where}: {loc}: {first['msg']}", code=EXIT_USAGE) from None


def _apply(args: argparse.Namespace) -> int:
    items = read_file(args.file)
    gw = Gateway.from_args(args)
    current = {v["name"]: v for v in gw.get("/v1/deployments")["data"]}
    wanted = {i["name"] for i in items}
    prefix = "(dry run) " if args.dry_run else ""
    for item in items:
        name = item["name"]
        if args.dry_run:
            changes = diff(current.get(name), item)
            verb = "create" if name not in current else ("update" if changes else "unchanged")
            print(f"{prefix}{name}: {verb}", flush=True)
            for line in changes:
                print(f"  {line}", flush=True)
            continue
        view = gw.request("PUT", f"/v1/deployments/{name}", json=item)
        print(f"{name}: {view['change']}", flush=True)
    if args.prune:
        for name in sorted(set(current) - wanted):
            if not args.dry_run:
                gw.request("DELETE", f"/v1/deployments/{name}")
            print(f"{prefix}{name}: {'delete' if args.dry_run else 'deleted'}", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    views = Gateway.from_args(args).get("/v1/deployments")["data"]
    specs = [_spec(_spec_fields(v), v["name"]) for v in views]
    text = specfile.dump(specs)  # env values arrive masked from the gateway already
    if args.output == "json":
        text = json.dumps(yaml.safe_load(text), indent=2) + "\n"
    if args.file == "-":
        sys.stdout.write(text)
    else:
        Path(args.file).write_text(text)
        note(f"{len(specs)} deployment(s) written to {args.file}")
    return 0
