"""Torch-free policy runtime: ONNX Runtime + numpy + tokenizers.

:class:`PromptOptimizer` loads a bundle and writes a prompt for each query with
its own KV-cache decode loop over the exported decoder (prefill, then one token
per step, starting from an empty past). Batches are left-padded and every row
stops on its own (EOS or the token cap); finished rows leave the batch.

The loop lives in :class:`Generator` (modelled on onnxruntime-genai's
``append_tokens`` / ``is_done`` / ``generate_next_token``), so streaming and
budgets can be built on top of it. All per-call state is local to a call:
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
from .bundle import BundleError, GenerationConfig, Manifest, ModelSpec, load_manifest
from .config import Provider, RuntimeConfig, ort  # ort: ONNX Runtime, imported with the install fix
from .policy_format import PolicyFormat
from .template import Template
from .text import finish_prompt, special_token_strings

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

    @property
    def failed_open(self) -> bool:
        """True when the query went on without a prompt because the policy could not answer in time."""
        return self in (Status.TIMEOUT, Status.OVERLOADED)

_ORT_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class OptimizedPrompt:
    """The policy's prompt for one query and the rendered input for the target LLM.

    ``prompt`` is the generated instruction (no special tokens nor their strings,
    no control characters besides newline/tab, stripped, at most
    :data:`PROMPT_CHARS_PER_TOKEN` characters per ``max_new_tokens``); ``text`` is
    the user turn with the original query verbatim inside (never altered, even
    where the policy read a sanitized copy: see :func:`policy_text`);
    ``messages`` are the chat messages to
    send; ``latency_ms`` is the wall time of the call that produced it (the
    whole batch for :meth:`PromptOptimizer.optimize_batch`); ``tokens`` counts
    the decoded tokens, the stopping EOS included. ``status`` says what happened:
    ``"rewritten"``, ``"cached"`` (an LRU cache hit), ``"skipped"`` (an empty query: no model
    call), ``"timeout"`` or ``"overloaded"`` (fail-open: no prompt, the query goes on as is).
    """

    prompt: str
    text: str
    messages: list[dict[str, str]] = field(default_factory=list)
    latency_ms: float = 0.0
    tokens: int = 0
    status: Status = Status.REWRITTEN


@dataclass(frozen=True)
class DecodeParams:
    """Everything one decode needs besides the model: token cap, stop ids and the sampling rule."""

    max_new_tokens: int
    eos_token_ids: frozenset[int]
    pad_token_id: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    suppress_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_config(
        cls, policy: PolicyFormat, generation: GenerationConfig, do_sample: bool | None
    ) -> DecodeParams:
        return cls(
            max_new_tokens=generation.max_new_tokens,
            eos_token_ids=frozenset(policy.eos_token_ids),
            pad_token_id=policy.pad_token_id,
            do_sample=generation.do_sample if do_sample is None else bool(do_sample),
            temperature=float(generation.temperature),
            top_k=generation.top_k,
            top_p=float(generation.top_p),
            suppress_token_ids=generation.suppress_token_ids,
        )


# ---------------------------------------------------------------------------- the model


class OnnxDecoder:
    """Stateless view of the exported decoder: names come from the manifest, dtypes from the session.

    With ``io_binding`` the presents stay ORT values on the session's device and are bound as
    the next step's past (on CUDA the KV cache never visits the host; only the last
    position's logits are read back).
    """

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, io_binding: bool = False) -> None:
        self.session = session
        self.spec = spec
        self.io_binding = io_binding
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        self.past_names = spec.past_names()
        self.present_names = spec.present_names()
        needed = {"input_ids", "attention_mask"} | {n for pair in self.past_names for n in pair}
        if spec.has_position_ids:
            needed.add("position_ids")
        missing = sorted(needed - set(inputs))
        if missing:
            raise BundleError(
                f"The ONNX model lacks input(s) {missing} that qpo.json promises; the bundle is inconsistent. "
                "Re-export it with `qpo export`."
            )
        unknown = sorted(set(inputs) - needed)
        if unknown:
            raise BundleError(
                f"The ONNX model takes input(s) {unknown} that this runtime does not feed; "
                "re-export it with `qpo export` (task text-generation-with-past)."
            )
        missing_out = sorted(({"logits"} | {n for pair in self.present_names for n in pair}) - outputs)
        if missing_out:
            raise BundleError(
                f"The ONNX model lacks output(s) {missing_out}; re-export it with `qpo export`."
            )

        def dtype(name: str) -> type[np.generic]:
            kind = inputs[name].type
            if kind not in _ORT_DTYPES:
                raise BundleError(f"ONNX input {name!r} has unsupported type {kind}.")
            return _ORT_DTYPES[kind]

        self.ids_dtype = dtype("input_ids")
        self.mask_dtype = dtype("attention_mask")
        self.pos_dtype = dtype("position_ids") if spec.has_position_ids else np.int64
        self.kv_dtype = dtype(self.past_names[0][0])
        self.output_names = ["logits"] + [n for pair in self.present_names for n in pair]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A past of length 0 for every layer's key and value: (batch, kv_heads, 0, head_dim)."""
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.spec.num_layers)]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[Any],
    ) -> tuple[np.ndarray, list[Any]]:
        """One run. Returns (last-position logits as float32 (batch, vocab), presents in past order).

        ``past`` holds numpy arrays, or ORT values from the previous step with IO binding.
        """
        feeds: dict[str, Any] = {
            "input_ids": input_ids.astype(self.ids_dtype, copy=False),
            "attention_mask": attention_mask.astype(self.mask_dtype, copy=False),
        }
        if self.spec.has_position_ids:
            feeds["position_ids"] = position_ids.astype(self.pos_dtype, copy=False)
        for (key_name, value_name), i in zip(self.past_names, range(0, len(past), 2), strict=True):
            feeds[key_name] = past[i]
            feeds[value_name] = past[i + 1]
        if self.io_binding:
            return self._forward_bound(feeds)
        logits, *presents = self.session.run(self.output_names, feeds)
        # logits: (batch, seq, vocab); only the last position decides the next token.
        return np.asarray(logits[:, -1, :], dtype=np.float32), presents

    def _forward_bound(self, feeds: dict[str, Any]) -> tuple[np.ndarray, list[Any]]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        # On CUDA this copies the whole (batch, seq, vocab) block; at a decode step seq is 1.
        return np.asarray(logits.numpy()[:, -1, :], dtype=np.float32), presents

    def take_rows(self, past: list[Any], keep: np.ndarray) -> list[Any]:
        """The past of the rows in ``keep`` (a boolean mask): ORT values come to the host once for it."""
        return [(p.numpy() if isinstance(p, ort.OrtValue) else p)[keep] for p in past]


