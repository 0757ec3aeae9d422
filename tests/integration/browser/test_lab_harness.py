"""The browser harness itself: JupyterLab + Chromium run a small notebook and render a widget.

Cheap (no engine), so a broken harness (server flags, kernel spec, widget manager, menu
selectors) shows up here with a clear cause rather than as a time-out in the quickstart test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

from .lab import LabServer, NotebookPage, chromium

pytestmark = pytest.mark.browser


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_markdown_cell("# harness"),
        nbformat.v4.new_code_cell("import sys\nprint('kernel python:', sys.executable)"),
        nbformat.v4.new_code_cell(
            "import ipywidgets as w\nslider = w.IntSlider(value=7, description='seven')\nslider"
        ),
        nbformat.v4.new_code_cell("print('sum', sum(range(10)))"),
    ]
    return nb


def test_lab_runs_notebook_and_renders_widget(tmp_path: Path) -> None:
    lab = LabServer(tmp_path)
    nbformat.write(_notebook(), str(lab.root / "harness.ipynb"))
    lab.start()
    try:
        kernels_before = lab.kernels()
        assert kernels_before == []
        with chromium(tmp_path / "profile") as browser:
            page = browser.new_page()
            nb = NotebookPage(page)
            nb.open(lab.notebook_url("harness.ipynb"))
            nb.run_menu("Run All Cells", cells=[0, 1, 2])
            nb.wait_executed([0, 1, 2], timeout_s=60)

            assert f"kernel python: {sys.executable}" in nb.output_text(0)
            assert "sum 45" in nb.output_text(2)
            # the live widget (not a text fallback): a slider view holding the value
            slider = nb.code_cells().nth(1).locator(".jupyter-widgets.widget-slider")
            slider.wait_for(timeout=10_000)
            assert slider.locator(".widget-readout").inner_text().strip() == "7"
            assert "seven" in slider.inner_text()
            page.close()
        procs = lab.kernel_processes()
        assert len(procs) == 1 and procs[0].cmdline()[0] == sys.executable
    finally:
        lab.stop()
