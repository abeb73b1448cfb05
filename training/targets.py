"""Target LLMs that score (query, prompt) pairs: the reward signal.

* :class:`HFTarget` — a local Hugging Face causal LM (default: the embedded
  SmolLM2). Classification: each label is scored by the target's
  log-likelihood right after the rendered input (chat template applied);
  the prediction is the most likely label. Math: greedy generation with a
  token cap, final number parsed.
* :class:`ChatModelTarget` — any LangChain chat model, as a black box:
  generation, parse, correctness. Bounded concurrency, retries with backoff.

Both go through a :class:`ScoreCache` on disk keyed by (target id, task
signature, rendered input), so a re-run or a resumed crash never pays twice.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qpo_middleware.template import Demo

from .tasks import Example, Task

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of pairs just finished


@dataclass(frozen=True)
class Pair:
    """One (query, prompt) to score, with the few-shot demonstrations to render before the query."""

    example: Example
    prompt: str
    prompt_source: str = ""
    demos: tuple[Demo, ...] = ()


@dataclass
class Score:
    """The target's verdict on one pair. ``failed`` pairs (target errors) are neither right nor wrong."""

    correct: bool = False
    prediction: str | None = None
    gold_nll: float | None = None
    # Classification: the gold label's NLL with the probability renormalised over the label
    # words (-log softmax over the labels), so it measures how well the target separates the
    # labels, not how likely a bare label word is after this prompt.
    label_nll: float | None = None
    response: str | None = None
    tokens: int = 0
    failed: bool = False
    error: str | None = None
    cached: bool = False

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("cached")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Score:
        return cls(**json.loads(text), cached=True)


class Target(Protocol):
    """Anything that scores pairs for a task."""

    id: str

    def score(self, task: Task, pairs: Sequence[Pair], progress: Progress | None = None) -> list[Score]: ...


# -- cache ------------------------------------------------------------------------------------


