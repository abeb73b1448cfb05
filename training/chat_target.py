"""Any LangChain chat model as the target, a black box: generate, parse, judge."""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .targets import Pair, Progress, Score, ScoreCache, cached_score
from .tasks import Task

logger = logging.getLogger(__name__)


def load_chat_model(spec: str) -> Any:
    """Build a LangChain chat model from ``module:factory`` (a class or a function called without arguments)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"A chat-model target is named as 'module:factory' (e.g. my_app.models:make_chat); got {spec!r}.")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"Cannot import chat-model target {spec!r}: {exc}. Is the module on PYTHONPATH?") from exc
    model = factory() if callable(factory) else factory
    if not hasattr(model, "invoke") or not hasattr(model, "batch"):
        raise ValueError(f"{spec!r} did not give a LangChain chat model (got {type(model).__name__}).")
    return model


@dataclass
class ChatModelTarget:
    """A LangChain chat model as a black-box target: generate, parse, judge.

    Calls run ``max_concurrency`` at a time through the model's own ``batch``;
    a failing call is retried ``max_retries`` times with exponential backoff
    (``backoff_seconds``, then twice that, ...), then recorded as failed (not
    wrong), so it can be retried later. With ``timeout_seconds``, a call without
    a reply in that time fails with ``TimeoutError`` (and is retried like any
    failure); the calls then go through ``invoke``, one thread each, because
    ``batch`` cannot give up on a call that hangs.
    """

    model: Any
    id: str = ""
    max_concurrency: int = 8
    max_retries: int = 3
    backoff_seconds: float = 1.0
    timeout_seconds: float | None = None
    cache: ScoreCache | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            spec = self.model
            self.model = load_chat_model(spec)
            self.id = self.id or f"chat:{spec}"
        self.id = self.id or f"chat:{type(self.model).__name__}"

    @staticmethod
    def _messages(task: Task, pair: Pair) -> list[tuple[str, str]]:
        rendered = task.template.render(pair.prompt, pair.example.query, pair.demos)
        return [("human" if m["role"] == "user" else m["role"], m["content"]) for m in rendered.messages]

    def score(self, task: Task, pairs: Sequence[Pair], progress: Progress | None = None) -> list[Score]:
        pairs = list(pairs)

        def render(pair: Pair) -> str:
            return json.dumps(self._messages(task, pair), ensure_ascii=False)

        def compute(indices: list[int]) -> list[Score]:
            return self._generate(task, [pairs[i] for i in indices], progress)

        return cached_score(self.id, task, pairs, render, compute, self.cache, progress)

    def _generate(self, task: Task, pairs: list[Pair], progress: Progress | None) -> list[Score]:
        results: list[Score | None] = [None] * len(pairs)
        pending = list(range(len(pairs)))
        errors: dict[int, str] = {}
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            if attempt:
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            inputs = [self._messages(task, pairs[i]) for i in pending]
            if self.timeout_seconds is None:
                config: dict[str, Any] = {"max_concurrency": self.max_concurrency}
                outputs = self.model.batch(inputs, config=config, return_exceptions=True)
            else:
                outputs = _invoke_with_timeout(self.model, inputs, self.max_concurrency, self.timeout_seconds)
            still: list[int] = []
            for index, output in zip(pending, outputs, strict=True):
                text = _message_text(output) if not isinstance(output, BaseException) else None
                if text is None:
                    errors[index] = repr(output)[:300] if isinstance(output, BaseException) else "non-text reply"
                    still.append(index)
                    continue
                prediction = task.parse(text)
                results[index] = Score(correct=task.is_correct(pairs[index].example, prediction),
                                       prediction=prediction, response=text, tokens=len(text.split()))
                if progress:
                    progress(1)
            pending = still
        for index in pending:
            logger.warning("Target %s failed on query %s after %d tries: %s", self.id, pairs[index].example.id,
                           self.max_retries + 1, errors[index])
            results[index] = Score(failed=True, error=errors[index])
            if progress:
                progress(1)
        return [r for r in results if r is not None]


def _invoke_with_timeout(model: Any, inputs: list[Any], concurrency: int, timeout: float) -> list[Any]:
    """``model.invoke`` on every input, ``concurrency`` at a time, each given ``timeout`` seconds.

    Returns a reply or an exception per input, like ``batch(..., return_exceptions=True)``.
    A call past its deadline becomes a ``TimeoutError`` and frees its slot; its thread is a
    daemon left to end on its own, and a reply it sends late is dropped.
    """
    done = threading.Condition()
    results: dict[int, Any] = {}

    def call(index: int) -> None:
        try:
            reply: Any = model.invoke(inputs[index])
        except Exception as exc:
            reply = exc
        with done:
            results.setdefault(index, reply)
            done.notify_all()

    running: dict[int, float] = {}  # started calls -> their deadlines
    started = 0
    with done:
        while True:
            now = time.monotonic()
            for index, deadline in list(running.items()):
                if index in results:
                    del running[index]
                elif now >= deadline:
                    results[index] = TimeoutError(f"no reply within {timeout:g} s")
                    del running[index]
            while started < len(inputs) and len(running) < max(1, concurrency):
                running[started] = time.monotonic() + timeout
                threading.Thread(target=call, args=(started,), daemon=True, name="qpo-target-call").start()
                started += 1
            if not running:
                return [results[i] for i in range(len(inputs))]
            done.wait(max(0.0, min(running.values()) - time.monotonic()))


def _message_text(output: Any) -> str | None:
    content = getattr(output, "content", output)
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks
        parts = [c.get("text", "") if isinstance(c, dict) else str(c) for c in content]
        return "".join(parts)
    return None
