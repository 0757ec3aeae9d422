"""The gateway against a real cluster (memory store, in-process controller and worker, two real
SmolLM2 engines on CPU) through the official `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time

import httpx
import openai
import pytest

from deepinfer_nb.config import Settings
from deepinfer_nb.engine import local_models, policy
from deepinfer_nb.engine.client import EngineClient
from deepinfer_nb.gateway import GatewayServer, build_app
from deepinfer_nb.models import DeploymentSpec, Engine, EngineState, Node, Placement
from deepinfer_nb.store import keys

from .conftest import ADMIN_KEY, API_KEY, INFERENCE_KEY, KEYS, GatewayCluster

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


async def test_chat_answers_paris(gateway_cluster: GatewayCluster) -> None:
    async with gateway_cluster.client() as client:
        resp = await client.chat.completions.create(
            model="smollm2", messages=FRANCE, temperature=0, max_tokens=24
        )  # type: ignore[arg-type]
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.prompt_tokens > 5
    assert 0 < resp.usage.completion_tokens <= 24


async def test_chat_streamed(gateway_cluster: GatewayCluster) -> None:
    async with gateway_cluster.client() as client:
        stream = await client.chat.completions.create(
            model="smollm2",
            messages=FRANCE,
            temperature=0,
            max_tokens=24,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert content_chunks <= chunks[-1].usage.completion_tokens <= 24
    assert len(chunks) > 5  # streamed as deltas, not one piece


async def test_completions_streamed_and_not(gateway_cluster: GatewayCluster) -> None:
    prompt = "The capital of France is"
    async with gateway_cluster.client() as client:
        full = await client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=8, temperature=0, logprobs=2
        )
        stream = await client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        pieces = [c.choices[0].text async for c in stream if c.choices]
    assert "Paris" in full.choices[0].text
    assert "".join(pieces) == full.choices[0].text  # greedy: same tokens either way
    assert full.usage is not None and full.usage.completion_tokens == 8
    lp = full.choices[0].logprobs
    assert (
        lp is not None
        and len(lp.tokens or []) == 8
        and all(t is not None and t <= 0 for t in lp.token_logprobs or [])
    )


async def test_models_list(gateway_cluster: GatewayCluster) -> None:
    async with gateway_cluster.client() as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]


async def test_error_statuses(gateway_cluster: GatewayCluster) -> None:
    store = gateway_cluster.store
    async with gateway_cluster.client() as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=FRANCE)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="smollm2",
                messages=FRANCE,  # type: ignore[arg-type]
                top_p=0,
            )
        assert bad.value.body["param"] == "top_p"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):  # rejected by the engine itself
            await client.chat.completions.create(
                model="smollm2",
                messages=FRANCE,  # type: ignore[arg-type]
                max_tokens=100_000,
            )
    async with gateway_cluster.client(key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="smollm2", messages=FRANCE)  # type: ignore[arg-type]

    # a deployment that cannot be placed: 503 saying why
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=gateway_cluster.url, headers=auth) as http:
        r = await http.post(
            "/v1/deployments",
            json={
                "model": "smollm2-135m-instruct",
                "name": "qwen",
                "device": "cpu",
                "placement": {"nodes": ["nowhere"]},
            },
        )
        assert r.status_code == 201, r.text
        r = await http.post("/v1/deployments", json={"model": "m", "replicas": "many"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "replicas"
    async with gateway_cluster.client() as client:
        for _ in range(100):
            try:
                await client.chat.completions.create(model="qwen", messages=FRANCE)  # type: ignore[arg-type]
            except openai.InternalServerError as exc:
                if "Pending:" in str(exc):
                    assert exc.status_code == 503
                    assert "deployment qwen is Pending" in str(exc)
                    break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("no 503 with the placement reason")
    await store.delete(keys.deployment("qwen"))

    # an engine whose process died before its worker noticed: the request waits for the record
    # to change (normally its worker marks it Failed and restarts it). Here its node goes away:
    # the engine is Lost and fits nowhere else, so nothing is on its way and the waiting request
    # gets the engine's failure (502), at once rather than after the hold timeout.
    lease = await store.grant_lease(30)
    await store.put(keys.node("remote"), Node(id="remote").encode(), lease=lease.id)
    ghost = DeploymentSpec(
        name="ghost", model="m", device="cpu", placement=Placement(nodes=["remote"])
    )
    await store.put(keys.deployment("ghost"), ghost.encode())
    dead = Engine(
        id="ghost-0-dead",
        deployment="ghost",
        state=EngineState.RUNNING,
        node="remote",
        endpoint=f"127.0.0.1:{_closed_port()}",
        auth_token="t",
    )
    await store.put(keys.engine(dead.id), dead.encode())
    try:
        async with gateway_cluster.client() as client:
            for _ in range(50):  # until the gateway's table lists the ghost
                if "ghost" in [m.id for m in (await client.models.list()).data]:
                    break
                await asyncio.sleep(0.1)
            held = asyncio.ensure_future(
                client.with_options(max_retries=0).chat.completions.create(
                    model="ghost",
                    messages=FRANCE,  # type: ignore[arg-type]
                )
            )
            await asyncio.sleep(1.0)
            assert not held.done()  # waiting, not failed
            await lease.revoke()
            started = asyncio.get_running_loop().time()
            with pytest.raises(openai.InternalServerError) as unavailable:
                await asyncio.wait_for(held, 30)
            assert unavailable.value.status_code == 502
            assert "engine failure" in str(unavailable.value)
            assert asyncio.get_running_loop().time() - started < 20  # not the 60 s hold timeout
    finally:
        await store.delete(keys.deployment("ghost"))
        await store.delete(keys.engine(dead.id))
        with contextlib.suppress(Exception):
            await lease.revoke()


async def test_api_key_enforced(gateway_cluster: GatewayCluster) -> None:
    async with httpx.AsyncClient(base_url=gateway_cluster.url) as anon:
        assert (await anon.get("/v1/models")).status_code == 401
        assert (await anon.post("/v1/deployments", json={"model": "m"})).status_code == 401
        health = (await anon.get("/health")).json()
    assert health["status"] == "healthy" and health["store"]["connected"]
    assert health["engines_running"] == 2


async def test_scoped_keys(gateway_cluster: GatewayCluster) -> None:
    """inference key: chat 200, deployments 403; admin key: both; no or unknown key: 401."""
    url = gateway_cluster.url
    audit = {"name": "audit", "model": "smollm2-135m-instruct", "replicas": 0, "device": "cpu"}

    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async with gateway_cluster.client(key=INFERENCE_KEY) as app:
        reply = await app.chat.completions.create(
            model="smollm2", messages=FRANCE, temperature=0, max_tokens=24
        )  # type: ignore[arg-type]
        assert "Paris" in (reply.choices[0].message.content or "")
        assert [m.id for m in (await app.models.list()).data] == ["smollm2"]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/v1/deployments", json=audit, headers=auth(INFERENCE_KEY))
        assert r.status_code == 403, r.text
        err = r.json()["error"]
        assert err["type"] == "permission_error" and err["code"] == "insufficient_scope"
        assert "'app'" in err["message"] and "needs an admin key" in err["message"]
        for path in ("/v1/deployments", "/v1/engines", "/v1/nodes", "/v1/gpus"):
            assert (await http.get(path, headers=auth(INFERENCE_KEY))).status_code == 403
        assert (await http.get("/metrics", headers=auth(INFERENCE_KEY))).status_code == 200
        assert await gateway_cluster.store.get(keys.deployment("audit")) is None

        r = await http.post("/v1/deployments", json=audit, headers=auth(ADMIN_KEY))
        assert r.status_code == 201, r.text
        assert r.json()["created_by"] == r.json()["updated_by"] == "ops"
        r = await http.patch(
            "/v1/deployments/audit", json={"max_restarts": 2}, headers=auth(API_KEY)
        )
        assert r.json()["created_by"] == "ops" and r.json()["updated_by"] == "api-key"
        listed = (await http.get("/v1/deployments", headers=auth(ADMIN_KEY))).json()["data"]
        assert {d["name"]: d["updated_by"] for d in listed}["audit"] == "api-key"
        r = await http.delete("/v1/deployments/audit", headers=auth(ADMIN_KEY))
        assert r.status_code == 200

        for headers in ({}, auth("sk-wrong"), {"Authorization": "Basic eDp5"}):
            for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/deployments")):
                r = await http.request(method, path, headers=headers, json={})
                assert r.status_code == 401, (headers, path, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
        assert (await http.get("/metrics")).status_code == 401
    async with gateway_cluster.client(key=ADMIN_KEY) as ops:
        reply = await ops.chat.completions.create(
            model="smollm2", messages=FRANCE, temperature=0, max_tokens=8
        )  # type: ignore[arg-type]
        assert reply.choices[0].message.content


async def test_metrics_open_when_configured(gateway_cluster: GatewayCluster) -> None:
    settings = Settings()
    settings.server.metrics_open = True
    app = build_app(gateway_cluster.store, settings=settings, api_keys=KEYS)
    async with GatewayServer(app, host="127.0.0.1", port=0) as server:
        async with httpx.AsyncClient(base_url=server.url) as anon:
            r = await anon.get("/metrics")
            assert r.status_code == 200 and "deepinfer_gateway_engines" in r.text
            assert (await anon.get("/v1/models")).status_code == 401


@pytest.mark.parametrize(
    ("change", "rule", "param"),
    [
        ({"env": {"LD_PRELOAD": "/tmp/evil.so"}}, "env.never", "env.LD_PRELOAD"),
        ({"env": {"PYTHONPATH": "/tmp"}}, "env.never", "env.PYTHONPATH"),
        ({"env": {"PATH": "/tmp"}}, "env.never", "env.PATH"),
        ({"env": {"HF_TOKEN": "hf_clear"}}, "env.secret_in_clear", "env.HF_TOKEN"),
        ({"env": {"MY_SETTING": "1"}}, "env.not_allowed", "env.MY_SETTING"),
        ({"engine_args": ["--trust-remote-code"]}, "args.code_loading", None),
        ({"engine_args": ["--worker-extension-cls", "x.Y"]}, "args.code_loading", None),
        ({"engine_args": ["--hf-token", "hf_clear"]}, "args.secret_in_clear", None),
        ({"engine_args": ["--no-such-flag"]}, "args.unknown_flag", None),
        ({"model": "/etc"}, "path.outside_model_dirs", "model"),
        ({"engine_args": ["--tokenizer", "/tmp"]}, "path.outside_model_dirs", None),
    ],
)
async def test_launch_policy_refusals_are_422_naming_the_rule(
    gateway_cluster: GatewayCluster, change: dict[str, object], rule: str, param: str | None
) -> None:
    body = {"name": "refused", "model": "smollm2-135m-instruct", "device": "cpu", **change}
    async with httpx.AsyncClient(base_url=gateway_cluster.url, timeout=30) as http:
        r = await http.post(
            "/v1/deployments", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "launch_policy" and f"(rule {rule})" in err["message"], err
    if param:
        assert err["param"] == param
    assert "hf_clear" not in r.text  # a refused secret is not echoed either
    assert await gateway_cluster.store.get(keys.deployment("refused")) is None


async def test_allowed_spec_passes_the_same_policy(gateway_cluster: GatewayCluster) -> None:
    """The deployment serving every test here was admitted by the worker's policy check; the
    gateway's check agrees (a spec with a model folder inside the models cache, too)."""
    kv = await gateway_cluster.store.get(keys.deployment("smol"))
    assert kv is not None
    spec = DeploymentSpec.model_validate_json(kv.value)
    rules = policy.LaunchPolicy.from_settings(gateway_cluster.settings.agent)
    policy.check(spec, rules)
    folder = local_models.model_dir(local_models.CATALOG["smollm2-135m-instruct"])
    policy.check(spec.model_copy(update={"model": str(folder)}), rules)
    assert any(e.state is EngineState.RUNNING for e in await gateway_cluster.engines())


