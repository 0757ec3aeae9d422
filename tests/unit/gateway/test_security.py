"""Scoped API keys: where they are configured, which routes need which scope, how they are
compared, and what the snippets and start-up line say about them."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest

from deepinfer_nb.config import (
    ADMIN,
    INFERENCE,
    ApiKey,
    ServerSettings,
    admin_secret,
    read_keys,
)
from deepinfer_nb.errors import ConfigError
from deepinfer_nb.gateway import security


def test_keys_from_variables_and_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text('[admin]\nroot = "r-secret"\n[inference]\nweb = "w-secret"\n')
    server = ServerSettings(
        api_key_env="LEGACY",
        admin_keys_env="ADMINS",
        inference_keys_env="CLIENTS",
        keys_file=str(keys_file),
    )
    env = {"LEGACY": "l1,l2", "ADMINS": "ops:o-secret", "CLIENTS": "app:a1, bot:b1"}
    keys = {k.name: k for k in read_keys(server, env)}
    assert set(keys) == {"api-key", "api-key-2", "ops", "app", "bot", "root", "web"}
    assert keys["api-key"].secret == "l1" and keys["api-key"].source == "LEGACY"
    for name in ("api-key", "api-key-2", "ops", "root"):  # a single/legacy key: both scopes
        assert keys[name].scopes == {ADMIN, INFERENCE}
    for name in ("app", "bot", "web"):
        assert keys[name].scopes == {INFERENCE}
    assert keys["bot"].secret == "b1" and keys["web"].source == str(keys_file)
    assert "a1" not in repr(keys["app"])  # a key's repr never shows its secret
    # the notebook and CLI present an admin key, never an inference-only one
    assert admin_secret(list(keys.values())) == "l1"
    assert admin_secret([keys["app"], keys["ops"]]) == "o-secret"
    assert admin_secret([keys["app"]]) == ""


@pytest.mark.parametrize(
    ("server", "env", "words"),
    [
        (ServerSettings(admin_keys_env="A"), {}, ["A is not set", "name:key"]),
        (ServerSettings(admin_keys_env="A"), {"A": "nameless"}, ["entry 1 is not name:key"]),
        (ServerSettings(admin_keys_env="A"), {"A": "x:1,x:2"}, ["'x' is used twice"]),
        (ServerSettings(keys_file="/nonexistent/keys.toml"), {}, ["cannot read keys file"]),
    ],
)
def test_key_configuration_errors(
    server: ServerSettings, env: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        read_keys(server, env)
    for word in words:
        assert word in str(info.value)


def test_route_scopes_deny_by_default() -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert security.required_scope(path) == INFERENCE
    assert security.required_scope("/v1/models/smollm2") == INFERENCE
    assert security.required_scope("/metrics") == INFERENCE
    for path in ("/v1/deployments", "/v1/deployments/x", "/v1/engines", "/v1/nodes", "/v1/gpus"):
        assert security.required_scope(path) == ADMIN
    assert security.required_scope("/openapi.json") == ADMIN
    assert security.required_scope("/v1/some-future-route") == ADMIN


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which key matched (first, last, none) does not change the work done: every key is
    compared with hmac.compare_digest."""
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    keys = [ApiKey("a", "secret-a"), ApiKey("b", "secret-b"), ApiKey("c", "secret-c")]
    for presented, expected in (("secret-a", "a"), ("secret-c", "c"), ("nope", None)):
        calls.clear()
        found = security.match_key(presented, keys)
        assert (found.name if found else None) == expected
        assert calls == [b"secret-a", b"secret-b", b"secret-c"]


def test_start_up_line_and_snippet_hint_say_what_a_key_can_do() -> None:
    both = [ApiKey("api-key", "s", source="DEEPINFER_API_KEY")]
    assert "can also create and delete deployments" in security.describe_keys(both)
    var, note = security.client_key_hint(both)
    assert var == "DEEPINFER_API_KEY" and "can also create and delete deployments" in note
    scoped = [
        ApiKey("ops", "s1", source="ADMINS"),
        ApiKey("app", "s2", frozenset({INFERENCE}), source="CLIENTS"),
    ]
    assert security.describe_keys(scoped) == "admin keys: ops; inference keys: app"
    var, note = security.client_key_hint(scoped)
    assert var == "DEEPINFER_API_KEY" and "inference key 'app'" in note and "s2" not in note
    assert security.client_key_hint([]) == ("", "")
