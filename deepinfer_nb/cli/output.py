"""How the deployment commands print: human tables by default, `-o json|yaml` for scripts.

Tables reuse the notebook's rows and columns (`client.render`), so `deepinfer-nb ls` and
`%deepinfer ls` show the same thing. Progress and notes go to stderr, results to stdout, so
`-o json` output can be piped as is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import yaml

FORMATS = ("table", "json", "yaml")


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="table (default, for people), json or yaml (for scripts)",
    )


def emit(data: Any, fmt: str, human: Callable[[Any], str]) -> None:
    """Print `data` as `fmt`; "table" prints `human(data)`."""
    if fmt == "json":
        text = json.dumps(data, indent=2)
    elif fmt == "yaml":
        text = yaml.safe_dump(data, sort_keys=False).rstrip()
    else:
        text = human(data)
    print(text, flush=True)


def note(message: str) -> None:
    """A progress or status line for people (stderr: never mixed into -o json output)."""
    print(message, file=sys.stderr, flush=True)
