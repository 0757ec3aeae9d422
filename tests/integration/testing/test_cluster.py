"""`deepinfer_nb.testing.cluster()` as a user's test would use it: deploy, chat through the Python
API and through the gateway with the openai client, scale, delete; nothing left running after.

Real worker, launcher and engine processes (the shim over the FakeBackend), no vLLM.
"""

from __future__ import annotations

import openai
import psutil

import deepinfer_nb.testing


def _fake_shims() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "deepinfer_nb.testing.shim" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def test_cluster_deploys_and_serves_fake_engines() -> None:
    with deepinfer_nb.testing.cluster() as c:
        dep = c.deploy(
            "any-model",
            name="m",
            wait=True,
            timeout=120,
            env={"DEEPINFER_FAKE_REPLY": "Hello from a fake engine."},
        )
        assert dep.status.startswith("Running")
        assert dep.chat("Hi!").text == "Hello from a fake engine."
        assert c.gateway_url is not None
        oai = openai.OpenAI(base_url=c.gateway_url + "/v1", api_key="-", max_retries=0)
        resp = oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi!"}], max_tokens=5
        )
        assert resp.choices[0].message.content == "Hello"
        assert resp.choices[0].finish_reason == "length"
        with oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi!"}], stream=True
        ) as stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == "Hello from a fake engine."

        emb = c.deploy(
            "any-embedder", name="e", wait=True, timeout=120, env={"DEEPINFER_FAKE_TASK": "embed"}
        )
        vectors = oai.embeddings.create(model="e", input=["a", "a"], encoding_format="float")
        assert vectors.data[0].embedding == vectors.data[1].embedding
        emb.stop()

        dep.scale(2, wait=True, timeout=120)
        assert len(_fake_shims()) == 2
        assert {e.state.value for e in dep.engines} == {"Running"}
    assert not c.connected
    _, alive = psutil.wait_procs(_fake_shims(), timeout=10)
    assert not alive, f"left behind: {alive}"


def test_a_second_cluster_starts_after_the_first() -> None:
    with deepinfer_nb.testing.cluster() as c:
        assert c.deploy("x", name="x", wait=True, timeout=120).chat("?").text
