"""Will it fit: parameter counts from the real config.json files of well-known models (kept in
model_configs/) against their published counts, KV cache sizes, the refusals with numbers, and
the scheduler using the estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepinfer_nb.control import scheduler
from deepinfer_nb.control.scheduler import NoFit, PlacementRequest
from deepinfer_nb.hub import fit
from deepinfer_nb.models import DeploymentSpec, GpuInfo, ModelFacts, Node

CONFIGS = Path(__file__).parent / "model_configs"
GIB = 1024**3

# Published parameter counts (model cards / safetensors metadata on the hub).
PUBLISHED = {
    "Qwen2.5-0.5B-Instruct": 494_032_768,  # "0.49B"
    "Qwen2.5-7B-Instruct": 7_615_616_512,  # "7.61B"
    "Qwen2.5-72B-Instruct": 72_706_203_648,  # "72.7B"
    "Llama-3.1-8B-Instruct": 8_030_261_248,  # "8.03B"
    "Mistral-7B-v0.1": 7_241_732_096,  # "7.24B"
    "Mixtral-8x7B-Instruct-v0.1": 46_702_792_704,  # "46.7B" (MoE: every expert is loaded)
}


def facts(name: str) -> ModelFacts:
    return fit.facts_from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def spec(**kw: object) -> DeploymentSpec:
    return DeploymentSpec(name="m", model="org/m", **kw)  # type: ignore[arg-type]


def gpu_node(node_id: str, *sizes_gib: int) -> Node:
    gpus = [GpuInfo(index=i, memory_total=s * GIB) for i, s in enumerate(sizes_gib)]
    return Node(id=node_id, gpus=gpus, memory_total=256 * GIB)


def cpu_node(node_id: str = "vm", ram_gib: float = 23.4) -> Node:
    return Node(id=node_id, memory_total=int(ram_gib * GIB), cpu_dtype="float32")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name: str) -> None:
    assert facts(name).params == pytest.approx(PUBLISHED[name], rel=0.005)
    assert facts(name).dtype == "bfloat16"


def test_weights_by_dtype_and_kv_for_the_context() -> None:
    llama = facts("Llama-3.1-8B-Instruct")
    need = fit.estimate(llama, spec(max_model_len=8192), device="cuda")
    assert need.dtype == "bfloat16"
    assert need.weights == llama.params * 2  # 14.96 GiB
    # K and V x 32 layers x 8 KV heads x 128 dims x 8192 tokens x 2 bytes = 1 GiB
    assert need.kv == GIB
    # the model's full 128k context needs 16 GiB of KV for one sequence
    assert fit.estimate(llama, spec(), device="cuda").kv == 16 * GIB
    fp32 = fit.estimate(llama, spec(dtype="float32", max_model_len=8192), device="cuda")
    assert fp32.weights == 2 * need.weights and fp32.kv == 2 * need.kv
    # on CPU: auto is what the node computes best (float32 here), KV is the reserved space
    cpu = fit.estimate(llama, spec(device="cpu"), device="cpu", cpu_dtype="float32")
    assert (cpu.dtype, cpu.weights, cpu.kv) == ("float32", llama.params * 4, GIB)


def test_the_safetensors_index_size_wins() -> None:
    cfg = json.loads((CONFIGS / "Qwen2.5-7B-Instruct.json").read_text())
    exact = fit.facts_from_config(cfg, index_total_size=15_231_233_024)
    assert exact.params == 15_231_233_024 // 2


def test_a_model_that_fits_one_gpu_and_one_that_does_not() -> None:
    nodes = [gpu_node("a", 24, 24)]
    assert fit.check(spec(max_model_len=4096), facts("Qwen2.5-7B-Instruct"), nodes) == ""
    why = fit.check(spec(max_model_len=4096), facts("Qwen2.5-72B-Instruct"), nodes)
    assert why.startswith("needs ~136.7 GiB (weights 135.4 in bfloat16 + KV 1.2)")
    assert "the largest GPU offers 21.6 GiB (node a, GPU 0" in why
    assert "try --gpus 2, --max-model-len 2048 or a smaller model" in why
    # split over 8 x 80 GiB it fits
    big = [gpu_node("h", *[80] * 8)]
    assert fit.check(spec(tensor_parallel_size=8), facts("Qwen2.5-72B-Instruct"), big) == ""


def test_cpu_only_cluster_refuses_a_7b_model_with_the_numbers() -> None:
    why = fit.check(spec(), facts("Qwen2.5-7B-Instruct"), [cpu_node()])
    assert why.startswith("no GPU on any node, so it would run on CPU: needs ~29.4 GiB")
    assert "(weights 28.4 in float32 + KV 1.0)" in why
    assert "the largest node has 23.4 GiB RAM (node vm)" in why
    assert fit.check(spec(device="cpu"), facts("Qwen2.5-0.5B-Instruct"), [cpu_node()]) == ""


def test_sizes_from_names_when_config_is_out_of_reach() -> None:
    seven = fit.facts_from_name("Qwen/Qwen2.5-7B-Instruct")
    assert seven is not None and seven.params == 7_000_000_000 and seven.source == "name"
    moe = fit.facts_from_name("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert moe is not None and moe.params == 56_000_000_000
    small = fit.facts_from_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert small is not None and small.params == 135_000_000
    assert fit.facts_from_name("openai-community/gpt2") is None
    why = fit.check(spec(), seven, [cpu_node()])
    assert "estimated from the name: ~7.0B parameters" in why


def test_the_scheduler_places_by_the_estimate() -> None:
    s = spec(max_model_len=4096, facts=facts("Qwen2.5-72B-Instruct"))
    snaps = scheduler.snapshot([gpu_node("a", 24, 24)], [])
    result = scheduler.place(PlacementRequest.for_spec(s), snaps)
    assert isinstance(result, NoFit)
    assert "the model needs ~136.7 GiB per GPU" in result.reason
    small = spec(max_model_len=4096, facts=facts("Qwen2.5-7B-Instruct"))
    placed = scheduler.place(PlacementRequest.for_spec(small), snaps)
    assert not isinstance(placed, NoFit)
    cpu = spec(device="cpu", facts=facts("Qwen2.5-7B-Instruct"))
    refused = scheduler.place(PlacementRequest.for_spec(cpu), scheduler.snapshot([cpu_node()], []))
    assert isinstance(refused, NoFit) and "the largest node has 23.4 GiB RAM" in refused.reason
