"""The gateway reached as on a remote notebook server: JupyterLab under `/user/alice/` with a
token and jupyter-server-proxy, a kernel that runs `%deepinfer up` and a llama.cpp deployment;
then, from outside the kernel, the openai client on the URL `%deepinfer gateway` printed plus the
Jupyter token gets "Paris" (plain and streamed through the proxy), the landing page, its links and
the docs page load through the proxy, and in headless Chromium the link in the notebook output
opens the landing page, whose docs page renders Swagger UI from the gateway's own files and runs
"Try it out" through the proxy.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nbformat
import openai
import pytest
from playwright.sync_api import Page

from .lab import LabServer, NotebookPage, chromium, engine_processes, isolated_home, wait_gone

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / ".artifacts" / "browser"
BASE_URL = "/user/alice/"
PARIS = "What is the capital of France? Answer in one word."
CELLS = [
    "%load_ext deepinfer_nb",
    "%deepinfer up --gateway-port 0",
    "%deepinfer deploy smollm2-135m-instruct-gguf --name smol --engine llama.cpp --wait",
    "%deepinfer gateway",
    "%deepinfer down",
]
GATEWAY_CELL = 3
EXTERNAL = re.compile(r"OpenAI base URL for external clients: (\S+)")


def _notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    return nb


def _outside_the_kernel(lab: LabServer, api_base: str) -> None:
    """What a client elsewhere does with the printed URL and the Jupyter token."""
    client = openai.OpenAI(base_url=api_base, api_key=lab.token, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": PARIS}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    # jupyter-server-proxy forwards a response as it arrives only for `Accept: text/event-stream`
    # (it buffers anything else): what a streaming client behind it should send
    stream = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": PARIS}],
        max_tokens=16,
        temperature=0,
        stream=True,
        extra_headers={"Accept": "text/event-stream"},
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([d for d in deltas if d]) > 1 and "Paris" in "".join(deltas)
    # and the tokens arrive as they are made: spread over the generation, where a buffered
    # answer would hand them all over at one instant
    arrivals = []
    for chunk in client.completions.create(
        model="smol",
        prompt="Count: one, two, three,",
        max_tokens=48,
        temperature=0,
        stream=True,
        extra_headers={"Accept": "text/event-stream"},
    ):
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.monotonic())
    assert len(arrivals) > 10 and arrivals[-1] - arrivals[0] > 0.1, arrivals

    root = api_base.removesuffix("v1")
    auth = {"Authorization": f"token {lab.token}"}
    with httpx.Client(headers=auth, timeout=30) as http:
        page = http.get(root)
        assert page.status_code == 200
        # the page's own Python example, run elsewhere with the token in its variable
        example = re.search(r"<code class='python'>(.*?)</code>", page.text, re.S)
        assert example, page.text
        env = {**os.environ, "JUPYTER_TOKEN": lab.token}
        ran = subprocess.run(
            [sys.executable, "-c", html.unescape(example.group(1))],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Paris" in ran.stdout, ran.stderr
        listing = http.get(root, headers={"Accept": "application/json"}).json()
        smol = next(d for d in listing["deployments"] if d["name"] == "smol")
        assert (smol["state"], smol["engine"]) == ("Running", "llama.cpp")
        for href in listing["links"].values():  # relative links answer under the prefix
            assert http.get(root + href).status_code == 200, href
        docs = http.get(root + "docs")
        assert docs.status_code == 200 and "openapi.json" in docs.text
        assert http.get(root + "openapi.json").json()["info"]["title"] == "deepinfer-nb gateway"
        # without the token the notebook server turns the request away before the gateway
        assert httpx.get(root, timeout=30).status_code in (302, 403)


def _try_it_out(page: Page, api_base: str, *, origin: str) -> None:
    """Swagger UI at `docs` renders from the gateway's own files (nothing loaded from elsewhere:
    this host is offline) and its "Try it out" of GET /v1/models goes under the proxy prefix and
    gets the gateway's 200."""
    loaded: list[str] = []
    page.on("request", lambda request: loaded.append(request.url))
    page.goto(api_base[:-2] + "docs")
    models = page.locator(
        ".opblock-get", has=page.locator('.opblock-summary-path[data-path="/v1/models"]')
    )
    models.locator(".opblock-summary").click()
    models.get_by_role("button", name="Try it out").click()
    models.get_by_role("button", name="Execute").click()
    status = models.locator(".live-responses-table tbody .response-col_status")
    assert status.inner_text().strip() == "200"
    assert '"smol"' in models.locator(".live-responses-table").inner_text()  # the gateway's list
    assert models.locator(".request-url pre").inner_text().strip() == api_base + "/models"
    page.screenshot(path=str(ARTIFACTS / "docs-through-proxy.png"))
    assert loaded and all(url.startswith(origin) for url in loaded), loaded


