"""`freeze_heap()`: take what a serving process allocated while starting out of the garbage
collector's sight.

The engine shim imports torch, transformers and vLLM and loads a tokenizer: over 600,000 objects
that live as long as the process. Each of Python's full collections walks all of them (0.4 s
measured on a 2-core CPU host), and every stream the process serves stalls meanwhile. vLLM's
EngineCore freezes its heap after start-up for this reason. So do our serving processes, once
started: the shim before it reports ready, and the processes that run the gateway (a tenth of
the shim's heap).
"""

from __future__ import annotations

import gc

__all__ = ["freeze_heap"]


def freeze_heap() -> int:
    """Collect once, then move every surviving object to the permanent generation, which later
    collections skip; how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
