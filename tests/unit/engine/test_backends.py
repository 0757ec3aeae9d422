"""The backends' capability list (one source): the README table is generated from it, requests
for a missing feature are refused with UNIMPLEMENTED's error naming the engine that has it, and
`engine: auto` picks llama.cpp for GGUFs."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepinfer_nb.engine.backends import CAPABILITIES, capability_table, check_supported
from deepinfer_nb.engine.validation import Sampling, Structured
from deepinfer_nb.errors import UnsupportedFeatureError
from deepinfer_nb.models import DeploymentSpec, engine_for

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_carries_the_generated_capability_table() -> None:
    assert capability_table() in README.read_text(), (
        "README.md's capability table is stale: paste "
        "deepinfer_nb.engine.backends.capability_table() into it"
    )


def test_table_has_a_row_per_capability_and_a_column_per_backend() -> None:
    lines = capability_table().splitlines()
    assert lines[0] == "| Capability | vllm | llama.cpp |"
    assert any(line.startswith("| `min_tokens` | yes | no |") for line in lines)


def test_missing_feature_is_refused_naming_the_engine_that_has_it() -> None:
    with pytest.raises(UnsupportedFeatureError, match=r"min_tokens .* llama\.cpp .* engine vllm"):
        check_supported(Sampling(min_tokens=3), backend="llama.cpp")
    check_supported(Sampling(min_tokens=3), backend="vllm")


def test_features_both_have_pass_on_both() -> None:
    asked = Sampling(n=2, seed=1, stop=("x",), logprobs=2, json_object=True, ignore_eos=True)
    for name in CAPABILITIES:
        check_supported(asked, backend=name)


def test_llamacpp_takes_json_schema_and_forced_tools_but_not_regex_or_auto_tools() -> None:
    schema = Sampling(structured=Structured(json_schema={"type": "object"}))
    for name in CAPABILITIES:
        check_supported(schema, backend=name, tool_choice="required")
        check_supported(schema, backend=name, tool_choice="function")
    with pytest.raises(UnsupportedFeatureError, match=r"structured_outputs .* engine vllm"):
        check_supported(Sampling(structured=Structured(regex="a+")), backend="llama.cpp")
    with pytest.raises(UnsupportedFeatureError, match=r"tool_choice_auto .* engine vllm"):
        check_supported(Sampling(), backend="llama.cpp", tool_choice="auto")
    check_supported(Sampling(structured=Structured(regex="a+")), backend="vllm", tool_choice="auto")


@pytest.mark.parametrize(
    ("model", "engine", "expected"),
    [
        ("smollm2-135m-instruct-gguf", "auto", "llama.cpp"),
        ("/models/SmolLM2.Q4_1.GGUF", "auto", "llama.cpp"),
        ("smollm2-135m-instruct", "auto", "vllm"),
        ("Qwen/Qwen2.5-7B-Instruct", "auto", "vllm"),
        ("smollm2-135m-instruct", "llama.cpp", "llama.cpp"),
        ("/m/x.gguf", "vllm", "vllm"),
    ],
)
def test_engine_auto_picks_llamacpp_for_a_gguf(model: str, engine: str, expected: str) -> None:
    assert engine_for(model, engine) == expected
    assert DeploymentSpec(name="d", model=model, engine=engine).backend == expected  # type: ignore[arg-type]


def test_llamacpp_refuses_tensor_parallel() -> None:
    with pytest.raises(ValueError, match="one device"):
        DeploymentSpec(name="d", model="m.gguf", tensor_parallel_size=2)
