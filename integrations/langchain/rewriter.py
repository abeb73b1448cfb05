"""QPORewriter: a Runnable that adds the QPO policy's prompt to chat-model input; with_qpo puts it in front of a model.

Budget: the rewriter keeps no timer. Its ``latency_budget_ms`` and ``fail_open`` go with every
optimizer call (:meth:`PromptOptimizer.optimize_batch` / ``aoptimize_batch``), and the runtime
enforces them wherever it waits (the decode loop, or the wait for a micro-batch): past the
budget a query comes back with ``Status.TIMEOUT`` and no prompt, or, with ``fail_open=False``,
:class:`LatencyBudgetExceeded` is raised.

Tracing: each input is a run (run type ``prompt``) that starts once the policy has answered,
so its metadata holds ``qpo_bundle_id``, ``qpo_prompt``, ``qpo_status`` (the runtime's
:class:`~qpo_middleware.Status` of the query: ``error`` when the policy raised),
``qpo_latency_ms`` (how long the optimizer call took) and ``qpo_tokens`` (or ``qpo_error``).
Every callback handler also receives that metadata as the custom event :data:`QPO_EVENT`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from langchain_core.callbacks.manager import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import Runnable, RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import get_config_list
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from qpo_middleware.runtime import (
    LatencyBudgetExceeded,
    OptimizedPrompt,
    PromptOptimizer,
    QueueFullError,
    Status,
)
from qpo_middleware.template import Placement, Template

from ._inputs import QPOInput, Slot, parse_input

logger = logging.getLogger(__name__)

__all__ = ["QPO_EVENT", "LatencyBudgetExceeded", "QPORewriter", "bundle_id", "with_qpo"]

QPO_EVENT = "qpo_rewrite"
"""Name of the custom callback event sent in each rewrite's run (its data is the run's QPO metadata)."""

OutputT = TypeVar("OutputT")


def bundle_id(optimizer: PromptOptimizer) -> str:
    """A short, stable id of a loaded bundle: its task and the first 12 hex digits of model.onnx's SHA-256."""
    manifest = optimizer.manifest
    return f"{manifest.task}-{manifest.files.get(manifest.model.file, '')[:12]}"


def _status_of(error: BaseException) -> Status:
    """The status of a call that raised: the runtime's own failures keep their status."""
    if isinstance(error, LatencyBudgetExceeded):
        return Status.TIMEOUT
    if isinstance(error, QueueFullError):
        return Status.OVERLOADED
    return Status.ERROR


# ---------------------------------------------------------------------------- one rewrite


class _PolicyCall:
    """The parsed inputs of one ``batch``/``abatch`` and what their single optimizer call gave.

    Used as ``with call: call.results = <optimizer call>``: an ``Exception`` raised in the block
    is kept in ``error`` (the rewriter then fails open, or gives it to each run to raise), and
    ``latency_ms`` is how long the block took. One helper for the sync and the async caller.
    """

    def __init__(self, inputs: list[QPOInput], template: Template, input_key: str) -> None:
        self.slots: list[Slot | Exception] = []
        for value in inputs:
            try:
                self.slots.append(parse_input(value, template, input_key))
            except (TypeError, ValueError) as exc:  # the caller's error: this row's run raises it
                self.slots.append(exc)
        self.queries = [s.query for s in self.slots if isinstance(s, Slot) and s.query is not None]
        self.results: list[OptimizedPrompt] = []
        self.error: Exception | None = None
        self.latency_ms = 0.0
        self._start = 0.0

    def __enter__(self) -> Self:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        self.latency_ms = (time.perf_counter() - self._start) * 1000.0
        if isinstance(error, Exception):
            self.error = error
            return True
        return False


@dataclasses.dataclass(frozen=True)
class _Rewrite:
    """Per input: what its run returns (or raises) and its run metadata (``None``: the input did not parse)."""

    outputs: list[QPOInput | Exception]
    infos: list[dict[str, Any] | None]
    bundle_id: str

    def configs(self, config: RunnableConfig | list[RunnableConfig] | None) -> list[RunnableConfig]:
        """Each input's run config, with the rewrite's metadata added (the caller's keys stay)."""
        out: list[RunnableConfig] = []
        for each, info in zip(get_config_list(config, len(self.outputs)), self.infos, strict=True):
            metadata = {**(each.get("metadata") or {}), **(info or {"qpo_bundle_id": self.bundle_id})}
            out.append(cast(RunnableConfig, {**each, "metadata": metadata}))
        return out

    def events(self, config: list[RunnableConfig]) -> list[tuple[dict[str, Any], RunnableConfig]]:
        return [(info, each) for info, each in zip(self.infos, config, strict=True) if info is not None]

    # The runs' bodies (``_batch_with_config`` gives each run's config, whose callbacks are the run's).

    def emit(self, inputs: list[QPOInput], config: list[RunnableConfig]) -> list[QPOInput | Exception]:
        for info, each in self.events(config):
            dispatch_custom_event(QPO_EVENT, info, config=each)
        return self.outputs

    async def aemit(self, inputs: list[QPOInput], config: list[RunnableConfig]) -> list[QPOInput | Exception]:
        for info, each in self.events(config):
            await adispatch_custom_event(QPO_EVENT, info, config=each)
        return self.outputs


