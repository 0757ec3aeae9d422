"""llama.cpp shim arguments: GGUF lookup (alias, file, folder), threads from the CPU allotment,
and vLLM-only settings refused with what to do instead."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from deepinfer_nb.engine import llamacpp_args, local_models
from deepinfer_nb.engine.llamacpp_args import (
    ArgsError,
    cpu_allotment,
    default_threads,
    resolve_gguf,
)


def args(**kw: object) -> argparse.Namespace:
    base = dict(model="x.gguf", tensor_parallel_size=1, dtype="auto", device="", threads=0,
                max_model_len=None)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_gguf_alias_is_the_shipped_file() -> None:
    smol = local_models.CATALOG["smollm2-135m-instruct"]
    expected = str(local_models.gguf_path(smol))
    assert resolve_gguf("smollm2-135m-instruct-gguf") == expected
    assert resolve_gguf("smollm2-135m-instruct") == expected  # no conversion for llama.cpp


def test_folder_with_one_gguf_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "m.Q4.gguf").write_bytes(b"GGUF")
    assert resolve_gguf(str(tmp_path)) == str(tmp_path / "m.Q4.gguf")
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(ArgsError, match=r"2 \.gguf files"):
        resolve_gguf(str(tmp_path))
    with pytest.raises(ArgsError, match=r"model not found: /no/such\.gguf .*smollm2"):
        resolve_gguf("/no/such.gguf")


def test_vllm_only_settings_are_refused() -> None:
    with pytest.raises(ArgsError, match="one device") as err:
        llamacpp_args.settings(args(tensor_parallel_size=2), [])
    assert err.value.code == 2
    with pytest.raises(ArgsError, match="quantised"):
        llamacpp_args.settings(args(dtype="float16"), [])
    with pytest.raises(ArgsError, match="bad engine args: --max-num-seqs 4"):
        llamacpp_args.settings(args(), ["--max-num-seqs", "4"])


def test_threads_default_to_the_cpu_allotment_less_one_and_cpu_means_no_gpu_layers() -> None:
    s = llamacpp_args.settings(args(model="smollm2-135m-instruct-gguf", device="cpu"), [])
    assert s.threads == default_threads() == max(1, cpu_allotment() - 1)
    assert cpu_allotment() <= len(os.sched_getaffinity(0))
    assert s.n_gpu_layers == 0
    s = llamacpp_args.settings(
        args(model="smollm2-135m-instruct-gguf", threads=3), ["--flash-attn"]
    )
    assert (s.threads, s.flash_attn, s.n_gpu_layers) == (3, True, -1)
