"""`deepinfer-nb models list|build|path`: the local model catalog."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..engine import local_models
from ..errors import ModelError


def register(sub: Any) -> None:
    parser = sub.add_parser("models", help="list and build local models (offline demo models)")
    msub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    msub.add_parser("list", help="the local catalog and what is built").set_defaults(func=_list)
    build = msub.add_parser("build", help="build a local model folder (idempotent)")
    build.add_argument("name", help="alias, e.g. smollm2 or all-minilm-l6-v2")
    build.add_argument("--force", action="store_true", help="rebuild even if already built")
    build.set_defaults(func=_build)
    path = msub.add_parser("path", help="print the folder a model name resolves to")
    path.add_argument("name")
    path.set_defaults(func=_path)


def _entry(name: str) -> local_models.LocalModel:
    model = local_models.lookup(name)
    if model is None:
        known = ", ".join(local_models.CATALOG)
        raise ModelError(f"unknown local model {name!r} (known: {known})")
    return model


def _list(args: argparse.Namespace) -> int:
    for model in local_models.CATALOG.values():
        state = "built" if local_models.is_built(model) else "not built"
        print(f"{model.alias:28} {state:10} {model.description}")
    return 0


def _build(args: argparse.Namespace) -> int:
    model = _entry(args.name)
    path = local_models.build(model, force=args.force, progress=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


def _path(args: argparse.Namespace) -> int:
    print(local_models.resolve(args.name, build_missing=False))
    return 0