# ---------------------------------------------------------------------------- the rewriter


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

    ``batch``/``abatch`` make one optimizer call for all inputs (``invoke``/``ainvoke`` are a
    batch of one); the async calls never block the event loop (with micro-batching they await
    the shared batcher, else the decode runs in a worker thread). The latency budget applies to
    each optimizer call: one query for ``invoke``, the whole batch for ``batch``.
    """

    bundle: str | Path | None = None
    """Bundle directory made by ``qpo export``; loaded (and checksummed) once, at construction."""
    optimizer: PromptOptimizer | None = Field(default=None, exclude=True, repr=False)
    """An already loaded policy (share one between rewriters); takes the place of ``bundle``."""
    placement: Placement | None = None
    """Override of the bundle template's placement ("before", "after" or "system"); None keeps it."""
    fail_open: bool = True
    """When the policy raises or runs past the budget, pass the input on unchanged (True) or raise (False).

    Goes to every optimizer call: with False, a budget overrun raises :class:`LatencyBudgetExceeded`
    (and a full micro-batching queue ``QueueFullError``) whatever the optimizer's own
    ``RuntimeConfig.fail_open`` says. Any text is safe to send (surrogates, NULs, 100k characters:
    see docs/reliability.md). An input that is not chat-model input at all (None, a number, bytes,
    a dict without ``input_key``) raises ``TypeError``/``ValueError`` either way: it is the
    caller's error, and the chat model would refuse it too."""
    latency_budget_ms: float | None = Field(default=None, gt=0)
    """Longest time one optimizer call may take, in milliseconds, enforced by the runtime (it stops
    the decode, or the wait for a micro-batch, at the deadline); None: the optimizer's
    ``RuntimeConfig.latency_budget_ms`` (no limit by default)."""
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
        """Counts since construction: ``queries``, one per ``qpo_status`` seen, and ``passed_through``."""
        with self._stats_lock:
            return dict(self._stats)

    def _policy(self) -> PromptOptimizer:
        if self.optimizer is None:  # pragma: no cover - the validator always sets it
            raise RuntimeError("QPORewriter has no policy loaded.")
        return self.optimizer

    def _limits(self) -> dict[str, Any]:
        """The per-call budget settings every optimizer call gets (the runtime enforces them)."""
        return {"latency_budget_ms": self.latency_budget_ms, "fail_open": self.fail_open}

    # -- Runnable API: thin sync and async callers of _PolicyCall and _finish --------------

    def invoke(self, input: QPOInput, config: RunnableConfig | None = None, **kwargs: Any) -> QPOInput:
        return self.batch([input], config)[0]

    async def ainvoke(self, input: QPOInput, config: RunnableConfig | None = None, **kwargs: Any) -> QPOInput:
        return (await self.abatch([input], config))[0]

    def batch(self, inputs: list[QPOInput], config: RunnableConfig | list[RunnableConfig] | None = None, *,
              return_exceptions: bool = False, **kwargs: Any | None) -> list[QPOInput]:
        with (call := self._call(inputs)):
            call.results = self._policy().optimize_batch(call.queries, **self._limits()) if call.queries else []
        rewrite = self._finish(call)
        return self._batch_with_config(rewrite.emit, inputs, rewrite.configs(config),
                                       return_exceptions=return_exceptions, run_type="prompt")

    async def abatch(self, inputs: list[QPOInput], config: RunnableConfig | list[RunnableConfig] | None = None, *,
                     return_exceptions: bool = False, **kwargs: Any | None) -> list[QPOInput]:
        with (call := self._call(inputs)):
            call.results = await self._policy().aoptimize_batch(call.queries, **self._limits()) if call.queries else []
        rewrite = self._finish(call)
        return await self._abatch_with_config(rewrite.aemit, inputs, rewrite.configs(config),
                                              return_exceptions=return_exceptions, run_type="prompt")

    # -- the shared steps -----------------------------------------------------------------

    def _call(self, inputs: list[QPOInput]) -> _PolicyCall:
        return _PolicyCall(inputs, self._template, self.input_key)

    def _finish(self, call: _PolicyCall) -> _Rewrite:
        """Each input's output and run metadata from the call's results; counts, and logs a fail-open."""
        counts: Counter[str] = Counter()
        outputs: list[QPOInput | Exception] = []
        infos: list[dict[str, Any] | None] = []
        results = iter(call.results)
        for slot in call.slots:
            if isinstance(slot, Exception):
                outputs.append(slot)
                infos.append(None)
                continue
            info: dict[str, Any] = {"qpo_bundle_id": self._bundle_id, "qpo_prompt": ""}
            status: Status
            output: QPOInput | Exception = slot.original
            if slot.query is None:
                status = Status.SKIPPED
            elif call.error is not None:
                status = _status_of(call.error)
                info.update(
                    qpo_latency_ms=round(call.latency_ms, 3),
                    qpo_error=f"{type(call.error).__name__}: {call.error}",
                )
                if not self.fail_open:
                    output = call.error
            else:
                result = next(results)
                status = result.status
                info.update(qpo_prompt=result.prompt, qpo_latency_ms=round(call.latency_ms, 3),
                            qpo_tokens=result.tokens)
                if result.prompt:
                    output = slot.rebuild(result.prompt)
            info["qpo_status"] = status
            counts.update(["queries", str(status)])
            if status.failed_open and not isinstance(output, Exception):
                counts["passed_through"] += 1
            outputs.append(output)
            infos.append(info)
        with self._stats_lock:
            self._stats.update(counts)
        if call.error is not None and self.fail_open:
            logger.warning(
                "QPO policy %s failed open (%s: %s); %d input(s) sent on unchanged.",
                self._bundle_id, type(call.error).__name__, call.error, counts["passed_through"],
            )
        return _Rewrite(outputs, infos, self._bundle_id)


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
