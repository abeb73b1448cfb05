"""LangChain integration: rewrite every query with the QPO policy before the chat model sees it.

Three entry points:

* :class:`QPORewriter`: a Runnable that takes what a chat model takes (a string, a
  ``PromptValue``, a list of messages) or a dict holding one of those under
  ``input_key``, and returns the same kind with the policy's prompt added around the
  last human turn. The query text itself is never altered or dropped.
* :func:`with_qpo`: ``QPORewriter(...) | chat_model`` in one call.
* :class:`QPOChatModel`: a ``BaseChatModel`` that rewrites, then delegates to any chat
  model (streaming, tools and structured output pass through).

Tracing: every rewrite is a child run (run type ``prompt``). Its metadata holds
``qpo_bundle_id`` from the start and, once the policy has answered, ``qpo_prompt``,
``qpo_status`` (``rewritten``, ``skipped``, ``timeout``, ``overloaded`` or ``error``),
``qpo_latency_ms`` and ``qpo_tokens`` (plus ``qpo_error`` when it failed open).
Tracers that keep the run (LangSmith, ``astream_events``, any ``BaseTracer``) see
them on the run; every callback handler also receives them as the custom event
``qpo_rewrite`` (:data:`QPO_EVENT`).

Fail-open: when the policy raises or exceeds ``latency_budget_ms``, the input goes on
unchanged, and the event is logged, counted (:attr:`QPORewriter.stats`) and recorded
in the run's metadata; ``fail_open=False`` raises instead. A budget only stops the
*wait*: the decode runs in a worker thread, keeps running in the background after an
overrun, and its result is dropped.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeAlias, TypeVar, cast

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForChainRun,
    AsyncCallbackManagerForLLMRun,
    BaseRunManager,
    CallbackManager,
    CallbackManagerForChainRun,
    CallbackManagerForLLMRun,
)
from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    convert_to_messages,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import ChatPromptValue, PromptValue, StringPromptValue
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import ensure_config, get_config_list, set_config_context
from langchain_core.runnables.utils import coro_with_context
from langchain_core.tools import BaseTool
from langchain_core.tracers.schemas import Run
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from qpo_middleware.runtime import LatencyBudgetExceeded as _RuntimeBudgetExceeded
from qpo_middleware.runtime import OptimizedPrompt, PromptOptimizer
from qpo_middleware.template import Placement, Template

logger = logging.getLogger(__name__)

__all__ = ["QPO_EVENT", "LatencyBudgetExceeded", "QPOChatModel", "QPORewriter", "bundle_id", "with_qpo"]

QPO_EVENT = "qpo_rewrite"
"""Name of the custom callback event sent after each rewrite (its data is the run metadata added)."""

QPOInput: TypeAlias = LanguageModelInput | dict[str, Any]
OutputT = TypeVar("OutputT")

_POLICY_WORKERS = 4
_executor_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _policy_executor() -> ThreadPoolExecutor:
    """Worker threads for decodes under a latency budget and for async callers (shared, made on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_POLICY_WORKERS, thread_name_prefix="qpo-policy")
        return _executor


class LatencyBudgetExceeded(_RuntimeBudgetExceeded):
    """The policy did not answer within ``latency_budget_ms`` (raised only with ``fail_open=False``)."""


def bundle_id(optimizer: PromptOptimizer) -> str:
    """A short, stable id of a loaded bundle: its task and the first 12 hex digits of model.onnx's SHA-256."""
    manifest = optimizer.manifest
    return f"{manifest.task}-{manifest.files.get(manifest.model.file, '')[:12]}"


# ---------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One input: the text the policy sees (``None``: nothing to rewrite) and how to put a prompt back."""

    original: Any
    query: str | None
    rebuild: Callable[[str], Any]


def _is_text_block(block: Any) -> bool:
    return isinstance(block, str) or (isinstance(block, dict) and block.get("type") == "text")


def _add_prompt(content: str | list[Any], prompt: str, template: Template) -> str | list[Any]:
    """The user turn with the prompt added per ``template`` ("before"/"after"); the query stays verbatim."""
    if isinstance(content, str):
        return template.user_text(prompt, content)
    # Multimodal content: the prompt is its own text block, beside the text blocks; nothing else moves.
    blocks = list(content)
    texts = [i for i, block in enumerate(blocks) if _is_text_block(block)] or [len(blocks)]
    if template.placement == "after":
        blocks.insert(texts[-1] + 1, {"type": "text", "text": template.separator + prompt})
    else:
        blocks.insert(texts[0], {"type": "text", "text": prompt + template.separator})
    return blocks


