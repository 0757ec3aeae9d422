"""Settings: the shipped default.toml, precedence (file < env < flags), and errors that name the
key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepinfer_nb.cli.controller import register, settings_from
from deepinfer_nb.config import Settings, default_config_path
from deepinfer_nb.errors import ConfigError


def test_shipped_default_toml_is_every_default() -> None:
    path = default_config_path()
    assert path.is_file()
    text = path.read_text()
    for section in ("[server]", "[scheduler]", "[agent]", "[storage]"):
        assert section in text
    assert Settings.load(path, env={}) == Settings()


def test_env_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[scheduler]\nstrategy = "binpack"\nreconcile_interval_s = 5\n')
    s = Settings.load(cfg, env={"DEEPINFER_SCHEDULER__RECONCILE_INTERVAL_S": "0.5"})
    assert (s.scheduler.strategy, s.scheduler.reconcile_interval_s) == ("binpack", 0.5)


def _parse(argv: list[str]) -> object:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["controller", *argv])


def test_flags_override_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[scheduler]\nreconcile_interval_s = 5\n[storage]\nbackend = "memory"\n')
    monkeypatch.setenv("DEEPINFER_SCHEDULER__RECONCILE_INTERVAL_S", "3")
    monkeypatch.setenv("DEEPINFER_STORAGE__BACKEND", "memory")
    args = _parse(
        ["-c", str(cfg), "--store", "etcd://h1:2379,h2:2379", "--reconcile-interval", "0.25"]
    )
    s = settings_from(args)  # type: ignore[arg-type]
    assert s.scheduler.reconcile_interval_s == 0.25
    assert (s.storage.backend, s.storage.url) == ("etcd", "etcd://h1:2379,h2:2379")
    # Without the flag the environment wins over the file.
    s = settings_from(_parse(["-c", str(cfg)]))  # type: ignore[arg-type]
    assert s.scheduler.reconcile_interval_s == 3.0


@pytest.mark.parametrize(
    ("body", "words"),
    [
        # reconcile_interval_s exists in [scheduler] too: the line must be the [agent] one.
        (
            '[scheduler]\nreconcile_interval_s = 1\n\n[agent]\nreconcile_interval_s = "soon"\n',
            ["agent.reconcile_interval_s (line 5)", "expected float", "'soon'"],
        ),
        (
            "[scheduler]\nstrategy = 'spread'\nreconcile_every = 3\n",
            ["scheduler.reconcile_every (line 3)", "unknown key 'reconcile_every'"],
        ),
        ("[gateway]\nport = 1\n", ["gateway.port (line 2)", "unknown section [gateway]"]),
        ("[server]\nport = \n", ["invalid TOML", "line 2"]),
    ],
)
def test_invalid_file_names_key_and_line(tmp_path: Path, body: str, words: list[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as info:
        Settings.load(cfg, env={})
    for word in words:
        assert word in str(info.value)


def test_bad_store_url_and_bad_env_are_rejected() -> None:
    with pytest.raises(ConfigError, match="use memory:// or etcd://"):
        Settings().storage.use_url("redis://x")
    with pytest.raises(ConfigError, match="environment DEEPINFER_AGENT__HEARTBEAT_TTL_S"):
        Settings.load(env={"DEEPINFER_AGENT__HEARTBEAT_TTL_S": "six"})
