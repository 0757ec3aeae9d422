"""Will it fit: the memory an engine needs, estimated from the model's config.json, compared with
what each node offers. Pure (no I/O): `preflight.py` reads the files, the scheduler and the entry
points call these.

    facts = facts_from_config(config, index_total_size=None)
    need = estimate(facts, spec, device="cuda")      # weights by dtype + KV cache
    problem = check(spec, facts, nodes)              # "" or the refusal with the numbers

Weights: the parameter count (from the architecture in config.json: embeddings, attention with
grouped KV heads and Qwen2's q/k/v biases, dense or mixture-of-experts MLPs, norms, an untied LM
head) times the bytes of the dtype the engine runs in. When the safetensors index gives the
checkpoint's size, that wins (it counts every tensor). KV cache: on GPU, one sequence of
`max_model_len` tokens (K and V, every layer, every KV head) must fit, as vLLM requires at
start-up; on CPU, vLLM reserves `VLLM_CPU_KVCACHE_SPACE` GiB (1 here unless the spec's env says
otherwise). A GPU offers `memory_total x gpu_memory_utilization` (vLLM's meaning), split over
`tensor_parallel_size` GPUs; a CPU node offers its RAM.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from ..defaults import effective
from ..models import DeploymentSpec, ModelFacts, Node

__all__ = ["Need", "check", "estimate", "facts_from_config", "facts_from_name", "no_gpu"]

GIB = 1024**3
DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "fp8": 1,
    "float8_e4m3fn": 1,
    "int8": 1,
}
DEFAULT_CPU_KV_GIB = 1.0


@dataclasses.dataclass(frozen=True)
class Need:
    """Bytes one replica needs: per GPU (weights and KV split over tensor parallel) or on CPU."""

    device: Literal["cpu", "cuda"]
    dtype: str
    weights: int
    kv: int
    tensor_parallel: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.kv

    @property
    def per_device(self) -> int:
        return -(-self.total // self.tensor_parallel)

    def describe(self) -> str:
        return (
            f"needs ~{self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f} in "
            f"{self.dtype} + KV {self.kv / GIB:.1f})"
        )


def facts_from_config(config: Mapping[str, Any], *, index_total_size: int = 0) -> ModelFacts:
    """Size facts from a Hugging Face config.json (text configs nested in `text_config` too)."""
    cfg = dict(config.get("text_config") or config)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 0)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
    dtype = str(config.get("torch_dtype") or config.get("dtype") or cfg.get("torch_dtype") or "")
    dtype = dtype.replace("torch.", "") or "bfloat16"
    params = _param_count(cfg, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    if index_total_size and dtype in DTYPE_BYTES:
        params = index_total_size // DTYPE_BYTES[dtype]
    return ModelFacts(
        params=params,
        dtype=dtype,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
    )


def _param_count(
    cfg: Mapping[str, Any], *, hidden: int, layers: int, heads: int, kv_heads: int
) -> int:
    vocab = int(cfg.get("vocab_size") or 0)
    head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
    q, kv = heads * head_dim, kv_heads * head_dim
    # Qwen2 has q/k/v biases and no flag saying so; Llama-likes say attention_bias.
    bias = bool(cfg.get("attention_bias")) or cfg.get("model_type") in ("qwen2", "qwen2_moe")
    attention = hidden * q + 2 * hidden * kv + q * hidden + ((q + 2 * kv) if bias else 0)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if experts:
        expert_inter = int(cfg.get("moe_intermediate_size") or inter)
        mlp = experts * 3 * hidden * expert_inter + hidden * experts
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
        mlp += 3 * hidden * shared + (hidden if shared else 0)
    else:
        mlp = 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return embeddings + layers * per_layer + hidden


_SIZE_IN_NAME = re.compile(r"(?:^|[-_/.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?=$|[-_.])", re.I)


def facts_from_name(model: str) -> ModelFacts | None:
    """A last resort when config.json cannot be read: the size many ids carry ("7B", "0.5B",
    "8x7B", "135M"), with bfloat16 weights. None when the id says nothing."""
    m = _SIZE_IN_NAME.search(model.rsplit("/", 1)[-1])
    if m is None:
        return None
    count = int(m[1] or 1) * float(m[2]) * (1e9 if m[3].lower() == "b" else 1e6)
    return ModelFacts(params=int(count), dtype="bfloat16", source="name")


def estimate(
    facts: ModelFacts,
    spec: DeploymentSpec,
    *,
    device: Literal["cpu", "cuda"],
    cpu_dtype: str = "",
) -> Need:
    """What one replica of `spec` needs on `device` (cpu_dtype: what "auto" means there)."""
    settings = effective(spec, device, cpu_dtype=cpu_dtype)
    dtype = settings.dtype
    if dtype == "auto":
        # GPU: the checkpoint's dtype; CPU without knowing the node: float32 (the safe side).
        dtype = facts.dtype if device == "cuda" else "float32"
    width = DTYPE_BYTES.get(dtype, 2)
    weights = facts.params * width
    if device == "cpu":
        kv = int(float(spec.env.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KV_GIB)) * GIB)
        return Need(device="cpu", dtype=dtype, weights=weights, kv=kv)
    length = settings.max_model_len or facts.max_position_embeddings
    kv = 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * length * width
    return Need(
        device="cuda",
        dtype=dtype,
        weights=weights,
        kv=kv,
        tensor_parallel=spec.tensor_parallel_size,
    )


def check(spec: DeploymentSpec, facts: ModelFacts, nodes: Iterable[Node]) -> str:
    """ "" if some node can hold one replica, else why not with the numbers and what to try.
    Device "auto" fits if either a GPU or (with no GPU anywhere) a CPU node holds it."""
    nodes = list(nodes)
    if not nodes:
        return ""  # nothing registered yet: the scheduler says so
    any_gpu = any(n.gpus for n in nodes)
    if spec.device == "cpu" or (spec.device == "auto" and not any_gpu):
        return _check_cpu(spec, facts, nodes, no_gpu=spec.device == "auto")
    return _check_gpu(spec, facts, nodes)


def _check_cpu(spec: DeploymentSpec, facts: ModelFacts, nodes: list[Node], *, no_gpu: bool) -> str:
    best: tuple[int, Node, Need] | None = None
    for node in nodes:
        need = estimate(facts, spec, device="cpu", cpu_dtype=node.cpu_dtype)
        if node.memory_total <= 0 or need.total <= node.memory_total:
            return ""
        if best is None or node.memory_total > best[0]:
            best = (node.memory_total, node, need)
    assert best is not None
    ram, node, need = best
    where = "no GPU on any node, so it would run on CPU: " if no_gpu else "on CPU it "
    guess = _guess(facts)
    return (
        f"{where}{need.describe()}{guess}; the largest node has {ram / GIB:.1f} GiB RAM "
        f"(node {node.id}); use a GPU node (--device cuda), a smaller model or a quantized one"
    )


def _check_gpu(spec: DeploymentSpec, facts: ModelFacts, nodes: list[Node]) -> str:
    need = estimate(facts, spec, device="cuda")
    fraction = spec.gpu_memory_utilization
    tp = spec.tensor_parallel_size
    offers = [
        (int(g.memory_total * fraction), n, g.index)
        for n in nodes
        for g in n.gpus
        if g.memory_total
    ]
    if not offers:
        return ""  # GPUs of unknown size (or none): the scheduler decides
    if any(offer >= need.per_device for offer, _, _ in offers):
        return ""
    offer, node, index = max(offers, key=lambda o: o[0])
    more = max(2, tp * 2)
    shorter = (effective(spec, "cuda").max_model_len or facts.max_position_embeddings) // 2
    tips = [f"--gpus {more}"]
    if shorter >= 1024:
        tips.append(f"--max-model-len {shorter}")
    split = f" per GPU over {tp} GPUs" if tp > 1 else ""
    return (
        f"{need.describe()}{split}{_guess(facts)}; the largest GPU offers {offer / GIB:.1f} GiB "
        f"(node {node.id}, GPU {index}, at gpu_memory_utilization {fraction:g}); try "
        f"{', '.join(tips)} or a smaller model"
    )


def no_gpu(spec: DeploymentSpec, facts: ModelFacts, nodes: Iterable[Node]) -> str:
    """When no node has a GPU and `spec` would therefore run on CPU (device auto): that fact
    with the numbers, to name beside another cause ("" otherwise)."""
    nodes = list(nodes)
    if spec.device != "auto" or not nodes or any(n.gpus for n in nodes):
        return ""
    node = max(nodes, key=lambda n: n.memory_total)
    need = estimate(facts, spec, device="cpu", cpu_dtype=node.cpu_dtype)
    why = f": {node.gpu_error}" if node.gpu_error else ""
    return (
        f"no GPU on any node (node {node.id}{why}), so it would run on CPU: {need.describe()}"
        f"{_guess(facts)}; node {node.id} has {node.memory_total / GIB:.1f} GiB RAM"
    )


def _guess(facts: ModelFacts) -> str:
    if facts.source != "name":
        return ""
    return f", estimated from the name: ~{facts.params / 1e9:.1f}B parameters"
