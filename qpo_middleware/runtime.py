"""Torch-free policy runtime: ONNX Runtime + numpy + tokenizers.

:class:`PromptOptimizer` loads a bundle and writes a prompt for each query with
its own KV-cache decode loop over the exported decoder (prefill, then one token
per step, starting from an empty past). Batches are left-padded and every row
stops on its own (EOS or the token cap); finished rows leave the batch.

The loop lives in :class:`Generator` (modelled on onnxruntime-genai's
``append_tokens`` / ``is_done`` / ``generate_next_token``), so streaming and
budgets can be built on top of it. All per-call state is local to a call:
``PromptOptimizer`` is safe to share between threads
(``InferenceSession.run`` is thread-safe).
"""

from __future__ import annotations

import logging
import os
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .bundle import BundleError, GenerationConfig, Manifest, ModelSpec, load_manifest
from .policy_format import PolicyFormat
from .template import Template

logger = logging.getLogger(__name__)

Provider = Literal["auto", "cpu", "cuda"]

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
    the decoded tokens, the stopping EOS included.
    """

    prompt: str
    text: str
    messages: list[dict[str, str]] = field(default_factory=list)
    latency_ms: float = 0.0
    tokens: int = 0


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
    """Stateless view of the exported decoder: names come from the manifest, dtypes from the session."""

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec) -> None:
        self.session = session
        self.spec = spec
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
        past: list[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One run. Returns (last-position logits as float32 (batch, vocab), presents in past order)."""
        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(self.ids_dtype, copy=False),
            "attention_mask": attention_mask.astype(self.mask_dtype, copy=False),
        }
        if self.spec.has_position_ids:
            feeds["position_ids"] = position_ids.astype(self.pos_dtype, copy=False)
        for (key_name, value_name), i in zip(self.past_names, range(0, len(past), 2), strict=True):
            feeds[key_name] = past[i]
            feeds[value_name] = past[i + 1]
        logits, *presents = self.session.run(self.output_names, feeds)
        # logits: (batch, seq, vocab); only the last position decides the next token.
        return np.asarray(logits[:, -1, :], dtype=np.float32), presents


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
        self._past: list[np.ndarray] = []
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
            self._past = [p[keep] for p in self._past]
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


PROMPT_CHARS_PER_TOKEN = 32
"""A prompt is cut to ``max_new_tokens * PROMPT_CHARS_PER_TOKEN`` characters (English averages
about 4 per token; only runs of repeated symbols, which some vocabularies merge into one
token of up to ~80 characters, come near it)."""

_QUERY_CHARS_PER_TOKEN = 16
_QUERY_TOKEN_MARGIN = 8


def policy_text(query: str) -> str:
    """The copy of ``query`` the policy reads: lone surrogates become U+FFFD.

    A Python ``str`` may hold surrogate code points (from ``surrogateescape`` or
    ``surrogatepass`` decoding, or a JSON ``"\\ud800"``) that UTF-8, hence the tokenizer,
    cannot encode. A well-formed pair is joined into the character it encodes; a lone
    surrogate becomes U+FFFD. Every other string (control characters and NULs
    included) is returned as is. Only the policy's input changes: the rendered
    ``text`` keeps the query verbatim.
    """
    try:
        query.encode("utf-8")
    except UnicodeEncodeError:
        return query.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return query


def strip_strings(text: str, strings: Sequence[str]) -> str:
    """``text`` without any of ``strings``, removed until none is left (a removal may join a new one)."""
    while True:
        before = text
        for s in strings:
            text = text.replace(s, "")
        if text == before:
            return text


def clean_prompt(text: str) -> str:
    """Drop control/format characters (keep newline and tab), undecodable bytes, outer whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    kept = (
        ch
        for ch in text
        if ch in "\n\t" or (unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co") and ch != "\ufffd")
    )
    return "".join(kept).strip()


def special_token_strings(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The contents of a tokenizer's special added tokens, longest first."""
    added = tokenizer.get_added_tokens_decoder().values()
    return tuple(sorted({t.content for t in added if t.special and t.content}, key=len, reverse=True))


def finish_prompt(decoded: str, special_strings: Sequence[str], max_new_tokens: int) -> str:
    """The prompt as served (and as scored in training): cleaned, no special-token strings, capped."""
    prompt = strip_strings(clean_prompt(decoded), special_strings)
    return prompt[: max_new_tokens * PROMPT_CHARS_PER_TOKEN].strip()


def _providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "auto":
        provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "provider='cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}). Install the GPU build: pip install onnxruntime-gpu "
                "(and uninstall onnxruntime), or use provider='cpu'."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    raise ValueError(f"provider must be 'auto', 'cpu' or 'cuda'; got {provider!r}.")


