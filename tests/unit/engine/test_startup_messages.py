"""The shim's start-up messages and process helpers, without loading a model: the model check,
the one-line cause (quoted from a child's stderr), and ending a process tree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pydantic
import pytest

from deepinfer_nb.engine.__main__ import StartupError, explain, resolve_model
from deepinfer_nb.engine.process import end_processes
from deepinfer_nb.engine.stderr_tail import last_error_line

# Lines as vLLM 0.32 (CPU) writes them when the KV cache does not fit (from a real run).
KV_FAILURE = """\
(Worker pid=28987) ERROR 11-27 00:05:35 [multiproc_executor.py:1063]     raise ValueError(
(Worker pid=28987) ERROR 11-27 00:05:35 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (11.79/18.46 GiB) on kv cache allocation is less than requested memory for kv (100000.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by other processes.
(EngineCore pid=28676) ERROR 11-27 00:05:35 [core.py:1510] EngineCore failed to start.
(EngineCore pid=28676) ERROR 11-27 00:05:35 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=28676) ERROR 11-27 00:05:35 [core.py:1510] RuntimeError: Worker failed with error 'Available memory on node 0 (11.79/18.46 GiB) on kv cache allocation is less than requested memory for kv (100000.0 GiB).', please check the stack trace above for the root cause
(MainProcess pid=28247) INFO 11-27 00:05:36 [utils.py:628] [shutdown] Process manager: send sigterm
"""  # noqa: E501


def test_last_error_line_unwraps_the_workers_error() -> None:
    line = last_error_line(KV_FAILURE.splitlines())
    assert line.startswith("Available memory on node 0")
    assert "requested memory for kv (100000.0 GiB)" in line


def test_last_error_line_falls_back_to_an_error_log_line() -> None:
    lines = [
        "(EngineCore pid=1) INFO 11-27 00:00:00 [a.py:1] loading",
        "(EngineCore pid=1) ERROR 11-27 00:00:01 [b.py:2] the weights file is truncated",
        "(EngineCore pid=1) ERROR 11-27 00:00:01 [core.py:3] EngineCore failed to start.",
    ]
    assert last_error_line(lines) == "the weights file is truncated"
    assert last_error_line(["INFO 11-27 00:00:00 [a.py:1] all fine"]) == ""


def core_failure() -> RuntimeError:
    try:
        raise RuntimeError(
            "Engine core initialization failed. See root cause above. Failed core proc(s): {}"
        )
    except RuntimeError as exc:
        return exc


def test_explain_quotes_the_core_and_names_memory() -> None:
    child = last_error_line(KV_FAILURE.splitlines())
    text = explain(core_failure(), child_error=child)
    assert text.startswith("Available memory on node 0") and "(in the engine core)" in text
    assert "out of memory" in text and "VLLM_CPU_KVCACHE_SPACE" in text
    assert "\n" not in text
    assert "logged above" not in explain(core_failure())


def test_explain_main_process_errors_and_pydantic_messages() -> None:
    class Config(pydantic.BaseModel):
        max_model_len: int

        @pydantic.field_validator("max_model_len")
        @classmethod
        def fits(cls, v: int) -> int:
            raise ValueError(f"max_model_len ({v}) is greater than the model's 2048")

    with pytest.raises(pydantic.ValidationError) as err:
        Config(max_model_len=99999)
    text = explain(err.value)
    assert "max_model_len (99999) is greater than the model's 2048" in text
    assert "validation error for" not in text


def test_resolve_model_checks_paths_and_aliases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(StartupError, match=r"model not found: .* without config\.json"):
        resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)) == str(folder)
    for name, phrase in [
        (str(tmp_path / "absent"), "no such folder"),
        ("smollm3", "not a local alias"),
        ("SomeOrg/some-model", "not in the Hugging Face cache"),
    ]:
        with pytest.raises(StartupError, match=rf"model not found: {re.escape(name)} .*{phrase}"):
            resolve_model(name)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("SomeOrg/some-model") == "SomeOrg/some-model"  # vLLM may download it


def test_end_processes_ends_a_sigterm_ignoring_child_without_waiting() -> None:
    ready = "print('ready', flush=True); time.sleep(60)"
    stubborn = f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); {ready}"
    polite = f"import time; {ready}"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for code in (stubborn, polite)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        start = time.monotonic()
        left = end_processes([psutil.Process(p.pid) for p in procs], grace_s=10.0)
        assert left == []
        assert time.monotonic() - start < 5.0  # the stubborn one got SIGKILL, not the grace
        assert not any(psutil.pid_exists(p.pid) for p in procs)  # ended and reaped
    finally:
        for p in procs:
            p.kill()
            p.wait()
            assert p.stdout is not None
            p.stdout.close()


def test_stderr_tail_sees_what_a_child_writes() -> None:
    script = textwrap.dedent(
        """
        import subprocess, sys
        from deepinfer_nb.engine.stderr_tail import StderrTail
        tail = StderrTail()
        tail.start()
        subprocess.run([sys.executable, "-c",
                        "import sys; sys.stderr.write('Traceback (most recent call last):\\\\n'"
                        "'ValueError: boom in the child\\\\n')"])
        tail.settle()
        print("QUOTED:" + tail.last_error())
        tail.stop()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert "QUOTED:ValueError: boom in the child" in done.stdout, done.stderr
    assert "ValueError: boom in the child" in done.stderr  # still written through


def test_a_python_without_vllm_is_named_with_what_to_install() -> None:
    # The shim as a worker starts it, in an interpreter where vLLM cannot be found.
    block = (
        "import runpy, sys; sys.modules['vllm'] = None; "
        "runpy.run_module('deepinfer_nb.engine', run_name='__main__')"
    )
    argv = ["--model", "smollm2-135m-instruct", "--port", "0", "--device", "cuda:0"]
    proc = subprocess.run(
        [sys.executable, "-c", block, *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"deepinfer-nb engine: vLLM is not installed for {sys.executable}")
    assert "pip install 'deepinfer-nb[gpu]' on a CUDA host" in last and "--engine-python" in last


def test_a_broken_vllm_install_is_named_with_its_import_error(tmp_path: Path) -> None:
    # A vLLM that is there but fails to import (as one built for another torch does).
    broken = tmp_path / "site" / "vllm" / "engine"
    broken.mkdir(parents=True)
    (broken.parent / "__init__.py").write_text("")
    (broken / "__init__.py").write_text("raise ImportError('libtorch_cuda.so: cannot open')\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "deepinfer_nb.engine", "--model", str(model), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"deepinfer-nb engine: vLLM cannot be imported for {sys.executable}")
    assert "(libtorch_cuda.so: cannot open)" in last
