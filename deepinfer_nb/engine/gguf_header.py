"""What a GGUF file needs in memory, from its header alone: the weights (the file size, mapped
whole) plus llama.cpp's f16 KV cache for the context it will run with.

Reads only the metadata key/value section at the file's start (no tensor data, no numpy), so
it takes milliseconds even for a vocabulary of 150k tokens; the `gguf` package's reader builds
every tensor view first and took seconds here.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from pathlib import Path
from typing import IO, Any

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
KV_BYTES = 2  # llama.cpp's default KV cache type is f16
DEFAULT_MAX_CTX = 4096
"""Context when none is given: the model's own, capped (the KV cache grows with it)."""
OVERHEAD = 1.1  # compute buffers and the runtime, measured at a few percent of the weights


@dataclasses.dataclass(frozen=True)
class GgufShape:
    file_bytes: int
    architecture: str
    n_layer: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int

    def kv_bytes(self, n_ctx: int) -> int:
        return 2 * self.n_layer * n_ctx * self.n_head_kv * self.head_dim * KV_BYTES

    def memory_need(self, n_ctx: int) -> int:
        """Bytes a llama.cpp engine needs for this model at context `n_ctx`."""
        return int((self.file_bytes + self.kv_bytes(n_ctx)) * OVERHEAD)


def default_n_ctx(n_ctx_train: int) -> int:
    return min(n_ctx_train, DEFAULT_MAX_CTX) if n_ctx_train > 0 else DEFAULT_MAX_CTX


def read_metadata(f: IO[bytes]) -> dict[str, Any]:
    """The GGUF key/value metadata (arrays of strings are skipped: the tokenizer's vocabulary)."""
    if f.read(4) != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic)")
    version, _tensors, kv_count = struct.unpack("<IQQ", f.read(20))
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    out: dict[str, Any] = {}
    for _ in range(kv_count):
        key = _string(f)
        out[key] = _value(f, struct.unpack("<I", f.read(4))[0])
    return out


def _string(f: IO[bytes]) -> str:
    (n,) = struct.unpack("<Q", f.read(8))
    return f.read(n).decode(errors="replace")


def _value(f: IO[bytes], kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = struct.unpack("<IQ", f.read(12))
        if item == _STRING:
            for _ in range(count):
                _string(f)
            return None
        fmt = _SCALARS[item]
        size = struct.calcsize(fmt)
        if count > 1024:  # token scores, types, merges: not needed, skip them
            f.seek(size * count, 1)
            return None
        return [struct.unpack(fmt, f.read(size))[0] for _ in range(count)]
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


@functools.lru_cache(maxsize=64)
def _shape(path: str, mtime_ns: int, size: int) -> GgufShape:
    with open(path, "rb") as f:
        meta = read_metadata(f)
    arch = str(meta.get("general.architecture", ""))

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return int(max(value) if isinstance(value, list) else value)  # per-layer arrays

    heads = num("attention.head_count", 1) or 1
    head_dim = num("attention.key_length") or num("embedding_length") // heads
    return GgufShape(
        file_bytes=size,
        architecture=arch,
        n_layer=num("block_count"),
        n_head_kv=num("attention.head_count_kv", heads),
        head_dim=head_dim,
        n_ctx_train=num("context_length"),
    )


def shape(path: str | Path) -> GgufShape:
    """The model's shape (cached per file version)."""
    st = Path(path).stat()
    return _shape(str(path), st.st_mtime_ns, st.st_size)
