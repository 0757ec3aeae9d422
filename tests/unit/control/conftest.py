"""Fixtures for the launcher and worker unit tests: a fake engine "python" (see fake_engine.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).with_name("fake_engine.py")


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    """An executable that, called as `PY -m deepinfer_nb.engine ...`, runs the fake engine."""
    path = tmp_path / "fake-python"
    # `-c GUARD ...` is the launcher's parent-death guard: run it with the real Python (it then
    # execs this script again with `-m deepinfer_nb.engine ...`).
    path.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
        f'shift 2\nexec {sys.executable} {FAKE} "$@"\n'
    )
    path.chmod(0o755)
    return str(path)
