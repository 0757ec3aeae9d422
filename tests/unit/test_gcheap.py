"""`freeze_heap`, in a fresh interpreter: frozen objects stay frozen for the process's life."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import gc
from deepinfer_nb.procenv import freeze_heap
assert gc.get_freeze_count() == 0
frozen = freeze_heap()
assert frozen == gc.get_freeze_count() > 1000, frozen
"""


def test_freeze_heap_moves_start_up_objects_out_of_collections() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
