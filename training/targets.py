"""Target LLMs that score (query, prompt) pairs, the reward signal: what every target shares.

Two kinds, each in its own module, made from a CLI name by :func:`make_target`:

* :class:`~.hf_target.HFTarget` — a local Hugging Face causal LM (default: the embedded
  SmolLM2). Classification: each label is scored by the target's
  log-likelihood right after the rendered input (chat template applied);
  the prediction is the most likely label. Math: greedy generation with a
  token cap, final number parsed.
* :class:`~.chat_target.ChatModelTarget` — any LangChain chat model, as a black box:
  generation, parse, correctness. Bounded concurrency, retries with backoff.

This module holds what they share: :class:`Pair`, :class:`Score`, the :class:`Target` protocol,
and :func:`cached_score` through a :class:`ScoreCache` on disk keyed by (target id, task
signature, rendered input), so a re-run or a resumed crash never pays twice.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from qpo_middleware.template import Demo

from .io import atomic_write_bytes
from .tasks import Example, Task

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

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM scores").fetchone()[0]

    def copy(self, path: str | os.PathLike[str]) -> int:
        """A consistent copy of this cache as a new SQLite file at ``path`` (SQLite's backup, so verdicts still in
        the write-ahead log of a run in progress come too, unlike a file copy). Returns the number copied."""
        target = sqlite3.connect(path)
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()
        return self.count()

    def dump(self, path: str | os.PathLike[str]) -> int:
        """Write every verdict to ``path`` as gzipped JSON lines (``{"key", "score"}``, sorted by key; the same
        cache always gives the same bytes), atomically. A portable copy of what the target was paid for: a fresh
        machine's :meth:`load` makes a re-run pay only for the pairs not in it. Returns the number written."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM scores ORDER BY key").fetchall()
        text = "".join(json.dumps({"key": key, "score": json.loads(value)}, sort_keys=True) + "\n"
                       for key, value in rows)
        atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))
        return len(rows)

    def load(self, path: str | os.PathLike[str]) -> int:
        """Add the verdicts of a :meth:`dump` file, keeping any this cache already holds (one transaction: a bad
        file adds nothing). Returns how many were new."""
        rows = []
        try:
            with gzip.open(path, "rt", encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    try:
                        item = json.loads(line)
                        key, score = item["key"], Score(**item["score"])
                    except (ValueError, KeyError, TypeError) as exc:
                        raise ValueError(f"{path}, line {number}: not a verdict ({exc}); pass a file written by "
                                         "ScoreCache.dump (benchmarks/verdicts.py save).") from exc
                    rows.append((key, score.to_json()))
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a gzipped verdict dump ({exc}); pass a file written by ScoreCache.dump "
                             "(benchmarks/verdicts.py save).") from exc
        before = self.count()
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO scores (key, value) VALUES (?, ?)", rows)
            self._db.commit()
        return self.count() - before

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


def cached_score(
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


def make_target(spec: str, *, cache_path: str | os.PathLike[str] | None = None, batch_size: int = 16,
                max_concurrency: int = 8, max_retries: int = 3, timeout_seconds: float | None = None) -> Target:
    """A target from a CLI name: ``module:factory`` is a LangChain chat model, anything else a local HF model.

    ``max_concurrency``, ``max_retries`` and ``timeout_seconds`` apply to chat-model targets.
    """
    from .chat_target import ChatModelTarget
    from .hf_target import HFTarget

    cache = ScoreCache(cache_path) if cache_path else None
    if ":" in spec and not Path(spec).exists():
        return ChatModelTarget(model=spec, cache=cache, max_concurrency=max_concurrency, max_retries=max_retries,
                               timeout_seconds=timeout_seconds)
    return HFTarget(model=spec, batch_size=batch_size, cache=cache)