async def _engine_metrics(cluster: GatewayCluster) -> dict[str, tuple[int, int, int]]:
    out = {}
    for e in await cluster.engines():
        if e.state is EngineState.RUNNING and e.deployment == "smol":
            async with EngineClient(e.endpoint, token=e.auth_token) as c:
                m = await c.metrics()
            out[e.id] = (m.running_requests, m.inflight_rpcs, m.requests_finished_total)
    return out


async def test_disconnect_mid_stream_frees_the_engine(gateway_cluster: GatewayCluster) -> None:
    body = {
        "model": "smollm2",
        "messages": FRANCE,
        "stream": True,
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=gateway_cluster.url, headers=auth, timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data:")
                if seen == 5:
                    busy = await _engine_metrics(gateway_cluster)
                    break
    assert sum(v[1] for v in busy.values()) == 1  # the engine was serving it
    deadline = time.monotonic() + 10
    while True:
        now = await _engine_metrics(gateway_cluster)
        if all(v[0] == 0 and v[1] == 0 for v in now.values()):
            break
        assert time.monotonic() < deadline, f"engine still busy after disconnect: {now}"
        await asyncio.sleep(0.2)
    table = gateway_cluster.server.app.state.table
    assert all(r.inflight == 0 for r in table._replicas["smol"].values())


async def test_both_replicas_serve_concurrent_load_and_metrics_count(
    gateway_cluster: GatewayCluster,
) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=gateway_cluster.url, headers=auth) as http:
        before_text = (await http.get("/metrics")).text
    before = await _engine_metrics(gateway_cluster)
    async with gateway_cluster.client() as client:
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="smollm2",
                    messages=FRANCE,
                    max_tokens=16,  # type: ignore[arg-type]
                    extra_body={"ignore_eos": True},
                )
                for _ in range(16)
            )
        )
    after = await _engine_metrics(gateway_cluster)
    served = {eid: after[eid][2] - before[eid][2] for eid in after}
    assert len(served) == 2 and all(n >= 3 for n in served.values()), served
    assert sum(served.values()) == 16
    async with httpx.AsyncClient(base_url=gateway_cluster.url, headers=auth) as http:
        after_text = (await http.get("/metrics")).text
    ok = 'deepinfer_gateway_requests_total{endpoint="chat",model="smollm2",status="200"}'
    assert _value(after_text, ok) - _value(before_text, ok) == 16
    out = 'deepinfer_gateway_completion_tokens_total{model="smollm2"}'
    assert _value(after_text, out) - _value(before_text, out) == 16 * 16
    assert sum(r.usage.completion_tokens for r in replies if r.usage) == 16 * 16
    assert 'deepinfer_gateway_engines{state="Running"} 2.0' in after_text


async def test_load_200_concurrent_streams(gateway_cluster: GatewayCluster) -> None:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with (
        httpx.AsyncClient(limits=limits, timeout=600) as http,
        gateway_cluster.client(http_client=http) as client,
    ):

        async def one(i: int) -> tuple[str, str | None]:
            stream = await client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": f"Count to {i}."}],  # type: ignore[arg-type]
                max_tokens=8,
                stream=True,
            )
            text, finish = "", None
            async for c in stream:
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    finish = c.choices[0].finish_reason or finish
            return text, finish

        started = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(200)))
        elapsed = time.monotonic() - started
    assert len(results) == 200
    assert all(finish in ("stop", "length") and text for text, finish in results)
    print(f"200 concurrent streams completed in {elapsed:.1f} s")


def _value(text: str, series: str) -> float:
    m = re.search(re.escape(series) + r" ([0-9.e+]+)", text)
    return float(m.group(1)) if m else 0.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
