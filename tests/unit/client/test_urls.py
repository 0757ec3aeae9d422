"""client/urls.py: the gateway's address per audience, and finding the notebook server from a
kernel's environment (real jpserver files written by the test, as jupyter_server writes them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepinfer_nb.client import urls
from deepinfer_nb.client.urls import JupyterServer, find_jupyter_server, gateway_access
from deepinfer_nb.config import BOTH_SCOPES, INFERENCE, ApiKey, jupyter_env

ALICE = JupyterServer(base_url="/user/alice/", url="http://nb.example:8888/user/alice/")
KEY = ApiKey("api-key", "s3cret", BOTH_SCOPES, source="GW_KEY")


def test_the_kernel_dials_loopback_whatever_fronts_the_gateway() -> None:
    for server, public in ((None, ""), (ALICE, ""), (ALICE, "https://gw.example/")):
        a = gateway_access("kernel", port=8082, server=server, public_url=public)
        assert (a.url, a.route, a.auth) == ("http://127.0.0.1:8082/", "loopback", "")
        assert a.api_base == "http://127.0.0.1:8082/v1"


def test_without_a_notebook_server_everyone_gets_loopback() -> None:
    browser = gateway_access("browser", port=9000)
    external = gateway_access("external", port=9000)
    assert browser.url == external.url == "http://127.0.0.1:9000/"
    assert "this machine only" in external.auth and browser.note == ""


def test_the_browser_goes_through_the_notebook_servers_proxy() -> None:
    a = gateway_access("browser", port=8082, server=ALICE)
    assert (a.url, a.route) == ("/user/alice/proxy/8082/", "jupyter-server-proxy")
    root = gateway_access("browser", port=8082, server=JupyterServer(base_url="/"))
    assert root.url == "/proxy/8082/"


def test_external_clients_get_an_absolute_proxy_url_and_the_token_to_send() -> None:
    a = gateway_access("external", port=8082, server=ALICE)
    assert a.api_base == "http://nb.example:8888/user/alice/proxy/8082/v1"
    assert a.token_env == "JUPYTER_TOKEN" and a.key_env == ""
    assert "shows it) as the API key" in a.auth and "jupyter server list" in a.auth


def test_with_a_gateway_key_the_token_moves_to_the_query() -> None:
    a = gateway_access("external", port=8082, server=ALICE, keys=[KEY])
    assert a.key_env == "GW_KEY" and a.token_env == "JUPYTER_TOKEN"
    assert "`token` query parameter" in a.auth and "can also create and delete" in a.auth
    inference = ApiKey("apps", "k", frozenset({INFERENCE}), source="INF")
    b = gateway_access("external", port=1, server=ALICE, keys=[KEY, inference])
    assert "inference key 'apps'" in b.auth


def test_a_hub_without_a_public_address_gives_a_relative_url_and_says_so() -> None:
    hub = JupyterServer(base_url="/user/bob/", hub=True)
    a = gateway_access("external", port=8082, server=hub)
    assert a.url == "/user/bob/proxy/8082/" and "hub's address" in a.note
    assert "JupyterHub API token" in a.auth


def test_public_url_wins_for_browser_and_external() -> None:
    for audience in ("browser", "external"):
        a = gateway_access(audience, port=7, server=ALICE, public_url="https://gw.example/{port}")
        assert (a.url, a.route) == ("https://gw.example/7/", "public_url")


def test_a_server_without_the_proxy_falls_back_to_loopback_and_says_why() -> None:
    bare = JupyterServer(base_url="/", url="http://127.0.0.1:8888/", proxy=False)
    a = gateway_access("browser", port=8082, server=bare)
    assert a.url == "http://127.0.0.1:8082/" and "jupyter-server-proxy" in a.note


def test_unknown_audience_is_refused() -> None:
    with pytest.raises(ValueError, match="audience"):
        gateway_access("everyone", port=1)  # type: ignore[arg-type]


def _jpserver(folder: Path, pid: int, base_url: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    info = {"base_url": base_url, "url": f"http://127.0.0.1:8888{base_url}", "pid": pid}
    (folder / f"jpserver-{pid}.json").write_text(json.dumps(info))


def test_the_server_that_launched_the_kernel_is_found_by_its_pid(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    _jpserver(runtime, 4242, "/user/alice/")
    _jpserver(runtime, 5151, "/other/")  # another server in the same folder
    env = jupyter_env({"JPY_PARENT_PID": "4242", "JUPYTER_RUNTIME_DIR": str(tmp_path / "x")})
    found = find_jupyter_server(env, connection_file=str(runtime / "kernel-1.json"))
    assert found is not None
    assert (found.base_url, found.url) == ("/user/alice/", "http://127.0.0.1:8888/user/alice/")
    assert found.proxy  # jupyter-server-proxy is a test dependency
    env = jupyter_env({"JPY_PARENT_PID": "9999", "JUPYTER_RUNTIME_DIR": str(runtime)})
    assert find_jupyter_server(env) is None
    assert find_jupyter_server(jupyter_env({})) is None


def test_jupyterhub_is_found_from_its_service_prefix() -> None:
    # JupyterHub publishes this server's public URL when the hub's public_url is set
    env = jupyter_env(
        {
            "JUPYTERHUB_SERVICE_PREFIX": "/user/ann/",
            "JUPYTERHUB_PUBLIC_URL": "https://hub.x/user/ann/",
        }
    )
    found = find_jupyter_server(env)
    assert found == JupyterServer(base_url="/user/ann/", url="https://hub.x/user/ann/", hub=True)
    assert gateway_access("external", port=5, server=found).url == "https://hub.x/user/ann/proxy/5/"


def test_outside_a_kernel_there_is_no_connection_file() -> None:
    assert urls.kernel_connection_file() == ""
