"""Scale to zero through the notebook's Python API on `deepinfer_nb.testing.cluster()` (real
controller, worker, gateway and shim processes over the FakeBackend): a deployment with an
idle_timeout goes idle and its engine process ends; the status says so; `wait` counts it ready;
a chat to the engine wakes it and is answered; a gateway request after it idles again is held and
answered too."""

from __future__ import annotations

import time

import openai
import psutil

import deepinfer_nb.testing

REPLY = "Paris."


def _wait_idle(dep: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while dep.status != "Idle (scaled to zero)" or dep.engines:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, dep.status  # type: ignore[attr-defined]
        time.sleep(0.1)


def test_idle_then_chat_and_gateway_wake_it() -> None:
    with deepinfer_nb.testing.cluster() as c:
        dep = c.deploy(
            "any-model",
            name="nap",
            wait=True,
            timeout=120,
            idle_timeout="2s",
            env={"DEEPINFER_FAKE_REPLY": REPLY},
        )
        pid = dep.engines[0].pid
        _wait_idle(dep)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        assert "Idle (scaled to zero)" in repr(dep)
        assert dep.wait(timeout=1) is dep  # deploy --wait: an idle deployment is ready
        t0 = time.monotonic()
        assert dep.chat("Capital of France?", timeout=60).text == REPLY  # wakes it
        print(f"\nchat woke the deployment and was answered in {time.monotonic() - t0:.1f} s")
        assert dep.status == "Running 1/1"
        _wait_idle(dep)
        assert c.gateway_url is not None
        oai = openai.OpenAI(base_url=c.gateway_url + "/v1", api_key="-", max_retries=0)
        resp = oai.chat.completions.create(
            model="nap", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert resp.choices[0].message.content == REPLY
        assert dep.spec is not None and dep.spec.idle_timeout == 2.0
        assert dep.rollout_status["state"] == "complete"
