"""The dtype a CPU engine runs fastest in here: what `--dtype auto` means with `--device cpu`.

vLLM on CPU computes bfloat16 matmuls with oneDNN only where the CPU has native bf16 (AVX512-BF16
or AMX on x86, the `bf16` feature on Arm). Elsewhere, e.g. on an AVX2-only CPU, oneDNN refuses the
primitive ("Failed to create oneDNN linear, fallback to torch linear") and every layer runs through
torch's emulated bf16 matmul: measured here (SmolLM2-135M, 2 AVX2 cores, 100 concurrent 8-token
streams) 116 s in bfloat16 against 18 s in float32. So: bfloat16 with native support, else float32.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BF16_FLAGS", "best_cpu_dtype", "cpu_flags"]

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU ("flags" on x86, "Features" on Arm); empty if unknown."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def best_cpu_dtype(flags: frozenset[str] | None = None) -> str:
    """ "bfloat16" where the CPU computes it natively, else "float32"."""
    return "bfloat16" if (cpu_flags() if flags is None else flags) & BF16_FLAGS else "float32"
