"""vLLM's children as forks of a warm server (engine/warmfork.py), without vLLM: what a child
must get from its requester (environment, stdout, OpenMP binding as CPU affinity), the binding
forms vLLM writes, and the pooled process's assignment line (engine/pooled.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deepinfer_nb.engine import warmfork
from deepinfer_nb.engine.pooled import Assignment, read_assignment


def test_openmp_binding_forms_vllm_writes() -> None:
    assert warmfork.omp_cpus({"OMP_PLACES": "{0,2-3}", "OMP_PROC_BIND": "true"}) == [0, 2, 3]
    assert warmfork.omp_cpus({"OMP_PLACES": "{0,1}"}) == []  # places without binding
    assert warmfork.omp_cpus({"GOMP_CPU_AFFINITY": "4 5"}) == [4, 5]
    kmp = {"KMP_AFFINITY": "granularity=fine,explicit,proclist=[1,3]"}
    assert warmfork.omp_cpus(kmp) == [1, 3]
    assert warmfork.omp_cpus({}) == []


def test_assignment_line_round_trip() -> None:
    sent = Assignment(argv=["--model", "m"], env={"A": "1"}, log="/tmp/x.log")
    got = read_assignment(sent.encode().decode())
    assert got is not None and (got.argv, got.env, got.log) == (
        ["--model", "m"],
        {"A": "1"},
        "/tmp/x.log",
    )
    assert read_assignment("") is None  # EOF: the worker let the process go


def _report(path: str) -> None:
    print("child stdout", flush=True)
    cpus = sorted(os.sched_getaffinity(0))
    Path(path).write_text(json.dumps({"env": os.environ.get("WARM_TEST"), "cpus": cpus}))


def test_a_child_gets_the_requesters_environment_stdout_and_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(warmfork, "PRELOAD", ("deepinfer_nb.engine.warmfork",))  # no torch here
    warmfork.start_server()
    try:
        cpu = min(os.sched_getaffinity(0))
        # set after the server started: a plain forkserver child would not see them
        monkeypatch.setenv("WARM_TEST", "set later")
        monkeypatch.setenv("OMP_PLACES", f"{{{cpu}}}")
        monkeypatch.setenv("OMP_PROC_BIND", "true")
        out = tmp_path / "out.json"
        child = warmfork.WarmContext().Process(target=_report, args=(str(out),))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert json.loads(out.read_text()) == {"env": "set later", "cpus": [cpu]}
        assert "child stdout" in capfd.readouterr().out
    finally:
        warmfork.stop_server()
