"""grpc_env: importing the package sets GRPC_EXPERIMENTS before grpc loads, the installed grpcio
knows both experiments, and a user's own setting (or an earlier grpc import) is left alone.

Each case runs in a fresh interpreter: grpc reads the variable once, when it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

from deepinfer_nb import grpc_env

SHOW = "import os; print(os.environ.get('GRPC_EXPERIMENTS', 'unset'))"


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_package_import_sets_the_experiments_grpc_knows() -> None:
    out = _python(f"import deepinfer_nb, grpc; {SHOW}")
    assert out.stdout.strip() == grpc_env.EXPERIMENTS
    # grpc logs this at import for a name it does not have (a newer grpcio that dropped it)
    assert "Unknown experiment" not in out.stderr, out.stderr


def test_user_setting_kept() -> None:
    out = _python(f"import deepinfer_nb; {SHOW}", GRPC_EXPERIMENTS="event_engine_client")
    assert out.stdout.strip() == "event_engine_client"


def test_grpc_imported_first_is_left_alone() -> None:
    out = _python(f"import grpc, deepinfer_nb; {SHOW}")
    assert out.stdout.strip() == "unset"
