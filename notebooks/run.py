"""Run a notebook headless (the README's quickstart command) and print each cell's key output.

    python notebooks/run.py notebooks/quickstart.ipynb [--save executed.ipynb]

Cells run in a real kernel of this Python (nbclient), in order; a failing cell stops the run
with its error and exit status 1. Widget outputs print their text fallback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

MAX_LINES = 12


def text_of(output: nbformat.NotebookNode) -> str:
    if output.get("output_type") == "stream":
        return str(output.get("text", ""))
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    data = output.get("data", {})
    for mime in ("text/markdown", "text/plain"):
        if mime in data:
            return str(data[mime])
    return ""


class PrintingClient(NotebookClient):
    """Prints each code cell's outputs as soon as the cell finishes."""

    async def async_execute_cell(
        self,
        cell,
        cell_index,
        execution_count=None,  # type: ignore[no-untyped-def]
        store_history=True,
    ):
        started = time.monotonic()
        try:
            return await super().async_execute_cell(
                cell, cell_index, execution_count, store_history
            )
        finally:
            if cell.cell_type == "code":
                head = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                print(f"\n[{cell_index}] {head}   ({time.monotonic() - started:.1f} s)")
                lines = (
                    "\n".join(text_of(o).rstrip("\n") for o in cell.get("outputs", []))
                    .strip()
                    .splitlines()
                )
                for line in lines[:MAX_LINES]:
                    print(textwrap.indent(line, "    "))
                if len(lines) > MAX_LINES:
                    print(f"    ... ({len(lines) - MAX_LINES} more lines)")
                sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--save", type=Path, help="write the executed notebook here")
    parser.add_argument("--timeout", type=int, default=900, help="per-cell timeout in seconds")
    args = parser.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    client = PrintingClient(
        nb,
        timeout=args.timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(args.notebook.parent)}},
    )
    print(f"running {args.notebook} headless", flush=True)
    try:
        client.execute()
    except CellExecutionError as exc:
        print(f"\nfailed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    finally:
        if args.save:
            nbformat.write(nb, args.save)
    print(f"\n{args.notebook} ran to the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
