"""Memory a deployment's engine needs on a CPU node, for the scheduler's fit check.

llama.cpp deployments: the GGUF's size (its weights are mapped whole) plus the f16 KV cache for
the context the engine will run with, read from the file's header (cached per file version).
Known only where the controller can see the file (a local alias or a path on this host); 0 (not
checked) otherwise, and for vLLM, whose CPU KV cache is set by VLLM_CPU_KVCACHE_SPACE.
"""

from __future__ import annotations

import logging

from ..errors import DeepInferError
from ..models import DeploymentSpec

log = logging.getLogger(__name__)


def engine_memory_need(spec: DeploymentSpec) -> int:
    """Bytes of RAM the engine of `spec` needs on a CPU node; 0 when unknown."""
    if spec.backend != "llama.cpp":
        return 0
    from ..engine import gguf_header, llamacpp_args

    try:
        path = llamacpp_args.resolve_gguf(spec.model)
        shape = gguf_header.shape(path)
    except (llamacpp_args.ArgsError, DeepInferError, OSError, ValueError) as exc:
        log.debug("no memory estimate for %s: %s", spec.name, exc)
        return 0  # not visible from here (another host's path): the worker finds out
    n_ctx = spec.max_model_len or gguf_header.default_n_ctx(shape.n_ctx_train)
    return shape.memory_need(n_ctx)
