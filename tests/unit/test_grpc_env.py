"""gRPC settings (`procenv`): importing the package leaves os.environ alone; our own processes (the
`deepinfer-nb` command, the engine shim and what we spawn) get GRPC_EXPERIMENTS before grpc loads;
the installed grpcio knows both experiments; a user's own setting is left alone.

Each case runs in a fresh interpreter: grpc reads the variable once, when it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

from deepinfer_nb import procenv
from deepinfer_nb.engine.process import shim_env

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


def test_importing_the_package_leaves_the_environment_alone() -> None:
    code = (
        "import os; before = dict(os.environ)\n"
        "import deepinfer_nb, deepinfer_nb.client.cluster, deepinfer_nb.services, grpc\n"
        "print(dict(os.environ) == before)"
    )
    assert _python(code).stdout.strip() == "True"


def test_our_own_process_sets_the_experiments_grpc_knows() -> None:
    code = (
        f"from deepinfer_nb import procenv; procenv.apply_grpc_experiments(); import grpc; {SHOW}"
    )
    out = _python(code)
    assert out.stdout.strip() == procenv.GRPC_EXPERIMENTS
    # grpc logs this at import for a name it does not have (a newer grpcio that dropped it)
    assert "Unknown experiment" not in out.stderr, out.stderr


def test_the_command_sets_them_before_any_subcommand_runs() -> None:
    code = (
        "import sys\nfrom deepinfer_nb.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"{SHOW}"
    )
    out = _python(code)
    assert out.stdout.strip().splitlines()[-1] == procenv.GRPC_EXPERIMENTS


def test_spawned_engines_get_them_and_a_user_setting_is_kept() -> None:
    assert shim_env({})["GRPC_EXPERIMENTS"] == procenv.GRPC_EXPERIMENTS
    assert shim_env({"GRPC_EXPERIMENTS": ""})["GRPC_EXPERIMENTS"] == ""
    out = _python(
        f"from deepinfer_nb import procenv; procenv.apply_grpc_experiments(); {SHOW}",
        GRPC_EXPERIMENTS="event_engine_client",
    )
    assert out.stdout.strip() == "event_engine_client"


def test_grpc_imported_first_is_left_alone() -> None:
    out = _python(
        f"import grpc; from deepinfer_nb import procenv; procenv.apply_grpc_experiments(); {SHOW}"
    )
    assert out.stdout.strip() == "unset"