def _append_text(content: str | list[Any], text: str) -> str | list[Any]:
    return content + text if isinstance(content, str) else [*content, {"type": "text", "text": text}]


def _text_slot(original: Any, text: str, template: Template, wrap: Callable[[str], Any]) -> _Slot:
    def rebuild(prompt: str) -> Any:
        if template.placement == "system":
            # A plain string has no system slot: the result becomes a chat prompt.
            return ChatPromptValue(messages=[SystemMessage(content=prompt), HumanMessage(content=text)])
        return wrap(template.user_text(prompt, text))

    return _Slot(original, text if text.strip() else None, rebuild)


def _messages_slot(
    original: Any, messages: list[BaseMessage], template: Template, wrap: Callable[[list[BaseMessage]], Any]
) -> _Slot:
    index = next((i for i in reversed(range(len(messages))) if isinstance(messages[i], HumanMessage)), None)
    if index is None:
        return _Slot(original, None, lambda prompt: original)
    human = messages[index]
    query = human.text

    def rebuild(prompt: str) -> Any:
        out = list(messages)
        if template.placement == "system":
            first = out[0]
            if isinstance(first, SystemMessage):
                # Keep the caller's system text; the policy's prompt follows it.
                content = _append_text(first.content, template.separator + prompt)
                out[0] = first.model_copy(update={"content": content})
            else:
                out.insert(0, SystemMessage(content=prompt))
        else:
            out[index] = human.model_copy(update={"content": _add_prompt(human.content, prompt, template)})
        return wrap(out)

    return _Slot(original, query if query.strip() else None, rebuild)


def _value_slot(value: Any, template: Template, where: str) -> _Slot:
    if isinstance(value, str):
        return _text_slot(value, value, template, lambda text: text)
    if isinstance(value, StringPromptValue):
        return _text_slot(value, value.text, template, lambda text: StringPromptValue(text=text))
    if isinstance(value, PromptValue):
        return _messages_slot(
            value, value.to_messages(), template, lambda messages: ChatPromptValue(messages=messages)
        )
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        try:
            messages = convert_to_messages(value)
        except Exception as exc:
            raise TypeError(
                f"QPORewriter: {where} is a sequence but not a list of chat messages ({exc}). Pass "
                "BaseMessage objects, (role, content) tuples or {'role': ..., 'content': ...} dicts."
            ) from exc
        return _messages_slot(value, messages, template, lambda messages: messages)
    raise TypeError(
        f"QPORewriter takes a str, a PromptValue, a list of messages, or a dict holding one of those under "
        f"input_key; {where} is a {type(value).__name__}."
    )


def _slot(value: Any, template: Template, input_key: str) -> _Slot:
    if isinstance(value, Mapping):
        if input_key not in value:
            raise ValueError(
                f"QPORewriter got a dict without the key {input_key!r} (keys: {sorted(map(str, value))}); "
                "set input_key= to the key that holds the query."
            )
        inner = _value_slot(value[input_key], template, f"input[{input_key!r}]")
        return _Slot(value, inner.query, lambda prompt: {**value, input_key: inner.rebuild(prompt)})
    return _value_slot(value, template, "the input")


# ---------------------------------------------------------------------------- tracing


def _update_run_metadata(run_manager: BaseRunManager, info: Mapping[str, Any]) -> None:
    """Add ``info`` to the metadata of ``run_manager``'s run in every handler that keeps that run.

    The run started before the policy answered, so its start metadata cannot hold the
    prompt. Tracers (``BaseTracer``, which LangSmith's tracer is) keep a ``Run`` per id and
    report it when it ends; ``astream_events`` keeps a dict with the metadata it reports.
    Dicts are replaced, never mutated, since handlers may share them.
    """
    run_id = run_manager.run_id
    for handler in run_manager.handlers:
        run_map = getattr(handler, "run_map", None)
        if not isinstance(run_map, dict):
            continue
        run = run_map.get(str(run_id), run_map.get(run_id))
        if isinstance(run, Run):
            extra = dict(run.extra or {})
            extra["metadata"] = {**(extra.get("metadata") or {}), **info}
            run.extra = extra
        elif isinstance(run, dict) and isinstance(run.get("metadata"), dict):
            run["metadata"] = {**run["metadata"], **info}


