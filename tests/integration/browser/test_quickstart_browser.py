"""The quickstart as a user runs it: JupyterLab in headless Chromium, the real notebook, a real
engine; the engine monitor widget renders a Running row; nothing is left running afterwards.

The notebook is an unchanged copy of notebooks/quickstart.ipynb. Its last cell is
`%deepinfer down`, so the test selects that cell, runs Run > "Run All Above Selected Cell",
inspects the live monitor and takes the screenshot while the engine runs, then runs the last
cell itself: the whole notebook runs, in order, through the browser.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from .lab import LabServer, NotebookPage, chromium, engine_processes, isolated_home, wait_gone

pytestmark = [pytest.mark.browser, pytest.mark.engine]

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = ROOT / "notebooks" / "quickstart.ipynb"
ARTIFACTS = ROOT / ".artifacts" / "browser"
RUN_TIMEOUT_S = 420.0  # engine start-up is ~30 s alone, minutes on busy CPUs


@pytest.fixture
def deepinfer_home(tmp_path: Path) -> Iterator[Path]:
    with isolated_home(tmp_path) as home:
        yield home


def code_index(nb: nbformat.NotebookNode, text: str) -> int:
    """Position among code cells of the first code cell whose source contains `text`."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    return next(i for i, c in enumerate(code) if text in c.source)


def test_quickstart_in_jupyterlab(tmp_path: Path, deepinfer_home: Path) -> None:
    nb_source = nbformat.read(QUICKSTART, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb_source.cells)
    assert nb_source.cells[-1].source.strip() == "%deepinfer down", "quickstart must end in down"
    monitor_at = code_index(nb_source, "%deepinfer monitor")
    chat_at = code_index(nb_source, "%%deepinfer chat")
    openai_at = code_index(nb_source, "deepinfer_nb.connect()")

    lab = LabServer(tmp_path / "lab", env={"DEEPINFER_HOME": str(deepinfer_home)})
    shutil.copy(QUICKSTART, lab.root / "quickstart.ipynb")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    lab.start()
    try:
        with chromium(tmp_path / "profile") as browser:
            page = browser.new_page()
            nb = NotebookPage(page)
            try:
                nb.open(lab.notebook_url("quickstart.ipynb"))
                kernels = lab.kernel_processes()
                assert [k.cmdline()[0] for k in kernels] == [sys.executable]

                nb.select_cell(-1)
                nb.run_menu("Run All Above Selected Cell", cells=[0])
                nb.wait_executed(list(range(n_code - 1)), timeout_s=RUN_TIMEOUT_S)

                assert "Paris" in nb.output_text(chat_at)
                assert "openai:" in nb.output_text(openai_at)
                # the live ipywidgets view (a widget VBox), not the saved HTML fallback
                monitor = nb.code_cells().nth(monitor_at).locator(".jupyter-widgets.widget-vbox")
                monitor.first.wait_for(timeout=30_000)
                running = monitor.locator("table tr", has_text="Running")
                running.first.wait_for(timeout=30_000)
                assert "smol" in running.first.inner_text()
                assert "2 running" in monitor.first.inner_text()  # vLLM and llama.cpp
                # one poll later the live metrics columns have numbers (KV % of the engine)
                time.sleep(2.5)
                monitor.first.scroll_into_view_if_needed()
                page.screenshot(path=str(ARTIFACTS / "quickstart.png"))

                assert engine_processes(deepinfer_home), "no engine process while Running"
                nb.select_cell(-1)
                nb.run_menu("Run Selected Cell", cells=[n_code - 1])
                nb.wait_executed([n_code - 1], timeout_s=120)
                assert "stopped" in nb.output_text(n_code - 1)
                assert not wait_gone(deepinfer_home, 15), "an engine outlived `down`"
            except BaseException:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(ARTIFACTS / "quickstart-failure.png"))
                print(lab.log_tail(), file=sys.stderr)
                raise
    finally:
        lab.stop()
    assert not wait_gone(deepinfer_home, 15), "an engine outlived the kernel"
