"""`--dtype auto` on CPU: bfloat16 only where the CPU computes it natively."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepinfer_nb.engine.__main__ import build_parser, vllm_argv
from deepinfer_nb.engine.cpu_dtype import best_cpu_dtype, cpu_flags


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        ({"avx2", "fma"}, "float32"),  # AVX2-only x86: oneDNN has no bf16 matmul
        ({"avx512f", "avx512_bf16"}, "bfloat16"),
        ({"amx_tile", "amx_bf16"}, "bfloat16"),
        ({"asimd", "bf16"}, "bfloat16"),  # Arm
        (set(), "float32"),  # unknown: the safe choice
    ],
)
def test_best_cpu_dtype(flags: set[str], dtype: str) -> None:
    assert best_cpu_dtype(frozenset(flags)) == dtype


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "fma"}
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_shim_resolves_auto_only_for_cpu() -> None:
    def dtype(*argv: str) -> str:
        args = build_parser().parse_args(["--model", "m", "--port", "1", *argv])
        out = vllm_argv(args, "/m", [])
        return out[out.index("--dtype") + 1]

    assert dtype("--device", "cpu") == best_cpu_dtype()
    assert dtype("--device", "cpu", "--dtype", "bfloat16") == "bfloat16"  # explicit wins
    assert dtype("--device", "cuda:0") == "auto"
