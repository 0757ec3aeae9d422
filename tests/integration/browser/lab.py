"""A real JupyterLab on loopback and a headless Debian Chromium driving it, for browser tests.

`LabServer` starts `python -m jupyterlab` from this venv on a free 127.0.0.1 port with token auth,
isolated Jupyter config/data/runtime/settings folders and a temporary root holding the notebooks
under test. Its `python3` kernel spec is written into that isolated data folder and pinned to this
venv's interpreter, so the kernel is the project's Python whatever else is installed.
`NotebookPage` wraps a Playwright page opened on one notebook: run cells through the Run menu,
wait for execution to finish, read outputs. Playwright only drives `/usr/bin/chromium` (never a
browser build of its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from playwright.sync_api import BrowserContext, Locator, Page, sync_playwright

from deepinfer_nb.config import home_dir
from deepinfer_nb.netutil import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# JupyterLab user settings for a quiet, fully rendered notebook: no news/update toasts over the
# screenshot, and every cell kept in the DOM (windowing would drop off-screen outputs).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}
ERROR_OUTPUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]'


class LabServer:
    """One JupyterLab server process; stop() shuts its kernels down before the server."""

    def __init__(
        self, base: Path, *, env: dict[str, str] | None = None, base_url: str = "/"
    ) -> None:
        self.base = base
        self.root = base / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base_url = base_url
        """The server's path prefix (`--ServerApp.base_url`), e.g. JupyterHub's /user/NAME/."""
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = self.origin + base_url.rstrip("/")
        self.log_path = base / "jupyterlab.log"
        self._extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle ----

    def _prepare(self) -> dict[str, str]:
        data = self.base / "data"
        spec_dir = data / "kernels" / "python3"
        spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "metadata": {"debugger": False},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        settings = self.base / "settings"
        for rel, value in LAB_SETTINGS.items():
            path = settings / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(self.base / "config"),
            "JUPYTER_DATA_DIR": str(data),
            "JUPYTER_RUNTIME_DIR": str(self.base / "runtime"),
            "IPYTHONDIR": str(self.base / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
            **self._extra_env,
        }
        env.pop("JUPYTER_PATH", None)
        return env

    def start(self, *, timeout_s: float = 90.0) -> None:
        env = self._prepare()
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            f"--ServerApp.base_url={self.base_url}",
            # a taken port must fail loudly, not move silently to another one
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            f"--LabApp.user_settings_dir={self.base / 'settings'}",
            f"--LabApp.workspaces_dir={self.base / 'workspaces'}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
        ]
        if os.geteuid() == 0:  # containers and CI run as root; the server refuses it otherwise
            cmd.append("--allow-root")
        with self.log_path.open("wb") as log:  # the server keeps its own copy of the fd
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterlab exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.api("GET", "/api/status").get("started"):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"jupyterlab not up after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, *, timeout_s: float = 60.0) -> None:
        """Shut the kernels down through the server (so the kernel's own exit handlers run),
        then the server itself."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                for kernel in self.kernels():
                    self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout_s=timeout_s)
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    # ---- REST ----

    def api(self, method: str, path: str, *, timeout_s: float = 10.0) -> Any:
        req = urllib.request.Request(
            self.url + path,
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def kernels(self) -> list[dict[str, Any]]:
        return list(self.api("GET", "/api/kernels"))

    def kernel_processes(self) -> list[psutil.Process]:
        """The kernel processes this server started (children running ipykernel_launcher)."""
        assert self.proc is not None
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "ipykernel_launcher" in child.cmdline():
                    found.append(child)
        return found

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, on a fresh profile folder (a persistent context is how
    Playwright takes a user-data dir)."""
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run `make system-deps` (Debian's chromium)")
    shutil.rmtree(profile, ignore_errors=True)
    profile.mkdir(parents=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


class NotebookPage:
    """One open notebook in JupyterLab."""

    def __init__(self, page: Page) -> None:
        self.page = page

    def open(self, url: str, *, timeout_s: float = 120.0) -> None:
        self.page.goto(url)
        # the kernel has started and answered when the status bar names it and reads Idle
        # (before that it reads "No Kernel | Initializing", and Run All would do nothing)
        self.page.locator(".jp-StatusBar-Widget").get_by_text(
            re.compile(r"^(?!No Kernel).+ \| Idle$")
        ).first.wait_for(timeout=timeout_s * 1000)

    @property
    def cells(self) -> Locator:
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")

    def code_cells(self) -> Locator:
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell")

    def run_menu(self, item: str, *, cells: list[int], attempts: int = 3) -> None:
        """Run > item, through the menu bar as a user would, until code cells `cells` show that
        they were queued or ran. On a loaded machine a menu click can land while the menu is
        still opening and do nothing; the prompt of a queued cell turns to [*] at once in the
        page (before the kernel sees anything), so a click that did nothing is safe to repeat."""
        label = self.page.locator(
            ".lm-Menu-itemLabel", has_text=re.compile(rf"^{re.escape(item)}$")
        )
        for _ in range(attempts):
            self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            entry = self.page.locator(".lm-Menu-item:not(.lm-mod-disabled)").filter(has=label)
            entry.wait_for()
            entry.click()
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                prompts = self.prompts()
                if all(prompts[i] != "[ ]:" for i in cells):
                    return
                time.sleep(0.5)
            print(f"Run > {item} started nothing; trying again", file=sys.stderr)
            self.page.keyboard.press("Escape")  # close the menu if it is still open
        raise AssertionError(f"Run > {item} did not start cells {cells}: {self.prompts()}")

    def select_cell(self, index: int) -> None:
        """Select cell `index` (negative from the end) by clicking its input prompt."""
        cells = self.cells
        cell = cells.nth(index if index >= 0 else cells.count() + index)
        cell.locator(".jp-InputPrompt").click()

    def prompts(self) -> list[str]:
        return [
            p.strip() for p in self.code_cells().locator(".jp-InputArea-prompt").all_inner_texts()
        ]

    def errors(self) -> list[str]:
        return self.page.locator(ERROR_OUTPUT).all_inner_texts()

    def wait_executed(self, cell_indices: list[int], *, timeout_s: float) -> None:
        """Wait until the given code cells (indices among code cells) show an execution count,
        failing at once on an error output."""
        deadline = time.monotonic() + timeout_s
        while True:
            errors = self.errors()
            if errors:
                raise AssertionError("a cell failed:\n" + "\n---\n".join(errors))
            prompts = self.prompts()
            if all(re.fullmatch(r"\[\d+\]:", prompts[i]) for i in cell_indices):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cells not executed after {timeout_s:.0f}s: {prompts}")
            time.sleep(1.0)

    def output_text(self, code_index: int) -> str:
        return self.code_cells().nth(code_index).locator(".jp-OutputArea").inner_text()


def engine_processes(home: Path) -> list[psutil.Process]:
    """Engine shims started under DEEPINFER_HOME `home` (other tests' engines differ)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "deepinfer_nb.engine" in " ".join(proc.info["cmdline"] or []) and (
                proc.environ().get("DEEPINFER_HOME") == str(home)
            ):
                found.append(proc)
    return found


def wait_gone(home: Path, timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := engine_processes(home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@contextlib.contextmanager
def isolated_home(base: Path) -> Iterator[Path]:
    """A fresh deepinfer home (state, logs) sharing the built models; engines left there are
    killed at the end so a failed run does not leak them into the rest of the suite."""
    home = base / "home"
    home.mkdir()
    (home / "models").symlink_to(home_dir() / "models")
    try:
        yield home
    finally:
        for proc in engine_processes(home):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    child.kill()
                proc.kill()
