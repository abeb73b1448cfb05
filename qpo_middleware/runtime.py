"""Torch-free policy runtime: ONNX Runtime + numpy + tokenizers.

:class:`PromptOptimizer` loads a bundle and writes a prompt for each query with
its own KV-cache decode loop over the exported decoder (prefill, then one token
per step, starting from an empty past). Batches are left-padded and every row
stops on its own (EOS or the token cap); finished rows leave the batch.

The loop lives in :class:`~qpo_middleware.generator.Generator` (modelled on onnxruntime-genai's
``append_tokens`` / ``is_done`` / ``generate_next_token``), the model step in
:class:`~qpo_middleware.decoder.OnnxDecoder`; this module owns the calls: batching, the
cache, and the latency budget with fail-open (:class:`Status` says what happened). All per-call state is local to a call:
``PromptOptimizer`` is safe to share between threads
(``InferenceSession.run`` is thread-safe; the LRU cache and the micro-batcher lock
their own state). How it runs (session settings, IO binding, micro-batching, the cache,
the latency budget) is a :class:`~qpo_middleware.config.RuntimeConfig`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .batching import MicroBatcher, QueueFullError
from .bundle import BundleError, GenerationConfig, Manifest, load_manifest
from .choice import RouteTable, candidate_logps, choose
from .config import Provider, RuntimeConfig, ort  # ort: ONNX Runtime, imported with the install fix
from .decoder import OnnxDecoder, make_session, session_providers
from .generator import Generator
from .library import Drafter, LibraryPrompt, library_stats, load_library
from .policy_format import PolicyFormat
from .template import Template
from .text import clean_prompt, finish_prompt, special_token_strings, strip_strings

logger = logging.getLogger(__name__)

__all__ = ["LatencyBudgetExceeded", "OptimizedPrompt", "PromptOptimizer", "Provider", "QueueFullError",
           "RuntimeConfig", "Status"]


_clock = time.perf_counter  # the decode loop's deadline clock (a module attribute so tests can drive it)


class LatencyBudgetExceeded(TimeoutError):
    """The policy did not finish within the latency budget (raised only when ``fail_open`` is off)."""


class Status(StrEnum):
    """What happened to one query; the one status type of the runtime and every integration.

    A ``StrEnum``: each member equals its string (``Status.TIMEOUT == "timeout"``), so logs, JSON
    and callback metadata carry plain strings.
    """

    REWRITTEN = "rewritten"  # the policy wrote a prompt
    CACHED = "cached"  # an LRU cache hit
    SKIPPED = "skipped"  # an empty or whitespace-only query: no model call, no prompt
    TIMEOUT = "timeout"  # fail-open: the latency budget ran out; no prompt, the query goes on as is
    OVERLOADED = "overloaded"  # fail-open: the micro-batching queue was full; no prompt
    ERROR = "error"  # fail-open in an integration: the policy raised (the runtime itself raises)
    PASSTHROUGH = "passthrough"  # not rewritten by choice: a per-request or per-route setting (qpo serve)

    @property
    def failed_open(self) -> bool:
        """True when the query went on without a prompt because the policy could not answer."""
        return self in (Status.TIMEOUT, Status.OVERLOADED, Status.ERROR)


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class OptimizedPrompt:
    """The policy's prompt for one query and the rendered input for the target LLM.

    ``prompt`` is the generated instruction (no special tokens nor their strings,
    no control characters besides newline/tab, stripped, at most
    :data:`PROMPT_CHARS_PER_TOKEN` characters per ``max_new_tokens``), or with strategy
    ``'choose'`` the chosen library prompt whole (same cleaning, no length cap); ``text`` is
    the user turn with the original query verbatim inside (never altered, even
    where the policy read a sanitized copy: see :func:`policy_text`);
    ``messages`` are the chat messages to
    send; ``latency_ms`` is the wall time of the call that produced it (the
    whole batch for :meth:`PromptOptimizer.optimize_batch`); ``tokens`` counts
    the decoded (or chosen) tokens, the stopping EOS included. ``status`` says what happened:
    ``"rewritten"``, ``"cached"`` (an LRU cache hit), ``"skipped"`` (an empty query: no model
    call), ``"timeout"`` or ``"overloaded"`` (fail-open: no prompt, the query goes on as is).
    """

    prompt: str
    text: str
    messages: list[dict[str, str]] = field(default_factory=list)
    latency_ms: float = 0.0
    tokens: int = 0
    status: Status = Status.REWRITTEN


# ---------------------------------------------------------------------------- the public component


class _LRU:
    """A small thread-safe LRU map from query to greedy result."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, OptimizedPrompt] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> OptimizedPrompt | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: OptimizedPrompt) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a perf_counter value), never negative; None without one."""
    return None if deadline is None else max(0.0, deadline - time.perf_counter())


