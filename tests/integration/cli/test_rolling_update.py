"""Rolling updates with real engines: `deepinfer-nb up` (embedded store, one worker, gateway)
serving a 2-replica SmolLM2 deployment on CPU while 4 clients send requests without pause.

1. A max_model_len change (PATCH) rolls both replicas one at a time, new engine Running first:
   0 failed requests, both engines replaced, the new spec in GET /v1/deployments/NAME.
2. A change whose new engine cannot start (a bad engine argument): the rollout halts after that
   one engine, both old engines keep serving, 0 failed requests, the reason in the view.
3. `deepinfer-nb rollback NAME --wait` returns to the working settings.

At most 3 engines run at once (2 replicas + a surge of 1): the minimum a rollout needs.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from deepinfer_nb.netutil import free_port

from . import helpers

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

NAME = "roll"
CLIENTS = 4
ROLL_TIMEOUT_S = 780


class Load:
    """CLIENTS threads sending short chat requests back to back; failures are kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self) -> None:
        body = {
            "model": NAME,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
        }
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.url + "/v1/chat/completions", json=body)
                    failed = None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    failed = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if failed is None:
                        self.ok += 1
                    else:
                        self.failures.append(failed)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("up") / "up.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = f"roll-{uuid.uuid4().hex[:8]}"
    proc = helpers.start(["up", "--node", node, "--gateway-port", str(port)], url=url, log=log)
    try:
        spec = {
            "model": "smollm2-135m-instruct",
            "device": "cpu",
            "replicas": 2,
            "max_model_len": 2048,
            "enforce_eager": True,
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
            "max_restarts": 3,  # a start that fails for want of memory (shared host) retries
        }
        r = httpx.put(f"{url}/v1/deployments/{NAME}", json=spec, timeout=10)
        assert r.status_code == 201, r.text
        wait_for(url, lambda v: v["ready_replicas"] == 2, 600, "2 replicas Running")
        yield url
    finally:
        helpers.stop(proc)


def view(url: str) -> dict[str, Any]:
    # generous: on a loaded 2-core host the gateway shares its loop with worker and controller
    r = httpx.get(f"{url}/v1/deployments/{NAME}", timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_for(
    url: str, done: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        v = view(url)
        if done(v):
            return v
        states = [(e["id"], e["state"], e["error"][-120:]) for e in v["engines"]]
        assert time.monotonic() < deadline, f"not {what} after {timeout} s: {states}"
        time.sleep(1)


def running_ids(v: dict[str, Any]) -> set[str]:
    return {e["id"] for e in v["engines"] if e["state"] == "Running"}


def test_rolling_update_under_load_replaces_both_engines(gateway: str) -> None:
    before = running_ids(view(gateway))
    assert len(before) == 2
    seen_running: list[int] = []
    with Load(gateway) as load:
        time.sleep(3)  # the load is flowing before the change
        r = httpx.patch(f"{gateway}/v1/deployments/{NAME}", json={"max_model_len": 1024})
        assert r.json()["change"] == "updated"
        assert r.json()["rollout_status"]["state"] == "progressing"

        def rolled(v: dict[str, Any]) -> bool:
            seen_running.append(len(running_ids(v)))
            return (
                v["rollout_status"]["state"] == "complete"
                and len(running_ids(v)) == 2
                and not running_ids(v) & before
                and len(v["engines"]) == 2
            )

        after = wait_for(gateway, rolled, ROLL_TIMEOUT_S, "rolled")
        time.sleep(3)  # and keeps flowing on the new engines
    print(f"rolling update under load: {load.ok} requests ok, {len(load.failures)} failed")
    assert load.failures == [], load.failures[:5]
    assert load.ok >= 20
    assert min(seen_running) >= 2  # never fewer than 2 serving replicas
    assert after["max_model_len"] == 1024 and after["previous"]["max_model_len"] == 2048
    assert after["rollout_status"]["updated"] == 2


def test_a_new_engine_that_cannot_start_halts_and_old_ones_serve(gateway: str) -> None:
    serving = running_ids(view(gateway))
    with Load(gateway) as load:
        r = httpx.patch(
            f"{gateway}/v1/deployments/{NAME}",
            json={"max_model_len": 999999, "max_restarts": 0},  # beyond the model: fails for good
        )
        assert r.json()["change"] == "updated"
        halted = wait_for(
            gateway, lambda v: v["rollout_status"]["state"] == "halted", 480, "halted"
        )
        time.sleep(5)  # halted stays halted, and the old engines go on answering
        still = view(gateway)
    print(f"halted rollout under load: {load.ok} requests ok, {len(load.failures)} failed")
    assert load.failures == [], load.failures[:5]
    assert load.ok >= 10
    reason = halted["rollout_status"]["reason"]
    assert "failed" in reason and "old engines keep serving" in reason
    assert running_ids(still) == serving  # both old engines still Running
    failed = [e for e in still["engines"] if e["state"] == "Failed"]
    assert len(failed) == 1  # the second slot never started
    assert still["rollout_status"]["state"] == "halted"


def test_rollback_from_the_cli(gateway: str) -> None:
    before = view(gateway)
    serving, previous = running_ids(before), before["previous"]
    env = {**os.environ, "DEEPINFER_GATEWAY": gateway}
    result = subprocess.run(
        [helpers.EXE, "rollback", NAME, "--wait", "--timeout", "120"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "rollout complete (2/2)" in result.stderr
    v = view(gateway)
    assert v["max_model_len"] == previous["max_model_len"] != 999999
    assert running_ids(v) == serving and len(v["engines"]) == 2  # the failed engine is gone