class PromptOptimizer:
    """Writes a prompt for each query with an exported QPO policy. Thread-safe; no torch needed.

    >>> optimizer = PromptOptimizer.from_bundle("bundle/")        # doctest: +SKIP
    >>> optimizer.optimize("Is this review positive? ...").text   # doctest: +SKIP
    """

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        *,
        max_batch_size: int = 16,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}.")
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.decoder = OnnxDecoder(session, manifest.model)
        self.max_batch_size = max_batch_size
        self.provider = session.get_providers()[0]
        # The tokenizer's special tokens (the policy's reward, separator and EOS tokens among them):
        # a prompt may spell one out of ordinary tokens, and a target LLM's tokenizer could read it
        # as the real token (e.g. "<|im_end|>" ending the user turn), so prompts never contain them.
        self.special_strings = special_token_strings(tokenizer)

    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike[str],
        provider: Provider = "auto",
        verify: bool = True,
        *,
        max_batch_size: int = 16,
        session_options: ort.SessionOptions | None = None,
    ) -> PromptOptimizer:
        """Load a bundle made by ``qpo export``.

        ``provider``: ``"auto"`` uses CUDA when onnxruntime-gpu provides it, else
        CPU. ``verify`` checks every file's SHA-256 first (about 1 s per 500 MB).
        """
        manifest = load_manifest(path, verify=verify)
        providers = _providers(provider)
        options = session_options or ort.SessionOptions()
        if session_options is None:
            options.log_severity_level = 3
        session = ort.InferenceSession(str(manifest.model_path), sess_options=options, providers=providers)
        tokenizer = Tokenizer.from_file(str(manifest.tokenizer_path))
        optimizer = cls(manifest, session, tokenizer, max_batch_size=max_batch_size)
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

    # -- generation -----------------------------------------------------------------------

    def input_ids(self, query: str) -> list[int]:
        """The policy input for ``query`` (tokenized without special tokens, then laid out by the policy).

        The policy reads :func:`policy_text` of the query, and only its first
        ``query_max_tokens`` tokens: a long query is tokenized from a prefix (at least
        ``16 * (query_max_tokens + 8)`` characters, grown until it holds 8 tokens more
        than are read), so a 10 MB query costs about what a short one does. The ids equal
        those of the whole text unless one word spans both the cut and the tokens read.
        """
        return self.policy.input_ids(self._query_ids(policy_text(query)))

    def _query_ids(self, text: str) -> list[int]:
        wanted = self.policy.query_max_tokens + _QUERY_TOKEN_MARGIN
        special = self.policy.special_ids  # dropped by PolicyFormat.input_ids: they do not count
        chars = wanted * _QUERY_CHARS_PER_TOKEN
        while True:
            ids = self.tokenizer.encode(text[:chars], add_special_tokens=False).ids
            if chars >= len(text) or sum(t not in special for t in ids) >= wanted:
                return ids
            chars *= 4

    def decode_params(self, do_sample: bool | None = None) -> DecodeParams:
        return DecodeParams.from_config(self.policy, self.manifest.generation, do_sample)

    def generate_ids(
        self, rows: Sequence[Sequence[int]], *, do_sample: bool | None = None, seed: int | None = None
    ) -> list[list[int]]:
        """Decode a batch of policy inputs; returns the generated ids per row (stopping EOS included)."""
        generator = Generator(self.decoder, self.decode_params(do_sample), np.random.default_rng(seed))
        generator.append_tokens(rows)
        while not generator.is_done():
            generator.generate_next_token()
        return generator.sequences()

    def _result(self, query: str, ids: Sequence[int], latency_ms: float) -> OptimizedPrompt:
        eos = set(self.policy.eos_token_ids)
        body = [t for t in ids if t not in eos]
        prompt = finish_prompt(
            self.tokenizer.decode(body, skip_special_tokens=True),
            self.special_strings,
            self.manifest.generation.max_new_tokens,
        )
        rendered = self.template.render(prompt, query)
        return OptimizedPrompt(
            prompt=prompt,
            text=rendered.text,
            messages=rendered.messages,
            latency_ms=latency_ms,
            tokens=len(ids),
        )

    def optimize(
        self, query: str, *, do_sample: bool | None = None, seed: int | None = None
    ) -> OptimizedPrompt:
        """Write a prompt for one query. ``do_sample`` overrides the bundle default; ``seed`` fixes sampling."""
        return self.optimize_batch([query], do_sample=do_sample, seed=seed)[0]

    def optimize_batch(
        self, queries: Sequence[str], *, do_sample: bool | None = None, seed: int | None = None
    ) -> list[OptimizedPrompt]:
        """Write prompts for many queries in batched decodes (left padding, per-row stop).

        Greedy results equal :meth:`optimize` on each query. Queries are grouped by
        length into batches of at most ``max_batch_size``. Empty or whitespace-only
        queries get an empty prompt and no model call. A query that is not a ``str``
        raises :class:`TypeError` before any decode.
        """
        start = time.perf_counter()
        for query in queries:
            if not isinstance(query, str):
                raise TypeError(f"queries must be strings; got {type(query).__name__}.")
        todo = [(i, self.input_ids(q)) for i, q in enumerate(queries) if q.strip()]
        todo.sort(key=lambda item: len(item[1]))  # similar lengths together: less padding
        generated: dict[int, list[int]] = {}
        rng_seed = seed
        for lo in range(0, len(todo), self.max_batch_size):
            chunk = todo[lo : lo + self.max_batch_size]
            sequences = self.generate_ids([ids for _, ids in chunk], do_sample=do_sample, seed=rng_seed)
            if rng_seed is not None:
                rng_seed += 1
            generated.update((i, seq) for (i, _), seq in zip(chunk, sequences, strict=True))
        latency_ms = (time.perf_counter() - start) * 1000.0
        return [self._result(q, generated.get(i, []), latency_ms) for i, q in enumerate(queries)]

    def info(self) -> dict[str, Any]:
        """A short description of the loaded bundle (for logs and CLIs)."""
        m = self.manifest
        return {
            "bundle": str(m.root),
            "base_model": m.base_model,
            "task": m.task,
            "dtype": m.model.dtype,
            "provider": self.provider,
            "created_by": m.created_by,
        }
