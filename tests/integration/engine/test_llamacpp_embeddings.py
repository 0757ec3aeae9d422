"""The llama.cpp engine's embeddings: a BERT GGUF (all-MiniLM-L6-v2, written by
tests/fixtures/bert_gguf.py) behind the real shim process. The shim reports task "embed", answers
CreateEmbedding with little-endian float32 bytes per input (one call for a list), and refuses
generation with FAILED_PRECONDITION."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio

from deepinfer_nb._proto import engine_service_pb2 as pb
from deepinfer_nb.engine import process
from deepinfer_nb.engine.process import ShimProcess
from deepinfer_nb.errors import UnsupportedTaskError
from tests.fixtures.bert_gguf import write_minilm_gguf

pytestmark = pytest.mark.engine

CAT, CAT2, MARKETS = (
    "The cat sits on the mat",
    "A cat is sitting on a mat",
    "Stock markets fell sharply today",
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def embedder(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ShimProcess]:
    gguf = write_minilm_gguf(tmp_path_factory.mktemp("bert") / "all-minilm-l6-v2.f32.gguf")
    shim = await process.start_shim(
        model=str(gguf), token="t", flags=("--backend", "llama.cpp", "--device", "cpu")
    )
    try:
        yield shim
    finally:
        shim.kill()


def _vectors(reply: pb.EmbeddingResponse) -> list[np.ndarray]:
    return [np.frombuffer(e.float32_le, dtype="<f4") for e in reply.data]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


async def test_embeddings_as_float32_bytes_rank_paraphrases_first(embedder: ShimProcess) -> None:
    async with embedder.client() as client:
        info = await client.model_info()
        reply = await client.embed(pb.EmbeddingRequest(input=[CAT, CAT2, MARKETS]))
        again = await client.embed(pb.EmbeddingRequest(input=[CAT]))
    assert (info.task, info.architecture) == ("embed", "bert")
    cat, cat2, markets = _vectors(reply)
    assert [e.index for e in reply.data] == [0, 1, 2] and cat.shape == (384,)
    assert _cosine(cat, cat2) > 0.9 > 0.2 > _cosine(cat, markets)
    assert np.array_equal(_vectors(again)[0], cat)  # the same input, the same bytes
    assert reply.usage.prompt_tokens > 3 * 5  # [CLS] ... [SEP] per input


async def test_generation_is_refused_with_failed_precondition(embedder: ShimProcess) -> None:
    async with embedder.client() as client:
        with pytest.raises(UnsupportedTaskError, match="not chat completions"):
            await client.chat(
                pb.ChatRequest(
                    messages=[pb.ChatMessage(role="user", content="hi")],
                    sampling=pb.SamplingParams(max_tokens=4),
                )
            )