def test_gateway_through_jupyter_server_proxy(tmp_path: Path) -> None:
    with isolated_home(tmp_path) as home:
        lab = LabServer(tmp_path / "lab", env={"DEEPINFER_HOME": str(home)}, base_url=BASE_URL)
        nbformat.write(_notebook(), str(lab.root / "access.ipynb"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        lab.start()
        try:
            with chromium(tmp_path / "profile") as browser:
                page = browser.new_page()
                nb = NotebookPage(page)
                try:
                    nb.open(lab.notebook_url("access.ipynb"))
                    nb.select_cell(-1)
                    nb.run_menu("Run All Above Selected Cell", cells=[0])
                    nb.wait_executed(list(range(len(CELLS) - 1)), timeout_s=300)

                    printed = EXTERNAL.search(nb.output_text(GATEWAY_CELL))
                    assert printed, nb.output_text(GATEWAY_CELL)
                    api_base = printed.group(1)
                    assert api_base.startswith(f"{lab.url}/proxy/") and api_base.endswith("/v1")
                    said = nb.output_text(GATEWAY_CELL)
                    assert "the Jupyter server's token" in said and "as the API key" in said
                    # the Cluster summary `up` displayed links through the proxy too
                    up_link = nb.code_cells().nth(1).locator(".jp-OutputArea a").first
                    assert (
                        up_link.get_attribute("href")
                        == f"{BASE_URL}proxy/{api_base.split('/')[-2]}/"
                    )
                    _outside_the_kernel(lab, api_base)

                    link = nb.code_cells().nth(GATEWAY_CELL).locator(".jp-OutputArea a").first
                    assert link.get_attribute("href") == api_base.removeprefix(lab.origin)[:-2]
                    with browser.expect_page() as opened:
                        link.click()
                    landing = opened.value
                    landing.wait_for_load_state()
                    assert landing.url == api_base[:-2]
                    row = landing.locator("tr", has_text="smol")
                    assert "Running" in row.inner_text()
                    landing.screenshot(path=str(ARTIFACTS / "landing-through-proxy.png"))
                    landing.get_by_role("link", name="metrics").click()
                    landing.wait_for_load_state()
                    assert landing.url == api_base[:-2] + "metrics"
                    assert "deepinfer" in landing.locator("body").inner_text()
                    _try_it_out(landing, api_base, origin=lab.origin)

                    nb.select_cell(-1)
                    nb.run_menu("Run Selected Cell", cells=[len(CELLS) - 1])
                    nb.wait_executed([len(CELLS) - 1], timeout_s=120)
                    assert not wait_gone(home, 15), "an engine outlived `down`"
                except BaseException:
                    with contextlib.suppress(Exception):
                        page.screenshot(path=str(ARTIFACTS / "proxy-access-failure.png"))
                    print(lab.log_tail(), file=sys.stderr)
                    raise
        finally:
            lab.stop()
        assert not engine_processes(home)