# ---------------------------------------------------------------------------- the decode loop


class Generator:
    """One batched decode: ``append_tokens`` (prefill), then ``generate_next_token`` until ``is_done``.

    Rows are left-padded at prefill; each row stops on an EOS id or after
    ``max_new_tokens``; finished rows are dropped from the running batch (and
    from the KV cache) so later steps only pay for live rows.
    """

    def __init__(
        self, decoder: OnnxDecoder, params: DecodeParams, rng: np.random.Generator | None = None
    ) -> None:
        self.decoder = decoder
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng()
        self._suppress = np.array(sorted(set(params.suppress_token_ids)), dtype=np.int64)
        self._started = False
        self._rows: np.ndarray = np.zeros(0, dtype=np.int64)  # original index of each live row
        self._generated: list[list[int]] = []
        self._last: list[int | None] = []
        self._mask = np.zeros((0, 0), dtype=np.int64)  # (live, past_len)
        self._positions = np.zeros(0, dtype=np.int64)  # (live,) position of the next token
        self._past: list[Any] = []
        self._logits = np.zeros((0, 0), dtype=np.float32)  # (live, vocab) logits for the next token

    # -- public API -----------------------------------------------------------------------

    def append_tokens(self, rows: Sequence[Sequence[int]]) -> None:
        """Prefill the batch with each row's input ids (left padding, empty past)."""
        if self._started:
            raise RuntimeError(
                "Generator.append_tokens may be called once, before decoding; make a new Generator."
            )
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("append_tokens needs at least one row and no empty row.")
        self._started = True
        batch, width = len(rows), max(len(r) for r in rows)
        input_ids = np.full((batch, width), self.params.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
        # Real tokens count from position 0; pads get position 0 too (they are masked out).
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        self._rows = np.arange(batch)
        self._generated = [[] for _ in range(batch)]
        self._last = [None] * batch
        self._logits, self._past = self.decoder.forward(
            input_ids, mask, positions, self.decoder.empty_past(batch)
        )
        self._mask = mask
        self._positions = positions[:, -1] + 1

    def is_done(self) -> bool:
        """True once every row has stopped (or before :meth:`append_tokens`)."""
        return self._rows.size == 0

    def generate_next_token(self) -> None:
        """Pick one token for every live row, then run the model on them for the rows that go on."""
        if self.is_done():
            raise RuntimeError("Generator is done: no live row to decode.")
        tokens = self.next_token(self._logits)  # (live,)
        self._last = [None] * len(self._generated)
        keep = np.ones(self._rows.size, dtype=bool)
        for j, (row, token) in enumerate(zip(self._rows.tolist(), tokens.tolist(), strict=True)):
            self._generated[row].append(token)
            self._last[row] = token
            if token in self.params.eos_token_ids or len(self._generated[row]) >= self.params.max_new_tokens:
                keep[j] = False
        if not keep.all():
            self._rows = self._rows[keep]
            if self._rows.size == 0:
                self._past, self._logits = [], np.zeros((0, 0), dtype=np.float32)
                return
            tokens, self._mask, self._positions = tokens[keep], self._mask[keep], self._positions[keep]
            self._past = self.decoder.take_rows(self._past, keep)
        self._mask = np.concatenate([self._mask, np.ones((self._mask.shape[0], 1), dtype=np.int64)], axis=1)
        self._logits, self._past = self.decoder.forward(
            tokens[:, None], self._mask, self._positions[:, None], self._past
        )
        self._positions = self._positions + 1

    def get_next_tokens(self) -> list[int | None]:
        """The token each row got in the last step (``None`` for rows that had already stopped)."""
        return list(self._last)

    def sequences(self) -> list[list[int]]:
        """Generated tokens per row so far (the stopping EOS included)."""
        return [list(s) for s in self._generated]

    # -- token selection ------------------------------------------------------------------

    def next_token(self, logits: np.ndarray) -> np.ndarray:
        """Choose one token per row from (rows, vocab) logits: greedy, or sampled with temperature/top-k/top-p."""
        if self._suppress.size:
            logits = logits.copy()
            logits[:, self._suppress[self._suppress < logits.shape[1]]] = -np.inf
        p = self.params
        if not p.do_sample:
            return np.argmax(logits, axis=-1).astype(np.int64)
        scores = logits / max(p.temperature, 1e-6)
        vocab = scores.shape[-1]
        if 0 < p.top_k < vocab:
            kth = np.partition(scores, vocab - p.top_k, axis=-1)[:, vocab - p.top_k, None]
            scores = np.where(scores < kth, -np.inf, scores)
        order = np.argsort(-scores, axis=-1, kind="stable")
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        probs = np.exp(sorted_scores - sorted_scores[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        if p.top_p < 1.0:
            cumulative = np.cumsum(probs, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
            drop = (cumulative - probs) >= p.top_p
            probs = np.where(drop, 0.0, probs)
            probs /= probs.sum(axis=-1, keepdims=True)
        cumulative = np.cumsum(probs, axis=-1)
        draws = self.rng.random(probs.shape[0])[:, None] * cumulative[:, -1:]
        picks = np.minimum((cumulative < draws).sum(axis=-1), vocab - 1)
        return np.take_along_axis(order, picks[:, None], axis=-1)[:, 0].astype(np.int64)


# ---------------------------------------------------------------------------- the public component


def _providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "auto":
        if "CUDAExecutionProvider" in available:
            provider = "cuda"
        else:
            logger.info("qpo: no CUDAExecutionProvider in this onnxruntime (%s); running on CPU.", ", ".join(available))
            provider = "cpu"
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "provider='cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}). Install the GPU build instead of the CPU one: "
                "pip uninstall -y onnxruntime && pip install 'qpo-middleware[gpu]' (onnxruntime-gpu), "
                "or use provider='cpu'."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    raise ValueError(f"provider must be 'auto', 'cpu' or 'cuda'; got {provider!r}.")


def make_session(model_path: str | os.PathLike[str], config: RuntimeConfig) -> ort.InferenceSession:
    """An ONNX Runtime session for the bundle's model, with a logged fallback when CUDA does not start."""
    providers = _providers(config.provider)
    session = ort.InferenceSession(str(model_path), sess_options=config.session_options(), providers=providers)
    if providers[0] == "CUDAExecutionProvider" and session.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime-gpu lists CUDA but could not start it (no driver, missing CUDA/cuDNN libraries).
        logger.warning(
            "qpo: the CUDA execution provider did not start (check the CUDA and cuDNN libraries that "
            "onnxruntime-gpu needs); running on %s instead.", session.get_providers()[0]
        )
    return session


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
    greedy: bool
    results: list[OptimizedPrompt | None]
    fail_open: bool
    todo: list[int] = field(default_factory=list)


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
                                           providers=_providers(config.provider))
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

    def decode_params(self, do_sample: bool | None = None) -> DecodeParams:
        return DecodeParams.from_config(self.policy, self.manifest.generation, do_sample)

    def generate_ids(
        self,
        rows: Sequence[Sequence[int]],
        *,
        do_sample: bool | None = None,
        seed: int | None = None,
        deadline: float | None = None,
        params: DecodeParams | None = None,
    ) -> list[list[int]]:
        """Decode a batch of policy inputs; returns the generated ids per row (stopping EOS included).

        ``deadline`` (a :func:`time.perf_counter` value) is checked after every step: past it,
        decoding stops and :class:`LatencyBudgetExceeded` is raised. ``params`` replaces the
        bundle's decode settings (benchmarks use it to decode a fixed number of tokens).
        """
        generator = Generator(self.decoder, params or self.decode_params(do_sample), np.random.default_rng(seed))
        generator.append_tokens(rows)
        while not generator.is_done():
            if deadline is not None and _clock() > deadline:
                raise LatencyBudgetExceeded("The policy ran past its latency budget; decoding was stopped.")
            generator.generate_next_token()
        return generator.sequences()

    def _decode_queries(
        self, queries: Sequence[str], do_sample: bool | None = None, seed: int | None = None,
        deadline: float | None = None,
    ) -> list[list[int]]:
        """Generated ids for every (non-empty) query, decoded in length-sorted batches."""
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
                status: Status = Status.REWRITTEN) -> OptimizedPrompt:
        eos = set(self.policy.eos_token_ids)
        body = [t for t in ids if t not in eos]
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
        latency_budget_ms: float | None = None, fail_open: bool | None = None,
    ) -> OptimizedPrompt:
        """Write a prompt for one query. ``do_sample`` overrides the bundle default; ``seed`` fixes sampling."""
        return self.optimize_batch([query], do_sample=do_sample, seed=seed, latency_budget_ms=latency_budget_ms,
                                   fail_open=fail_open)[0]

    def optimize_batch(
        self, queries: Sequence[str], *, do_sample: bool | None = None, seed: int | None = None,
        latency_budget_ms: float | None = None, fail_open: bool | None = None,
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
        """
        call = self._plan(queries, do_sample, latency_budget_ms, fail_open)
        if call.todo:
            pending = [queries[i] for i in call.todo]
            if call.greedy and self._batcher is not None:
                generated = [self._wait(item, call) for item in self._submit(pending, call)]
            else:
                try:
                    generated = list(self._decode_queries(pending, do_sample, seed, call.deadline))
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
        latency_budget_ms: float | None = None, fail_open: bool | None = None,
    ) -> list[OptimizedPrompt]:
        """:meth:`optimize_batch` without blocking the event loop.

        With micro-batching on, greedy queries go straight to the batcher and are awaited (no
        thread per call, so thousands of concurrent callers cost one decode thread); otherwise
        the call runs in a worker thread.
        """
        queries = list(queries)
        if self._batcher is None or self.decode_params(do_sample).do_sample:
            return await asyncio.to_thread(self.optimize_batch, queries, do_sample=do_sample, seed=seed,
                                           latency_budget_ms=latency_budget_ms, fail_open=fail_open)
        call = self._plan(queries, do_sample, latency_budget_ms, fail_open)
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
              fail_open: bool | None) -> _Call:
        """Check the queries; answer empty ones and cache hits; list the rest to decode."""
        start = time.perf_counter()
        for query in queries:
            if not isinstance(query, str):
                raise TypeError(f"queries must be strings; got {type(query).__name__}.")
        budget = latency_budget_ms if latency_budget_ms is not None else self.config.latency_budget_ms
        call = _Call(start=start, deadline=None if budget is None else start + budget / 1000.0,
                     greedy=not self.decode_params(do_sample).do_sample, results=[None] * len(queries),
                     fail_open=self.config.fail_open if fail_open is None else bool(fail_open))
        for i, query in enumerate(queries):
            if not query.strip():
                call.results[i] = self._result(query, [], 0.0, Status.SKIPPED)
            elif call.greedy and self._cache is not None and (hit := self._cache.get(query)) is not None:
                call.results[i] = replace(hit, status=Status.CACHED, latency_ms=0.0)
            else:
                call.todo.append(i)
        return call

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
            raise LatencyBudgetExceeded("The policy did not answer within its latency budget (micro-batching queue).")
        return Status.TIMEOUT

    def _fill(self, queries: Sequence[str], call: _Call, generated: Sequence[list[int] | Status]) -> None:
        """Results for the decoded queries (a status instead of ids says why there is no prompt)."""
        latency_ms = (time.perf_counter() - call.start) * 1000.0
        for i, ids in zip(call.todo, generated, strict=True):
            if isinstance(ids, Status):  # fail-open
                logger.warning("qpo: query sent on without a prompt (%s after %.0f ms)", ids, latency_ms)
                call.results[i] = self._result(queries[i], [], latency_ms, ids)
                continue
            result = self._result(queries[i], ids, latency_ms)
            call.results[i] = result
            if call.greedy and self._cache is not None:
                self._cache.put(queries[i], result)

    @property
    def batching(self) -> bool:
        """Whether concurrent greedy calls share decodes (``RuntimeConfig.batch_window_ms`` is set)."""
        return self._batcher is not None

    def stats(self) -> dict[str, Any]:
        """Counters: cache hits/misses/size, micro-batches and queries decoded through them, queue depth."""
        out: dict[str, Any] = {}
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
            "created_by": m.created_by,
        }
