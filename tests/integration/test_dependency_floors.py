"""The dependency floors in pyproject.toml are true: the base package (no engine or notebook extras)
installed into an empty venv with every core dependency pinned `==` its floor imports and passes a
smoke test (the generated gRPC code against the protobuf/grpcio floors, the etcd client, the memory
store, the models, the controller and worker modules, the GPU probe).

pip resolves the pins from the registry like a user's install (`--constraint` makes it take each
floor); the package is built from a copy of the source, so the checkout stays clean.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

SMOKE = """
import asyncio, importlib.metadata as md, json, sys
import deepinfer_nb
from deepinfer_nb._proto import engine_service_pb2 as pb, engine_service_pb2_grpc  # noqa: F401
from deepinfer_nb.config import Settings
from deepinfer_nb.control import controller, worker  # noqa: F401
from deepinfer_nb.engine.client import EngineClient  # noqa: F401
from deepinfer_nb.gpu import probe
from deepinfer_nb.models import DeploymentSpec, decode
from deepinfer_nb.store import keys, open_store
from deepinfer_nb.store.etcd import EtcdStore  # noqa: F401

async def main():
    store = open_store("memory://")
    spec = DeploymentSpec(name="smoke", model="m", replicas=2)
    await store.put(keys.deployment("smoke"), spec.encode())
    kv = await store.get(keys.deployment("smoke"))
    assert decode(DeploymentSpec, kv.key, kv.value) == spec
    await store.close()

asyncio.run(main())
assert pb.ChatRequest(request_id="x").SerializeToString()
Settings.load(env={})
probe()
print(json.dumps({"version": deepinfer_nb.__version__, **{
    n: md.version(n) for n in sys.argv[1:]}}))
"""


def floors() -> dict[str, str]:
    """`name -> floor` for each core dependency with a `>=` floor that applies to this Python."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        if "python_version" in dep:  # tomli, for Python < 3.11 only
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", dep)
        assert m, f"core dependency without a >= floor: {dep!r}"
        out[m.group(1)] = m.group(2)
    return out


def test_the_base_package_works_with_its_floors(tmp_path: Path) -> None:
    pins = floors()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "deepinfer_nb", src / "deepinfer_nb", ignore=shutil.ignore_patterns("__pycache__")
    )
    constraints = tmp_path / "floors.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--constraint", str(constraints), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    smoke = subprocess.run(
        [python, "-c", SMOKE, *pins],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: the installed package is what is imported
        env={"PATH": "/usr/bin:/bin"},
    )
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    installed = json.loads(smoke.stdout.strip().splitlines()[-1])
    for name, floor in pins.items():
        assert Version(installed[name]) == Version(floor), (name, installed[name], floor)
    assert installed["version"] != "0+unknown"