def _with_metadata(config: RunnableConfig | None, **metadata: Any) -> RunnableConfig:
    config = ensure_config(config)
    return cast(RunnableConfig, {**config, "metadata": {**config.get("metadata", {}), **metadata}})


# ---------------------------------------------------------------------------- the rewriter


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """What one optimizer call gave: results, or why there are none."""

    results: list[OptimizedPrompt] | None
    status: str  # "rewritten" | "timeout" | "error"
    latency_ms: float = 0.0
    error: BaseException | None = None


class QPORewriter(RunnableSerializable[QPOInput, QPOInput]):
    """Adds the QPO policy's prompt for each query to a chat model's input.

    >>> rewriter = QPORewriter(bundle="runs/quickstart/bundle")       # doctest: +SKIP
    >>> chain = rewriter | chat_model                                 # doctest: +SKIP

    Input and output are of the same kind: ``str`` -> ``str``, ``StringPromptValue`` ->
    ``StringPromptValue``, other ``PromptValue`` -> ``ChatPromptValue``, list of messages
    -> list of ``BaseMessage``, dict -> dict with ``input_key`` rewritten. The last human
    message (or the string) gets the prompt per the bundle's template (or ``placement``):
    ``before``/``after`` the query in the same turn, or ``system``: in a system message
    (appended to a leading system message when there is one, else inserted first; a
    string or ``StringPromptValue`` input then becomes a ``ChatPromptValue``).
    Inputs without query text pass through untouched (status ``skipped``).

    ``batch``/``abatch`` make one batched decode for all inputs; ``ainvoke``/``abatch``
    decode in a worker thread, so the event loop is never blocked. The latency budget
    applies to each optimizer call: one query for ``invoke``, the whole batch for ``batch``.
    """

    bundle: str | Path | None = None
    """Bundle directory made by ``qpo export``; loaded (and checksummed) once, at construction."""
    optimizer: PromptOptimizer | None = Field(default=None, exclude=True, repr=False)
    """An already loaded policy (share one between rewriters); takes the place of ``bundle``."""
    placement: Placement | None = None
    """Override of the bundle template's placement ("before", "after" or "system"); None keeps it."""
    fail_open: bool = True
    """On a policy error or budget overrun, pass the input on unchanged (True) or raise (False).

    Any text is safe to send (surrogates, NULs, 100k characters: see docs/reliability.md). An
    input that is not chat-model input at all (None, a number, bytes, a dict without
    ``input_key``) raises ``TypeError``/``ValueError`` either way: it is the caller's error, and
    the chat model would refuse it too."""
    latency_budget_ms: float | None = Field(default=None, gt=0)
    """Longest wait for the policy, in milliseconds; None waits as long as it takes."""
    input_key: str = "input"
    """For dict inputs: the key that holds the query (a str, PromptValue or list of messages)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    _template: Template = PrivateAttr(default_factory=Template)
    _bundle_id: str = PrivateAttr(default="")
    _stats: Counter[str] = PrivateAttr(default_factory=Counter)
    _stats_lock: Any = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="after")
    def _load_qpo_policy(self) -> Self:
        if self.optimizer is None:
            if self.bundle is None:
                raise ValueError(
                    "QPORewriter needs a policy: pass bundle=<directory made by `qpo export`> or "
                    "optimizer=PromptOptimizer.from_bundle(...)."
                )
            self.optimizer = PromptOptimizer.from_bundle(self.bundle)
        base = self.optimizer.template
        self._template = (
            base if self.placement is None else dataclasses.replace(base, placement=self.placement)
        )
        self._bundle_id = bundle_id(self.optimizer)
        return self

    # -- views ----------------------------------------------------------------------------

    @property
    def bundle_id(self) -> str:
        """The loaded bundle's id (task and model.onnx hash), as recorded in the run metadata."""
        return self._bundle_id

    @property
    def template(self) -> Template:
        """The template used to render (the bundle's, with ``placement`` applied)."""
        return self._template

    @property
    def stats(self) -> dict[str, int]:
        """Counts since construction: queries, rewritten, skipped, passed_through, timeout, error."""
        with self._stats_lock:
            return dict(self._stats)

    def _policy(self) -> PromptOptimizer:
        if self.optimizer is None:  # pragma: no cover - the validator always sets it
            raise RuntimeError("QPORewriter has no policy loaded.")
        return self.optimizer

    # -- Runnable API ---------------------------------------------------------------------

    def invoke(self, input: QPOInput, config: RunnableConfig | None = None, **kwargs: Any) -> QPOInput:
        return self._call_with_config(self._rewrite_one, input, self._traced(config), run_type="prompt")

    async def ainvoke(self, input: QPOInput, config: RunnableConfig | None = None, **kwargs: Any) -> QPOInput:
        return await self._acall_with_config(
            self._arewrite_one, input, self._traced(config), run_type="prompt"
        )

    def batch(
        self,
        inputs: list[QPOInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any | None,
    ) -> list[QPOInput]:
        if not inputs:
            return []
        configs = [self._traced(c) for c in get_config_list(config, len(inputs))]
        return self._batch_with_config(
            self._rewrite_many, inputs, configs, return_exceptions=return_exceptions, run_type="prompt"
        )

    async def abatch(
        self,
        inputs: list[QPOInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any | None,
    ) -> list[QPOInput]:
        if not inputs:
            return []
        configs = [self._traced(c) for c in get_config_list(config, len(inputs))]
        return await self._abatch_with_config(
            self._arewrite_many, inputs, configs, return_exceptions=return_exceptions, run_type="prompt"
        )

    def _traced(self, config: RunnableConfig | None) -> RunnableConfig:
        return _with_metadata(config, qpo_bundle_id=self._bundle_id)

    # -- sync and async callers of the shared steps ---------------------------------------

    def _rewrite_one(
        self, input: QPOInput, run_manager: CallbackManagerForChainRun, config: RunnableConfig
    ) -> QPOInput:
        return _raise_if_error(self._rewrite_many([input], [run_manager], [config])[0])

    async def _arewrite_one(
        self, input: QPOInput, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> QPOInput:
        return _raise_if_error((await self._arewrite_many([input], [run_manager], [config]))[0])

    def _rewrite_many(
        self,
        inputs: list[QPOInput],
        run_manager: list[CallbackManagerForChainRun],
        config: list[RunnableConfig],
    ) -> list[QPOInput | Exception]:
        slots = self._plan(inputs)
        rows = self._outputs(slots, self._decode(_queries(slots)))
        for (_, info), manager, cfg in zip(rows, run_manager, config, strict=True):
            if info is not None:
                _update_run_metadata(manager, info)
                dispatch_custom_event(QPO_EVENT, info, config=cfg)
        return [output for output, _ in rows]

    async def _arewrite_many(
        self,
        inputs: list[QPOInput],
        run_manager: list[AsyncCallbackManagerForChainRun],
        config: list[RunnableConfig],
    ) -> list[QPOInput | Exception]:
        slots = self._plan(inputs)
        rows = self._outputs(slots, await self._adecode(_queries(slots)))
        for (_, info), manager, cfg in zip(rows, run_manager, config, strict=True):
            if info is not None:
                _update_run_metadata(manager, info)
                await adispatch_custom_event(QPO_EVENT, info, config=cfg)
        return [output for output, _ in rows]

    # -- shared steps ---------------------------------------------------------------------

    def _plan(self, inputs: Sequence[QPOInput]) -> list[_Slot | Exception]:
        """Parse every input; a bad input becomes its row's exception (the others still run)."""
        slots: list[_Slot | Exception] = []
        for value in inputs:
            try:
                slots.append(_slot(value, self._template, self.input_key))
            except (TypeError, ValueError) as exc:
                slots.append(exc)
        return slots

    def _decode(self, queries: list[str]) -> _Outcome:
        """Run the policy on ``queries`` in this thread, or in a worker when there is a budget."""
        if not queries:
            return _Outcome([], "rewritten")
        start = time.perf_counter()
        try:
            if self.latency_budget_ms is None:
                results = self._optimize(queries)
            else:
                future = _policy_executor().submit(self._optimize, queries)
                try:
                    results = future.result(timeout=self.latency_budget_ms / 1000.0)
                except TimeoutError:
                    if future.done():  # the optimizer itself raised TimeoutError
                        raise
                    future.cancel()  # only stops a decode that has not started; a running one finishes
                    return self._overrun(start)
        except _RuntimeBudgetExceeded as exc:  # the optimizer's own budget, without its fail-open
            return _Outcome(None, "timeout", _elapsed_ms(start), exc)
        except Exception as exc:
            return _Outcome(None, "error", _elapsed_ms(start), exc)
        return _Outcome(results, "rewritten", _elapsed_ms(start))

    async def _adecode(self, queries: list[str]) -> _Outcome:
        """Like :meth:`_decode`, always in a worker thread so the event loop keeps running."""
        if not queries:
            return _Outcome([], "rewritten")
        start = time.perf_counter()
        if self._policy().batching:
            # Micro-batching: await the shared batcher directly (no worker thread per call); the
            # optimizer applies the budget and fails open on its own.
            try:
                results = await self._policy().aoptimize_batch(queries, latency_budget_ms=self.latency_budget_ms)
            except _RuntimeBudgetExceeded as exc:  # the optimizer's own budget, without its fail-open
                return _Outcome(None, "timeout", _elapsed_ms(start), exc)
            except Exception as exc:
                return _Outcome(None, "error", _elapsed_ms(start), exc)
            return _Outcome(results, "rewritten", _elapsed_ms(start))
        future = asyncio.get_running_loop().run_in_executor(_policy_executor(), self._optimize, queries)
        try:
            if self.latency_budget_ms is None:
                results = await future
            else:
                results = await asyncio.wait_for(future, self.latency_budget_ms / 1000.0)
        except TimeoutError:
            if not future.cancelled():  # the optimizer itself raised TimeoutError
                error = future.exception()
                status = "timeout" if isinstance(error, _RuntimeBudgetExceeded) else "error"
                return _Outcome(None, status, _elapsed_ms(start), error)
            return self._overrun(start)
        except Exception as exc:
            return _Outcome(None, "error", _elapsed_ms(start), exc)
        return _Outcome(results, "rewritten", _elapsed_ms(start))

    def _optimize(self, queries: list[str]) -> list[OptimizedPrompt]:
        # The budget goes into the decode too, so an overrun stops there instead of running on
        # in the background and holding a worker.
        return self._policy().optimize_batch(queries, latency_budget_ms=self.latency_budget_ms)

    def _overrun(self, start: float) -> _Outcome:
        fix = "" if self.fail_open else ", or set fail_open=True to send queries on unchanged"
        error = LatencyBudgetExceeded(
            f"The QPO policy took longer than latency_budget_ms={self.latency_budget_ms:g} (its decode finishes "
            "in the background). Raise the budget, or serve a faster bundle (`qpo export --quantize int8` on "
            f"CPU, `--fp16` on GPU){fix}."
        )
        return _Outcome(None, "timeout", _elapsed_ms(start), error)

    def _outputs(
        self, slots: list[_Slot | Exception], outcome: _Outcome
    ) -> list[tuple[QPOInput | Exception, dict[str, Any] | None]]:
        """Rewritten inputs and the metadata of each row's run (``None`` for rows that failed to parse)."""
        failed = outcome.status != "rewritten"
        counts: Counter[str] = Counter()
        rows: list[tuple[QPOInput | Exception, dict[str, Any] | None]] = []
        results = iter(outcome.results or ())
        for slot in slots:
            if isinstance(slot, Exception):
                rows.append((slot, None))
                continue
            info: dict[str, Any] = {"qpo_bundle_id": self._bundle_id, "qpo_prompt": ""}
            counts["queries"] += 1
            if slot.query is None:
                info["qpo_status"] = "skipped"
                rows.append((slot.original, info))
            elif failed:
                info.update(
                    qpo_status=outcome.status,
                    qpo_latency_ms=round(outcome.latency_ms, 3),
                    qpo_error=f"{type(outcome.error).__name__}: {outcome.error}",
                )
                counts["passed_through"] += int(self.fail_open)
                rows.append((slot.original, info))
            else:
                result = next(results)
                # The optimizer's own fail-open outcomes (its budget ran out, its queue was full)
                # pass the row through like the rewriter's.
                status = "rewritten" if result.status in ("rewritten", "cached") else result.status
                info.update(
                    qpo_status=status,
                    qpo_prompt=result.prompt,
                    qpo_latency_ms=round(outcome.latency_ms, 3),
                    qpo_tokens=result.tokens,
                )
                if status in ("timeout", "overloaded"):
                    counts["passed_through"] += 1
                rows.append((slot.rebuild(result.prompt) if result.prompt else slot.original, info))
            counts[info["qpo_status"]] += 1
        with self._stats_lock:
            self._stats.update(counts)
        if failed:
            if not self.fail_open:
                raise cast(BaseException, outcome.error)
            logger.warning(
                "QPO policy %s failed open (%s: %s); %d input(s) sent on unchanged.",
                self._bundle_id,
                outcome.status,
                outcome.error,
                counts["passed_through"],
            )
        return rows


def _queries(slots: list[_Slot | Exception]) -> list[str]:
    return [slot.query for slot in slots if isinstance(slot, _Slot) and slot.query is not None]


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _raise_if_error(value: QPOInput | Exception) -> QPOInput:
    if isinstance(value, Exception):
        raise value
    return value


def _rewriter_for(bundle: str | os.PathLike[str] | PromptOptimizer, **kwargs: Any) -> QPORewriter:
    if isinstance(bundle, PromptOptimizer):
        return QPORewriter(optimizer=bundle, **kwargs)
    return QPORewriter(bundle=os.fspath(bundle), **kwargs)


def with_qpo(
    chat_model: Runnable[Any, OutputT],
    bundle: str | os.PathLike[str] | PromptOptimizer,
    **kwargs: Any,
) -> Runnable[QPOInput, OutputT]:
    """``QPORewriter(bundle=bundle, **kwargs) | chat_model``: the chat model, with a prompt written per query.

    ``bundle`` is a bundle directory or a loaded :class:`PromptOptimizer`; ``kwargs`` go to
    :class:`QPORewriter` (``placement``, ``fail_open``, ``latency_budget_ms``, ``input_key``).
    ``stream``/``astream`` yield the chat model's chunks.
    """
    return _rewriter_for(bundle, **kwargs) | chat_model


# ---------------------------------------------------------------------------- the chat model


_TRACE_ONLY = ("temperature", "max_tokens", "timeout", "max_retries", "api_key")


def _child_callbacks(
    run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None,
) -> CallbackManager | AsyncCallbackManager | None:
    """Callbacks for a run nested under an LLM run (what ``get_child`` gives for chain runs)."""
    if run_manager is None:
        return None
    cls = AsyncCallbackManager if isinstance(run_manager, AsyncCallbackManagerForLLMRun) else CallbackManager
    manager = cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata(run_manager.inheritable_metadata)
    return manager


def _ambient(config: RunnableConfig | None) -> RunnableConfig:
    """The caller's config as the ambient config of nested runs (without the run id and name of the call)."""
    return cast(
        RunnableConfig, {k: v for k, v in ensure_config(config).items() if k not in ("run_id", "run_name")}
    )


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
    """Longest wait for the policy, in milliseconds; None waits as long as it takes."""
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
    # invoke/ainvoke/stream/astream overrides below make ambient for the call.

    def _rewrite(
        self, messages: list[BaseMessage], run_manager: CallbackManagerForLLMRun | None
    ) -> list[BaseMessage]:
        config: RunnableConfig | None = (
            {"callbacks": _child_callbacks(run_manager)} if run_manager is not None else None
        )
        return cast(list[BaseMessage], self._rewriter.invoke(messages, config))

    async def _arewrite(
        self, messages: list[BaseMessage], run_manager: AsyncCallbackManagerForLLMRun | None
    ) -> list[BaseMessage]:
        config: RunnableConfig | None = (
            {"callbacks": _child_callbacks(run_manager)} if run_manager is not None else None
        )
        return cast(list[BaseMessage], await self._rewriter.ainvoke(messages, config))

    def invoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        with set_config_context(_ambient(config)) as context:
            return context.run(super().invoke, input, config, stop=stop, **kwargs)

    async def ainvoke(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        with set_config_context(_ambient(config)) as context:
            return await coro_with_context(super().ainvoke(input, config, stop=stop, **kwargs), context)

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        with set_config_context(_ambient(config)) as context:
            iterator = super().stream(input, config, stop=stop, **kwargs)
            try:
                while True:
                    try:
                        chunk = context.run(next, iterator)
                    except StopIteration:
                        return
                    yield chunk
            finally:
                context.run(iterator.close)

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        with set_config_context(_ambient(config)) as context:
            iterator = super().astream(input, config, stop=stop, **kwargs)
            try:
                while True:
                    try:
                        chunk = await coro_with_context(anext(iterator), context)
                    except StopAsyncIteration:
                        return
                    yield chunk
            finally:
                await coro_with_context(iterator.aclose(), context)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        rewritten = self._rewrite(messages, run_manager)
        return self.model._generate(rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        rewritten = await self._arewrite(messages, run_manager)
        return await self.model._agenerate(
            rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        rewritten = self._rewrite(messages, run_manager)
        if not self._inner_streams(async_api=False):
            yield from _as_chunks(
                self.model._generate(rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs)
            )
            return
        yield from self.model._stream(rewritten, stop=self._stop(stop), run_manager=run_manager, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
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
