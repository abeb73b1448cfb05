"""QPOChatModel: a LangChain chat model that rewrites each query with the QPO policy, then delegates.

The rewrite is a :class:`~qpo_middleware.integrations.langchain.rewriter.QPORewriter` (its
budget, fail-open and tracing); this module only adds the chat-model plumbing around it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import Context
from pathlib import Path
from typing import Any, Self, TypeVar, cast

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.runnables.config import ensure_config, set_config_context
from langchain_core.runnables.utils import coro_with_context
from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field, PrivateAttr, SecretStr, model_validator

from qpo_middleware.runtime import PromptOptimizer
from qpo_middleware.template import Placement

from .rewriter import QPORewriter

logger = logging.getLogger(__name__)

__all__ = ["QPOChatModel"]

T = TypeVar("T")

_TRACE_ONLY = ("temperature", "max_tokens", "timeout", "max_retries", "api_key")
_DONE = object()  # what _each_in/_aeach_in get from an exhausted iterator


def _rewrite_config(
    run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
) -> RunnableConfig | None:
    """The rewrite's config: a child of the LLM run (what ``get_child`` gives for chain runs), or the ambient one."""
    if run_manager is None:
        return None
    cls = AsyncCallbackManager if isinstance(run_manager, AsyncCallbackManagerForLLMRun) else CallbackManager
    manager = cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata(run_manager.inheritable_metadata)
    return {"callbacks": manager}


def _ambient(config: RunnableConfig | None) -> RunnableConfig:
    """The caller's config as the ambient config of nested runs (without the run id and name of the call)."""
    return cast(
        RunnableConfig, {k: v for k, v in ensure_config(config).items() if k not in ("run_id", "run_name")}
    )


def _each_in(context: Context, iterator: Iterator[T]) -> Iterator[T]:
    """``iterator``'s items, each step run in ``context`` (so it stays ambient across the caller's yields)."""
    try:
        while (item := context.run(next, iterator, _DONE)) is not _DONE:
            yield cast(T, item)
    finally:
        context.run(iterator.close)  # type: ignore[attr-defined]  # stream() gives a generator


async def _aeach_in(context: Context, iterator: AsyncIterator[T]) -> AsyncIterator[T]:
    """:func:`_each_in` for an async iterator."""
    try:
        while (item := await coro_with_context(anext(iterator, _DONE), context)) is not _DONE:
            yield cast(T, item)
    finally:
        await coro_with_context(iterator.aclose(), context)  # type: ignore[attr-defined]  # an async generator


def _as_chunks(result: ChatResult) -> Iterator[ChatGenerationChunk]:
    """A whole answer as one stream chunk (for wrapped models that cannot stream)."""
    for generation in result.generations[:1]:
        message = generation.message
        data = message.model_dump(exclude={"type"})
        chunk = (
            AIMessageChunk(**data)
            if isinstance(message, AIMessage)
            else AIMessageChunk(content=message.content)
        )
        yield ChatGenerationChunk(message=chunk, generation_info=generation.generation_info)