class ScoreCache:
    """SQLite cache of scores keyed by (target id, task signature, rendered input). Thread-safe.

    Each call's scores commit together, so work done before a crash is kept. Failed scores
    are never cached: they are retried on the next run.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()

    @staticmethod
    def key(target_id: str, task_signature: str, rendered: str, gold: str) -> str:
        payload = json.dumps([target_id, task_signature, rendered, gold], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Score | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM scores WHERE key = ?", (key,)).fetchone()
        return Score.from_json(row[0]) if row else None

    def put(self, key: str, score: Score) -> None:
        self.put_many([(key, score)])

    def put_many(self, items: Sequence[tuple[str, Score]]) -> None:
        """Store scores in one transaction: a crash keeps all of them or none."""
        rows = [(key, score.to_json()) for key, score in items if not score.failed]
        if not rows:
            return
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)", rows)
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


# Bumped when what a score holds changes, so cached scores of an older kind are recomputed
# (2: label_nll added).
SCORE_VERSION = 2


def task_signature(task: Task) -> str:
    """What about the task changes a score: kind, label words, answer parser, template, score version."""
    return json.dumps([task.kind, list(task.labels), task.answer_pattern, task.template.to_dict(),
                       task.max_new_tokens, SCORE_VERSION], sort_keys=True)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _cached_score(
    target_id: str,
    task: Task,
    pairs: Sequence[Pair],
    render: Callable[[Pair], str],
    compute: Callable[[list[int]], list[Score]],
    cache: ScoreCache | None,
    progress: Progress | None,
) -> list[Score]:
    """Look every pair up in the cache, compute the misses with ``compute(indices)``, store them."""
    signature = task_signature(task)
    keys = [ScoreCache.key(target_id, signature, render(p), task.gold_text(p.example)) for p in pairs]
    results: list[Score | None] = [cache.get(k) if cache else None for k in keys]
    hits = sum(r is not None for r in results)
    if hits and progress:
        progress(hits)
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        computed = compute(missing)
        for index, score in zip(missing, computed, strict=True):
            results[index] = score
        if cache:
            # One transaction per call: a crash never leaves part of a chunk cached, so a resumed
            # run scores that chunk in the same batches as an uninterrupted one (padding in a
            # batch moves a local target's NLLs by ~1e-7, which would make the rewards differ).
            cache.put_many([(keys[i], s) for i, s in zip(missing, computed, strict=True)])
    return [r for r in results if r is not None]


# -- local Hugging Face target ------------------------------------------------------------------


@dataclass
class HFTarget:
    """A local causal LM as target. ``model`` is a name for :func:`resolve_model` (default: SmolLM2)."""

    model: str = "smollm2-135m-instruct"
    batch_size: int = 16
    max_new_tokens: int | None = None
    cache: ScoreCache | None = None
    device: str = "auto"
    id: str = ""
    _lm: Any = field(default=None, init=False, repr=False)
    _tok: Any = field(default=None, init=False, repr=False)
    _label_ids: dict[tuple[str, ...], list[list[int]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"hf:{self.model}"

    def _load(self) -> None:
        if self._lm is not None:
            return
        import torch

        from .models import load_model_and_tokenizer

        self._lm, self._tok = load_model_and_tokenizer(self.model)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._lm.to(device)
        if self._tok.chat_template is None:
            logger.warning("Target %s has no chat template: rendering the user text as a plain prompt.", self.model)

    @property
    def tokenizer(self) -> Any:
        self._load()
        return self._tok

    def context_text(self, task: Task, pair: Pair) -> str:
        """The exact text the target reads before its answer."""
        self._load()
        rendered = task.template.render(pair.prompt, pair.example.query, pair.demos)
        if self._tok.chat_template is None:
            return "\n\n".join(m["content"] for m in rendered.messages) + "\nAnswer:"
        return self._tok.apply_chat_template(rendered.messages, tokenize=False, add_generation_prompt=True)

    def score(self, task: Task, pairs: Sequence[Pair], progress: Progress | None = None) -> list[Score]:
        self._load()
        pairs = list(pairs)

        def compute(indices: list[int]) -> list[Score]:
            todo = [pairs[i] for i in indices]
            if task.kind == "classification":
                return self._score_labels(task, todo, progress)
            return self._score_generation(task, todo, progress)

        return _cached_score(self.id, task, pairs, lambda p: self.context_text(task, p), compute, self.cache, progress)

    # Classification: label log-likelihood ----------------------------------------------------

    def label_token_ids(self, task: Task) -> list[list[int]]:
        """Token ids of each label word as the answer's first word (no leading space: see docs/architecture.md)."""
        self._load()
        if task.labels not in self._label_ids:
            ids = [self._tok(label, add_special_tokens=False).input_ids for label in task.labels]
            if any(not i for i in ids):
                raise ValueError(f"A label of task {task.name!r} tokenizes to nothing: {task.labels}")
            self._label_ids[task.labels] = ids
        return self._label_ids[task.labels]

    def _score_labels(self, task: Task, pairs: list[Pair], progress: Progress | None) -> list[Score]:

        label_ids = self.label_token_ids(task)
        single_token = all(len(ids) == 1 for ids in label_ids)
        out: list[Score] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            contexts = [self._tok(self.context_text(task, p), add_special_tokens=False).input_ids for p in chunk]
            if single_token:
                # One forward pass per pair: the next-token distribution after the context.
                logprobs = self._next_token_logprobs(contexts)  # (batch, vocab)
                label_lp = logprobs[:, [ids[0] for ids in label_ids]]  # (batch, labels)
            else:
                # Several tokens for some label: one sequence per (pair, label), summed token log-probs.
                seqs = [ctx + ids for ctx in contexts for ids in label_ids]
                starts = [len(ctx) for ctx in contexts for _ in label_ids]
                label_lp = self._continuation_logprobs(seqs, starts).view(len(chunk), len(label_ids))
            for pair, lps, ctx in zip(chunk, label_lp.tolist(), contexts, strict=True):
                best = max(range(len(lps)), key=lambda i: lps[i])
                gold = int(pair.example.label) if pair.example.label is not None else None
                gold_nll = -lps[gold] if gold is not None else None
                label_nll = _logsumexp(lps) - lps[gold] if gold is not None else None
                out.append(Score(correct=best == gold, prediction=task.labels[best], gold_nll=gold_nll,
                                 label_nll=label_nll,
                                 tokens=len(ctx) + (0 if single_token else sum(map(len, label_ids)))))
            if progress:
                progress(len(chunk))
        return out

    def _device(self) -> Any:
        return next(self._lm.parameters()).device

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Any, Any]:
        from .sampling import left_pad

        ids, mask = left_pad(seqs, self._tok.pad_token_id)
        return ids.to(self._device()), mask.to(self._device())

    def _next_token_logprobs(self, contexts: list[list[int]]) -> Any:
        import torch

        from .sampling import position_ids

        ids, mask = self._left_pad(contexts)
        with torch.inference_mode():
            logits = self._lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                              logits_to_keep=1).logits[:, -1, :]  # (batch, vocab)
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def _continuation_logprobs(self, seqs: list[list[int]], starts: list[int]) -> Any:
        import torch

        from .sampling import position_ids

        ids, mask = self._left_pad(seqs)
        with torch.inference_mode():
            logits = self._lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, seq-1, vocab)
            token_lp = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (batch, seq-1)
        width = ids.shape[1]
        totals = []
        for row, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            offset = width - len(seq)  # left padding
            # token t (absolute position p = offset + t) is predicted at position p - 1
            totals.append(token_lp[row, offset + start - 1 : offset + len(seq) - 1].sum())
        return torch.stack(totals).cpu()

    # Math: greedy generation ------------------------------------------------------------------

    def _score_generation(self, task: Task, pairs: list[Pair], progress: Progress | None) -> list[Score]:
        import torch

        cap = self.max_new_tokens or task.max_new_tokens
        out: list[Score] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            contexts = [self._tok(self.context_text(task, p), add_special_tokens=False).input_ids for p in chunk]
            ids, mask = self._left_pad(contexts)
            with torch.inference_mode():
                generated = self._lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cap, do_sample=False,
                                              pad_token_id=self._tok.pad_token_id,
                                              eos_token_id=self._tok.eos_token_id)
            for pair, row in zip(chunk, generated[:, ids.shape[1] :], strict=True):
                response = self._tok.decode(row, skip_special_tokens=True)
                prediction = task.parse(response)
                out.append(Score(correct=task.is_correct(pair.example, prediction), prediction=prediction,
                                 response=response, tokens=int(ids.shape[1] + len(row))))
            if progress:
                progress(len(chunk))
        return out


# -- any LangChain chat model ---------------------------------------------------------------


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

        return _cached_score(self.id, task, pairs, render, compute, self.cache, progress)

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


def make_target(spec: str, *, cache_path: str | os.PathLike[str] | None = None, batch_size: int = 16,
                max_concurrency: int = 8, max_retries: int = 3, timeout_seconds: float | None = None) -> Target:
    """A target from a CLI name: ``module:factory`` is a LangChain chat model, anything else a local HF model.

    ``max_concurrency``, ``max_retries`` and ``timeout_seconds`` apply to chat-model targets.
    """
    cache = ScoreCache(cache_path) if cache_path else None
    if ":" in spec and not Path(spec).exists():
        return ChatModelTarget(model=spec, cache=cache, max_concurrency=max_concurrency, max_retries=max_retries,
                               timeout_seconds=timeout_seconds)
    return HFTarget(model=spec, batch_size=batch_size, cache=cache)
