"""The runtime's decode loop: one batched greedy or sampled decode over an :class:`OnnxDecoder`.

Modelled on onnxruntime-genai's generator (``append_tokens`` / ``is_done`` /
``generate_next_token``), so streaming and budgets are built on top of it. Its settings are a
:class:`~qpo_middleware.bundle.GenerationConfig` (the one settings type of every decode loop);
the stop ids and the pad id come from the policy's format.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .bundle import GenerationConfig
from .decoder import OnnxDecoder


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, position_ids) of a left-padded batch: (batch, width) int64 each.

    Real tokens count positions from 0; pads get position 0 too (they are masked out).
    """
    batch, width = len(rows), max(len(r) for r in rows)
    input_ids = np.full((batch, width), pad_token_id, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return input_ids, mask, positions


class Generator:
    """One batched decode: ``append_tokens`` (prefill), then ``generate_next_token`` until ``is_done``.

    Rows are left-padded at prefill; each row stops on an EOS id or after
    ``max_new_tokens``; finished rows are dropped from the running batch (and
    from the KV cache) so later steps only pay for live rows.
    """

    def __init__(
        self,
        decoder: OnnxDecoder,
        generation: GenerationConfig,
        eos_token_ids: Iterable[int],
        pad_token_id: int = 0,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.decoder = decoder
        self.generation = generation
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.pad_token_id = pad_token_id
        self.rng = rng if rng is not None else np.random.default_rng()
        self._suppress = np.array(sorted(set(generation.suppress_token_ids)), dtype=np.int64)
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
        input_ids, mask, positions = left_pad(rows, self.pad_token_id)
        batch = len(rows)
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
            if token in self.eos_token_ids or len(self._generated[row]) >= self.generation.max_new_tokens:
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
        p = self.generation
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