@dataclass
class _Call:
    """The state of one optimize call: its clock, deadline and the results filled so far."""

    start: float
    deadline: float | None
    greedy: bool  # deterministic with the bundle's own strategy: served by the cache and the micro-batcher
    results: list[OptimizedPrompt | None]
    fail_open: bool
    strategy: str = "generate"
    todo: list[int] = field(default_factory=list)


def _distinct_choices(entries: Sequence[LibraryPrompt]) -> list[LibraryPrompt]:
    """The library as strategy 'choose' sees it: one entry per distinct id sequence (prompts longer than
    ``prompt_max_tokens`` can share their cut ids), keeping the one that would win (lowest offset, then first)."""
    best: dict[tuple[int, ...], int] = {}
    for i, entry in enumerate(entries):
        j = best.get(entry.ids)
        if j is None or (entry.offset or 0.0) < (entries[j].offset or 0.0):  # offsets: every entry or none
            best[entry.ids] = i
    return [entries[i] for i in sorted(best.values())]


class PromptOptimizer:
    """Writes a prompt for each query with an exported QPO policy. Thread-safe; no torch needed.

    >>> optimizer = PromptOptimizer.from_bundle("bundle/")        # doctest: +SKIP
    >>> optimizer.optimize("Is this review positive? ...").text   # doctest: +SKIP

    How it runs is a :class:`~qpo_middleware.config.RuntimeConfig` (``config=``): session
    settings, IO binding, micro-batching of concurrent calls, an LRU cache of greedy results
    and a latency budget with fail-open.
    """

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int | None = None,
        config: RuntimeConfig | None = None,
    ) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}.")
        config = (config or RuntimeConfig()).with_(max_batch_size=max_batch_size)
        self.config = config
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.provider = session.get_providers()[0]
        io_binding = config.io_binding if config.io_binding is not None else self.provider == "CUDAExecutionProvider"
        self.decoder = OnnxDecoder(session, manifest.model, io_binding=io_binding)
        self.max_batch_size = config.max_batch_size
        # The tokenizer's special tokens (the policy's reward, separator and EOS tokens among them):
        # a prompt may spell one out of ordinary tokens, and a target LLM's tokenizer could read it
        # as the real token (e.g. "<|im_end|>" ending the user turn), so prompts never contain them.
        self.special_strings = special_token_strings(tokenizer)
        self.drafter: Drafter | None = None
        self.library: dict[str, Any] | None = None
        self._choices: list[LibraryPrompt] = []  # what strategy 'choose' picks from: the library
        self._offsets: np.ndarray | None = None
        # A label_route policy's route table: 'choose' scores only the routes and sends by the table.
        self._routes: RouteTable | None = None
        self._route_ids: list[tuple[int, ...]] = []
        self._send_ids: list[tuple[int, ...]] = []
        if manifest.library_path is not None:
            entries, self._routes = load_library(manifest.library_path, vocab_size=manifest.model.vocab_size,
                                                 max_ids=manifest.policy.prompt_max_tokens + 1)
            self.library = library_stats(entries)
            self._choices = _distinct_choices(entries)
            if entries and entries[0].offset is not None:
                self._offsets = np.array([e.offset for e in self._choices], dtype=np.float64)
            if config.speculative:
                self.drafter = Drafter(entries)
            if self._routes is not None:
                ids_of = {e.text: e.ids for e in entries}
                self._route_ids = [ids_of[text] for text in self._routes.routes]
                self._send_ids = [ids_of[text] for text in self._routes.prompts]
        self._choice_text = {e.ids: e.text for e in self._choices}
        if self._routes is not None:  # the table sends its prompts by text, whatever other prompt shares cut ids
            self._choice_text |= dict(zip(self._send_ids, self._routes.prompts, strict=True))
        if manifest.generation.strategy == "choose" and not self._choices:
            raise BundleError(f"{manifest.root}: generation.strategy is 'choose' but the bundle has no prompt library "
                              "to choose from; re-export it from a run directory with `qpo export --strategy choose`.")
        self._decode_counts = {"forward_passes": 0, "draft_tokens": 0, "accepted_draft_tokens": 0, "choices": 0}
        self._counts_lock = threading.Lock()
        self._cache = _LRU(config.cache_size) if config.cache_size else None
        self._batcher: MicroBatcher[list[int]] | None = None
        if config.batch_window_ms is not None:
            self._batcher = MicroBatcher(
                self._decode_queries, window_ms=config.batch_window_ms,
                max_batch_size=config.max_batch_size, max_queue=config.max_queue,
            )

    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike[str],
        provider: Provider | None = None,
        verify: bool | None = None,
        *,
        config: RuntimeConfig | None = None,
        max_batch_size: int | None = None,
        session_options: ort.SessionOptions | None = None,
    ) -> PromptOptimizer:
        """Load a bundle made by ``qpo export``.

        ``config`` sets how it runs (:class:`~qpo_middleware.config.RuntimeConfig`); ``provider``,
        ``verify`` and ``max_batch_size`` override its fields. ``provider="auto"`` uses CUDA when
        onnxruntime-gpu provides it, else CPU (logged). ``verify`` checks every file's SHA-256
        first (about 1 s per 500 MB). ``session_options`` replaces the ones ``config`` builds.
        """
        config = (config or RuntimeConfig()).with_(provider=provider, verify=verify, max_batch_size=max_batch_size)
        manifest = load_manifest(path, verify=config.verify)
        if session_options is not None:
            session = ort.InferenceSession(str(manifest.model_path), sess_options=session_options,
                                           providers=session_providers(config.provider))
        else:
            session = make_session(manifest.model_path, config)
        tokenizer = Tokenizer.from_file(str(manifest.tokenizer_path))
        optimizer = cls(manifest, session, tokenizer, config=config)
        logger.info(
            "qpo policy %s (%s) runs on %s",
            Path(path).name or str(path),
            manifest.model.dtype,
            optimizer.provider,
        )
        return optimizer

    # -- convenience views ----------------------------------------------------------------

    @property
    def policy(self) -> PolicyFormat:
        return self.manifest.policy

    @property
    def template(self) -> Template:
        return self.manifest.template

    def __repr__(self) -> str:
        return f"PromptOptimizer({str(self.manifest.root)!r}, dtype={self.manifest.model.dtype}, provider={self.provider})"

    def close(self) -> None:
        """Stop the micro-batching worker (queued queries finish first). Direct calls keep working."""
        if self._batcher is not None:
            self._batcher.close()

    def __enter__(self) -> PromptOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generation -----------------------------------------------------------------------

    def input_ids(self, query: str) -> list[int]:
        """The policy input for ``query``: :meth:`PolicyFormat.encode` with this bundle's tokenizer."""
        return self.policy.encode(query, self._tokenize)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def generation(self, **overrides: Any) -> GenerationConfig:
        """The bundle's :class:`GenerationConfig` with per-call ``overrides`` (``None`` values are ignored);
        strategy ``'choose'`` needs a bundle with a prompt library."""
        generation = self.manifest.generation.with_(**overrides)
        if generation.strategy == "choose" and not self._choices:
            raise BundleError(f"strategy 'choose' picks one of the bundle's library prompts, and {self.manifest.root} "
                              "has none; re-export it from a run directory (its records are the library), or use "
                              "strategy='generate'.")
        return generation

    def choose_ids(self, rows: Sequence[Sequence[int]], *, deadline: float | None = None) -> list[list[int]]:
        """Strategy ``'choose'`` on a batch of policy inputs: the ids of the library prompt each row picks
        (:mod:`qpo_middleware.choice`). ``deadline`` works as in :meth:`generate_ids`."""

        def check() -> None:
            if deadline is not None and _clock() > deadline:
                raise LatencyBudgetExceeded(
                    "The policy ran past its latency budget while scoring the library prompts. Raise "
                    "latency_budget_ms, serve a smaller library or strategy 'generate', or set fail_open=True to "
                    "send the query on without a prompt."
                )

        candidates = self._route_ids or [e.ids for e in self._choices]
        out = []
        for row in rows:
            scores = candidate_logps(self.decoder, row, candidates, pad_token_id=self.policy.pad_token_id, check=check)
            if self._routes is not None:  # the prompt with the most expected right answers under the label posterior
                out.append(list(self._send_ids[int(self._routes.pick(scores))]))
            else:
                out.append(list(candidates[choose(scores, self._offsets)]))
        with self._counts_lock:
            self._decode_counts["choices"] += len(rows)
        return out

    def scores(self, query: str) -> list[tuple[str, float]]:
        """Every library prompt with its ``'choose'`` score for ``query`` (log-probability minus offset), best
        first: what strategy ``'choose'`` ranks, for inspection."""
        if not self._choices:
            raise BundleError(f"{self.manifest.root} has no prompt library to score.")
        scores = candidate_logps(self.decoder, self.input_ids(query), [e.ids for e in self._choices],
                                 pad_token_id=self.policy.pad_token_id)
        if self._offsets is not None:
            scores = scores - self._offsets
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(self._choices[i].text, float(scores[i])) for i in order]

    def generate_ids(
        self,
        rows: Sequence[Sequence[int]],
        *,
        do_sample: bool | None = None,
        seed: int | None = None,
        deadline: float | None = None,
        generation: GenerationConfig | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> list[list[int]]:
        """Decode a batch of policy inputs; returns the generated ids per row (stopping EOS included).

        ``deadline`` (a :func:`time.perf_counter` value) is checked after every step: past it,
        decoding stops and :class:`LatencyBudgetExceeded` is raised. ``generation`` replaces the
        bundle's settings and ``eos_token_ids`` the policy's stop ids (benchmarks decode a fixed
        number of tokens with no stop id).
        """
        generation = generation or self.generation(do_sample=do_sample, strategy="generate")
        eos = self.policy.eos_token_ids if eos_token_ids is None else eos_token_ids
        generator = Generator(self.decoder, generation, eos, self.policy.pad_token_id, np.random.default_rng(seed),
                              drafter=self.drafter, max_draft=self.config.max_draft_tokens)
        try:
            generator.append_tokens(rows)
            while not generator.is_done():
                if deadline is not None and _clock() > deadline:
                    raise LatencyBudgetExceeded(
                        "The policy ran past its latency budget; decoding was stopped. Raise latency_budget_ms, "
                        "serve a faster bundle (qpo export --quantize int8 on CPU, --fp16 on GPU), or set "
                        "fail_open=True to send the query on without a prompt."
                    )
                generator.generate_next_token()
        finally:
            with self._counts_lock:
                self._decode_counts["forward_passes"] += generator.forwards
                self._decode_counts["draft_tokens"] += generator.drafted
                self._decode_counts["accepted_draft_tokens"] += generator.accepted
        return generator.sequences()

    def _decode_queries(
        self, queries: Sequence[str], do_sample: bool | None = None, seed: int | None = None,
        deadline: float | None = None, strategy: str | None = None,
    ) -> list[list[int]]:
        """Generated (or, with strategy 'choose', chosen) ids for every (non-empty) query, in length-sorted batches."""
        if self.generation(do_sample=do_sample, strategy=strategy).strategy == "choose":
            return self.choose_ids([self.input_ids(q) for q in queries], deadline=deadline)
        todo = sorted(((i, self.input_ids(q)) for i, q in enumerate(queries)), key=lambda item: len(item[1]))
        generated: list[list[int]] = [[] for _ in queries]
        rng_seed = seed
        for lo in range(0, len(todo), self.max_batch_size):
            chunk = todo[lo : lo + self.max_batch_size]
            sequences = self.generate_ids([ids for _, ids in chunk], do_sample=do_sample, seed=rng_seed,
                                          deadline=deadline)
            if rng_seed is not None:
                rng_seed += 1
            for (i, _), seq in zip(chunk, sequences, strict=True):
                generated[i] = seq
        return generated

    def _result(self, query: str, ids: Sequence[int], latency_ms: float,
                status: Status = Status.REWRITTEN, strategy: str = "generate") -> OptimizedPrompt:
        eos = set(self.policy.eos_token_ids)
        body = [t for t in ids if t not in eos]
        chosen = self._choice_text.get(tuple(ids)) if strategy == "choose" and body else None
        if chosen is not None:  # the library prompt whole, as training scored it (its ids may be cut short)
            prompt = strip_strings(clean_prompt(chosen), self.special_strings)
        else:
            prompt = finish_prompt(
                self.tokenizer.decode(body, skip_special_tokens=True),
                self.special_strings,
                self.manifest.generation.max_new_tokens,
            ) if body else ""
        rendered = self.template.render(prompt, query)
        return OptimizedPrompt(
            prompt=prompt,
            text=rendered.text,
            messages=rendered.messages,
            latency_ms=latency_ms,
            tokens=len(ids),
            status=status,
        )

    def optimize(
        self, query: str, *, do_sample: bool | None = None, seed: int | None = None,
        latency_budget_ms: float | None = None, fail_open: bool | None = None, strategy: str | None = None,
    ) -> OptimizedPrompt:
        """Write a prompt for one query. ``do_sample`` and ``strategy`` override the bundle defaults; ``seed``
        fixes sampling."""
        return self.optimize_batch([query], do_sample=do_sample, seed=seed, latency_budget_ms=latency_budget_ms,
                                   fail_open=fail_open, strategy=strategy)[0]

    def optimize_batch(
        self, queries: Sequence[str], *, do_sample: bool | None = None, seed: int | None = None,
        latency_budget_ms: float | None = None, fail_open: bool | None = None, strategy: str | None = None,
    ) -> list[OptimizedPrompt]:
        """Write prompts for many queries in batched decodes (left padding, per-row stop).

        Greedy results equal :meth:`optimize` on each query (exactly for fp32 bundles; the int8
        bundle quantizes each row on its own, but its kernels may round a batch differently from
        a single row: see ``docs/performance.md``). Queries are grouped by length into batches of
        at most ``max_batch_size``. Empty or whitespace-only queries get an empty prompt and no
        model call. A query that is not a ``str`` raises :class:`TypeError` before any decode.

        ``latency_budget_ms`` and ``fail_open`` (defaults: the config's) bound the call: past the
        budget, decoding stops and, with ``fail_open``, every query not yet answered comes back
        unchanged with no prompt and ``status=Status.TIMEOUT``; otherwise
        :class:`LatencyBudgetExceeded` is raised, whichever wait noticed the overrun. With
        micro-batching on, greedy calls join the shared batcher; a full queue is
        ``Status.OVERLOADED`` (fail-open) or :class:`QueueFullError`. The runtime is the one owner
        of the budget: integrations pass their settings here and keep no timer of their own.

        ``strategy='choose'`` picks one of the bundle's library prompts per query instead of writing one
        (:mod:`qpo_middleware.choice`); a bundle exported with ``--strategy choose`` does so by default.
        """
        call = self._plan(queries, do_sample, latency_budget_ms, fail_open, strategy)
        if call.todo:
            pending = [queries[i] for i in call.todo]
            if call.greedy and self._batcher is not None:
                generated = [self._wait(item, call) for item in self._submit(pending, call)]
            else:
                try:
                    generated = list(self._decode_queries(pending, do_sample, seed, call.deadline, call.strategy))
                except LatencyBudgetExceeded:
                    if not call.fail_open:
                        raise
                    generated = [Status.TIMEOUT] * len(pending)
            self._fill(queries, call, generated)
        return [r for r in call.results if r is not None]

    async def aoptimize(self, query: str, **kwargs: Any) -> OptimizedPrompt:
        """:meth:`optimize` without blocking the event loop."""
        return (await self.aoptimize_batch([query], **kwargs))[0]

    async def aoptimize_batch(
        self, queries: Sequence[str], *, do_sample: bool | None = None, seed: int | None = None,
        latency_budget_ms: float | None = None, fail_open: bool | None = None, strategy: str | None = None,
    ) -> list[OptimizedPrompt]:
        """:meth:`optimize_batch` without blocking the event loop.

        With micro-batching on, greedy queries go straight to the batcher and are awaited (no
        thread per call, so thousands of concurrent callers cost one decode thread); otherwise
        the call runs in a worker thread.
        """
        queries = list(queries)
        if self._batcher is None or not self._shared(self.generation(do_sample=do_sample, strategy=strategy)):
            return await asyncio.to_thread(self.optimize_batch, queries, do_sample=do_sample, seed=seed,
                                           latency_budget_ms=latency_budget_ms, fail_open=fail_open,
                                           strategy=strategy)
        call = self._plan(queries, do_sample, latency_budget_ms, fail_open, strategy)
        generated: list[list[int] | Status] = []
        for item in self._submit([queries[i] for i in call.todo], call):
            if isinstance(item, Status):
                generated.append(item)
                continue
            try:
                generated.append(await asyncio.wait_for(asyncio.wrap_future(item), _remaining(call.deadline)))
            except TimeoutError:
                generated.append(self._timed_out(item, call))
        self._fill(queries, call, generated)
        return [r for r in call.results if r is not None]

    # -- the steps of a call ------------------------------------------------------------------

    def _plan(self, queries: Sequence[str], do_sample: bool | None, latency_budget_ms: float | None,
              fail_open: bool | None, strategy: str | None = None) -> _Call:
        """Check the queries; answer empty ones and cache hits; list the rest to decode."""
        start = time.perf_counter()
        for query in queries:
            if not isinstance(query, str):
                raise TypeError(f"queries must be strings; got {type(query).__name__}.")
        budget = latency_budget_ms if latency_budget_ms is not None else self.config.latency_budget_ms
        generation = self.generation(do_sample=do_sample, strategy=strategy)
        call = _Call(start=start, deadline=None if budget is None else start + budget / 1000.0,
                     greedy=self._shared(generation),
                     results=[None] * len(queries), strategy=generation.strategy,
                     fail_open=self.config.fail_open if fail_open is None else bool(fail_open))
        for i, query in enumerate(queries):
            if not query.strip():
                call.results[i] = self._result(query, [], 0.0, Status.SKIPPED)
            elif call.greedy and self._cache is not None and (hit := self._cache.get(query)) is not None:
                call.results[i] = replace(hit, status=Status.CACHED, latency_ms=0.0)
            else:
                call.todo.append(i)
        return call

    def _shared(self, generation: GenerationConfig) -> bool:
        """Whether a call with these settings may be served by the cache and the micro-batcher: deterministic,
        with the bundle's own strategy (the batcher decodes with the bundle's settings)."""
        return not generation.do_sample and generation.strategy == self.manifest.generation.strategy

    def _submit(self, queries: list[str], call: _Call) -> list[Future[list[int]] | Status]:
        """Queue every query on the batcher; a full queue is OVERLOADED (or raises without fail-open)."""
        assert self._batcher is not None
        out: list[Future[list[int]] | Status] = []
        for query in queries:
            try:
                out.append(self._batcher.submit(query))
            except QueueFullError:
                if not call.fail_open:
                    raise
                out.append(Status.OVERLOADED)
        return out

    def _wait(self, item: Future[list[int]] | Status, call: _Call) -> list[int] | Status:
        if isinstance(item, Status):
            return item
        try:
            return item.result(timeout=_remaining(call.deadline))
        except FutureTimeout:
            return self._timed_out(item, call)

    def _timed_out(self, future: Future[list[int]], call: _Call) -> Status:
        future.cancel()  # dropped from its batch if the batch has not started
        if not call.fail_open:
            raise LatencyBudgetExceeded(
                "The policy did not answer within its latency budget (waiting in the micro-batching queue). Raise "
                "latency_budget_ms, lower batch_window_ms, or set fail_open=True to send the query on without a prompt."
            )
        return Status.TIMEOUT

    def _fill(self, queries: Sequence[str], call: _Call, generated: Sequence[list[int] | Status]) -> None:
        """Results for the decoded queries (a status instead of ids says why there is no prompt)."""
        latency_ms = (time.perf_counter() - call.start) * 1000.0
        for i, ids in zip(call.todo, generated, strict=True):
            if isinstance(ids, Status):  # fail-open
                logger.warning("qpo: query sent on without a prompt (%s after %.0f ms)", ids, latency_ms)
                call.results[i] = self._result(queries[i], [], latency_ms, ids)
                continue
            result = self._result(queries[i], ids, latency_ms, strategy=call.strategy)
            call.results[i] = result
            if call.greedy and self._cache is not None:
                self._cache.put(queries[i], result)

    @property
    def batching(self) -> bool:
        """Whether concurrent greedy calls share decodes (``RuntimeConfig.batch_window_ms`` is set)."""
        return self._batcher is not None

    def stats(self) -> dict[str, Any]:
        """Counters: forward passes, draft tokens verified and accepted, cache hits/misses/size, micro-batches
        and queries decoded through them, queue depth."""
        with self._counts_lock:
            out: dict[str, Any] = dict(self._decode_counts)
        if self._cache is not None:
            out.update(cache_hits=self._cache.hits, cache_misses=self._cache.misses, cache_size=len(self._cache))
        if self._batcher is not None:
            out.update(batches=self._batcher.batches, batched_queries=self._batcher.queries,
                       queue=self._batcher.pending)
        return out

    def info(self) -> dict[str, Any]:
        """A short description of the loaded bundle (for logs and CLIs)."""
        m = self.manifest
        return {
            "bundle": str(m.root),
            "base_model": m.base_model,
            "task": m.task,
            "dtype": m.model.dtype,
            "provider": self.provider,
            "io_binding": self.decoder.io_binding,
            "library": self.library,
            # label_route bundles: 'choose' scores these routes and sends by the table (None: the whole library),
            # by rule 'remap' (a fixed prompt per top route, for the route read training measured) or 'posterior'
            "routes": None if self._routes is None else {"routes": len(self._routes.routes),
                                                         "prompts": len(self._routes.prompts),
                                                         "labels": list(self._routes.labels),
                                                         "rule": "posterior" if self._routes.read is None else "remap",
                                                         "read": self._routes.read},
            "speculative": self.drafter is not None,
            "strategy": m.generation.strategy,
            "created_by": m.created_by,
        }