class QPOChatModel(BaseChatModel):
    """A chat model that rewrites each query with the QPO policy, then delegates to ``model``.

    >>> chat = QPOChatModel(model=ChatOpenAI(model="gpt-4o-mini"), bundle="bundle/")   # doctest: +SKIP

    ``_generate``/``_agenerate``/``_stream``/``_astream`` rewrite the messages, then call
    the wrapped model's own ``_generate``/``_agenerate``/``_stream``/``_astream`` within
    this model's run, so a call is one chat-model run, and tracing reports the wrapped
    model's provider and model name. The rewrite is a ``QPORewriter`` run with the
    prompt in its metadata: a child of the chat-model run on the ``_generate`` path;
    when LangChain streams (langchain-core 1.x gives ``_stream`` no run manager) it is
    traced under the caller's parent instead, just before the chat-model run.

    The wrapped model's instance-level ``callbacks``, ``cache`` and ``rate_limiter`` are
    not used: set them on the ``QPOChatModel``. ``bind_tools`` and
    ``with_structured_output`` use the wrapped model's implementation (its tool
    formatting, its structured-output methods); the rewrite still comes first.
    ``batch`` rewrites each input on its own; for one batched decode use
    :func:`with_qpo` (``QPORewriter.batch``).

    ``stop`` is sent to the wrapped model. ``temperature``, ``max_tokens``, ``timeout``,
    ``max_retries`` and ``api_key`` are accepted (LangChain's standard parameters) and
    reported to tracing only: set them on the wrapped model.
    """

    model: BaseChatModel
    """The chat model that answers the rewritten queries."""
    bundle: str | Path | None = None
    """Bundle directory made by ``qpo export``."""
    optimizer: PromptOptimizer | None = Field(default=None, exclude=True, repr=False)
    """An already loaded policy; takes the place of ``bundle``."""
    placement: Placement | None = None
    """Override of the bundle template's placement; None keeps it."""
    fail_open: bool = True
    """On a policy error or budget overrun, send the messages on unchanged (True) or raise (False)."""
    latency_budget_ms: float | None = Field(default=None, gt=0)
    """Longest time the policy may take per query, in milliseconds (the runtime enforces it); None: the
    optimizer's ``RuntimeConfig.latency_budget_ms``. See :class:`QPORewriter`."""
    stop: list[str] | None = None
    """Default stop sequences, sent to the wrapped model when a call gives none."""
    streaming: bool = False
    """Stream from the wrapped model even in ``invoke`` (chunks are merged)."""
    temperature: float | None = None
    """Tracing only: set it on the wrapped model."""
    max_tokens: int | None = None
    """Tracing only: set it on the wrapped model."""
    timeout: float | None = None
    """Tracing only: set it on the wrapped model."""
    max_retries: int | None = None
    """Tracing only: set it on the wrapped model."""
    api_key: SecretStr | None = None
    """Unused: set it on the wrapped model."""

    _rewriter: QPORewriter = PrivateAttr()

    @model_validator(mode="after")
    def _build_qpo_rewriter(self) -> Self:
        self._rewriter = QPORewriter(
            bundle=self.bundle,
            optimizer=self.optimizer,
            placement=self.placement,
            fail_open=self.fail_open,
            latency_budget_ms=self.latency_budget_ms,
        )
        self.optimizer = self._rewriter.optimizer
        unused = [name for name in _TRACE_ONLY if getattr(self, name) is not None]
        if unused:
            logger.warning(
                "QPOChatModel does not apply %s (only reported to tracing); set them on the wrapped %s.",
                ", ".join(unused),
                type(self.model).__name__,
            )
        return self

    @property
    def rewriter(self) -> QPORewriter:
        """The :class:`QPORewriter` this model runs before the wrapped model."""
        return self._rewriter

    @property
    def _llm_type(self) -> str:
        return "qpo-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model._llm_type,
            "model_params": self.model._identifying_params,
            "qpo_bundle_id": self._rewriter.bundle_id,
            "qpo_placement": self._rewriter.template.placement,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """The wrapped model's tracing params (it is the model that answers), with per-call overrides."""
        stop = self._stop(stop)
        try:
            params = LangSmithParams(**self.model._get_ls_params(stop=stop, **kwargs))
        except Exception:  # a wrapped model's tracing params must never break a call
            params = LangSmithParams()
        params["ls_model_type"] = "chat"
        params.setdefault("ls_provider", "qpo")
        override = kwargs.get("model")
        if isinstance(override, str):
            params["ls_model_name"] = override
        elif not isinstance(params.get("ls_model_name"), str):
            params["ls_model_name"] = self.model._llm_type
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop:
            params["ls_stop"] = stop
        return params

    def _stop(self, stop: list[str] | None) -> list[str] | None:
        return stop if stop is not None else self.stop

    def _inner_streams(self, *, async_api: bool) -> bool:
        cls = type(self.model)
        return cls._stream is not BaseChatModel._stream or (
            async_api and cls._astream is not BaseChatModel._astream
        )


    # -- delegation -----------------------------------------------------------------------
    #
    # The rewrite is a child run of this model's run when LangChain hands _generate/_stream a
    # run manager. langchain-core 1.x calls _stream without one (stream(), and invoke() when
    # streaming is on); the rewrite then runs under the ambient config: the enclosing
    # runnable's (LCEL, LangGraph), or, for top-level calls, the caller's config, which the
    # invoke/ainvoke/stream/astream overrides below make ambient for the call (``stop`` and
    # the other call options pass through ``kwargs``).

    def _rewrite(self, messages: list[BaseMessage], run_manager: CallbackManagerForLLMRun | None) -> list[BaseMessage]:
        return cast(list[BaseMessage], self._rewriter.invoke(messages, _rewrite_config(run_manager)))

    async def _arewrite(
        self, messages: list[BaseMessage], run_manager: AsyncCallbackManagerForLLMRun | None
    ) -> list[BaseMessage]:
        return cast(list[BaseMessage], await self._rewriter.ainvoke(messages, _rewrite_config(run_manager)))

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        with set_config_context(_ambient(config)) as context:
            return context.run(super().invoke, input, config, **kwargs)

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        with set_config_context(_ambient(config)) as context:
            return await coro_with_context(super().ainvoke(input, config, **kwargs), context)

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        with set_config_context(_ambient(config)) as context:
            yield from _each_in(context, super().stream(input, config, **kwargs))

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        with set_config_context(_ambient(config)) as context:
            async for chunk in _aeach_in(context, super().astream(input, config, **kwargs)):
                yield chunk

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        rewritten = self._rewrite(messages, run_manager)
        return self.model._generate(rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        rewritten = await self._arewrite(messages, run_manager)
        return await self.model._agenerate(rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        rewritten = self._rewrite(messages, run_manager)
        if not self._inner_streams(async_api=False):
            yield from _as_chunks(
                self.model._generate(rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs)
            )
            return
        yield from self.model._stream(rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        rewritten = await self._arewrite(messages, run_manager)
        if not self._inner_streams(async_api=True):
            result = await self.model._agenerate(
                rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs
            )
            for chunk in _as_chunks(result):
                yield chunk
            return
        # BaseChatModel._astream runs a sync-only _stream in a worker thread.
        async for chunk in self.model._astream(
            rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs
        ):
            yield chunk


    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools the way the wrapped model does (its ``bind_tools`` formats them); the rewrite comes first."""
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bound = self.model.bind_tools(tools, **kwargs)
        if isinstance(bound, RunnableBinding) and bound.bound is self.model:
            # The usual case: the wrapped model bound call kwargs to itself; bind them to this
            # model instead, and they reach the wrapped model's _generate through ours.
            rebound = self.bind(**bound.kwargs)
            return rebound.with_config(bound.config) if bound.config else rebound
        return cast(Runnable[LanguageModelInput, AIMessage], self._rewriter | bound)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """The wrapped model's structured output (all its ``method``/``strict`` options), after the rewrite."""
        structured = self.model.with_structured_output(schema, include_raw=include_raw, **kwargs)
        return cast(Runnable[LanguageModelInput, dict[str, Any] | BaseModel], self._rewriter | structured)
