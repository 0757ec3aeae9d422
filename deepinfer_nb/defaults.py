"""Device-aware engine defaults: the one place that turns a DeploymentSpec into the settings an
engine actually gets, for every entry point (magic, Python API, HTTP, CLI, config file).

A spec leaves `enforce_eager` and `max_model_len` unset (None) unless the user chose them; the
device an engine lands on then decides. On CPU (chosen by measurement, SmolLM2-135M on 2 cores;
see README "Engine defaults"):

- eager mode: ready in about 30 s, where vLLM's compiled mode took 114 s before the first token
  (start-up time matters most in a notebook; steady tokens/s differ little on CPU);
- a 2048-token context (the model's own when shorter, e.g. an embedder's): the KV cache fits
  the small CPU KV space (VLLM_CPU_KVCACHE_SPACE=1 GiB);
- dtype auto: bfloat16 only where the CPU computes it natively (AVX512-BF16/AMX), else float32
  (`engine/cpu_dtype.py`: emulated bf16 ran 6x slower).

On GPU, vLLM's own defaults: compiled with CUDA graphs, the model's dtype and full context.
"""

from __future__ import annotations

from typing import Literal

from .models import DeploymentSpec, EngineSettings

__all__ = ["CPU_MAX_MODEL_LEN", "EngineSettings", "effective", "placed_device"]

CPU_MAX_MODEL_LEN = 2048


def effective(
    spec: DeploymentSpec, device: Literal["cpu", "cuda"], *, cpu_dtype: str = ""
) -> EngineSettings:
    """The settings an engine of `spec` gets on `device`; `cpu_dtype` is what "auto" means on
    the node's CPU (known on the node only)."""
    cpu = device == "cpu"
    eager = spec.enforce_eager if spec.enforce_eager is not None else cpu
    max_len = spec.max_model_len
    known = spec.facts.max_position_embeddings if spec.facts is not None else 0
    if not max_len and cpu and spec.task != "embed" and not 0 < known <= CPU_MAX_MODEL_LEN:
        max_len = CPU_MAX_MODEL_LEN  # a shorter window (an embedder's) is left to the engine
    dtype = spec.dtype
    if dtype == "auto" and cpu and cpu_dtype:
        dtype = cpu_dtype
    return EngineSettings(
        device=device,
        dtype=dtype,
        enforce_eager=eager,
        mode="eager" if eager else "compiled",
        max_model_len=max_len,
    )


def placed_device(spec: DeploymentSpec, *, any_gpu: bool) -> Literal["cpu", "cuda"]:
    """The device the scheduler picks for `spec` (auto: a GPU when some node has one)."""
    if spec.device == "cpu":
        return "cpu"
    if spec.device == "auto" and not any_gpu:
        return "cpu"
    return "cuda"
