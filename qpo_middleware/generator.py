"""The runtime's decode loop: one batched greedy or sampled decode over an :class:`OnnxDecoder`.

Modelled on onnxruntime-genai's generator (``append_tokens`` / ``is_done`` /
``generate_next_token``), so streaming and budgets are built on top of it. Its settings are a
:class:`~qpo_middleware.bundle.GenerationConfig` (the one settings type of every decode loop);
the stop ids and the pad id come from the policy's format.

With a :class:`~qpo_middleware.library.Drafter`, greedy decoding is speculative and lossless:
after choosing a row's next token, the drafter guesses up to ``max_draft`` more from the
bundle's prompt library, one forward pass of the same graph reads them all (the past cache plus
several new positions), and the row keeps the longest prefix of the guess that equals the token
greedy decoding picks at each position, plus nothing else. Rejected positions are masked out of
the cache (and cut off when no row needs them), so the output is the greedy output, token for
token (exactly so for fp32 and fp16 bundles; an int8 kernel may round a several-token pass
differently from a one-token step, as it rounds a batch differently from a single row).
Sampling always decodes one token per step.

Drafting stays cheap when it does not help: a row whose draft is rejected at its first token
drafts only along the library's trie afterwards (no more prompt-lookup guesses), and a step whose
drafts hold fewer tokens than the batch has rows runs as a plain step (a wider pass costs every
row, and at larger batches it is compute-bound).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .bundle import GenerationConfig
from .decoder import OnnxDecoder
from .library import Drafter


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
        drafter: Drafter | None = None,
        max_draft: int = 16,
    ) -> None:
        self.decoder = decoder
        # Drafts only for greedy decoding, where verifying them cannot change the output.
        self.drafter = drafter if drafter is not None and not generation.do_sample and max_draft > 0 else None
        self.max_draft = max_draft
        self.forwards = 0  # forward passes run, the prefill included
        self.drafted = 0  # draft tokens sent for verification
        self.accepted = 0  # draft tokens kept
        self._lookup_ok: dict[int, bool] = {}  # per row: may it still draft by prompt lookup?
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
        self.forwards += 1
        self._mask = mask
        self._positions = positions[:, -1] + 1

    def is_done(self) -> bool:
        """True once every row has stopped (or before :meth:`append_tokens`)."""
        return self._rows.size == 0

    def generate_next_token(self) -> None:
        """Pick the next token of every live row, then run the model on it for the rows that go on.

        With a drafter, the same pass also verifies each row's draft, so a step may add several tokens.
        """
        if self.is_done():
            raise RuntimeError("Generator is done: no live row to decode.")
        tokens = self.next_token(self._logits)  # (live,)
        self._last = [None] * len(self._generated)
        keep = np.ones(self._rows.size, dtype=bool)
        for j, (row, token) in enumerate(zip(self._rows.tolist(), tokens.tolist(), strict=True)):
            self._append(row, token)
            keep[j] = not self._stopped(row)
        if not self._drop(keep):
            return
        tokens = tokens[keep]
        drafts = [self._draft(row) for row in self._rows.tolist()] if self.drafter is not None else []
        if sum(map(len, drafts)) < len(drafts):  # too little to draft to pay for a wider pass
            drafts = []
        if not drafts:
            self._mask = np.concatenate([self._mask, np.ones((self._mask.shape[0], 1), dtype=np.int64)], axis=1)
            self._logits, self._past = self.decoder.forward(
                tokens[:, None], self._mask, self._positions[:, None], self._past
            )
            self.forwards += 1
            self._positions = self._positions + 1
            return
        self._verify(tokens, drafts)

    def get_next_tokens(self) -> list[int | None]:
        """The last token each row got in the last step (``None`` for rows that had already stopped)."""
        return list(self._last)

    def sequences(self) -> list[list[int]]:
        """Generated tokens per row so far (the stopping EOS included)."""
        return [list(s) for s in self._generated]

    # -- steps ----------------------------------------------------------------------------

    def _append(self, row: int, token: int) -> None:
        self._generated[row].append(token)
        self._last[row] = token

    def _stopped(self, row: int) -> bool:
        generated = self._generated[row]
        return generated[-1] in self.eos_token_ids or len(generated) >= self.generation.max_new_tokens

    def _drop(self, keep: np.ndarray) -> bool:
        """Remove the rows not in ``keep`` (a mask over live rows) from the batch; False once none is left."""
        if keep.all():
            return True
        self._rows = self._rows[keep]
        if self._rows.size == 0:
            self._past, self._logits = [], np.zeros((0, 0), dtype=np.float32)
            return False
        self._mask, self._positions, self._logits = self._mask[keep], self._positions[keep], self._logits[keep]
        self._past = self.decoder.take_rows(self._past, keep)
        return True

    def _draft(self, row: int) -> list[int]:
        """The drafter's guess for ``row``, no longer than the tokens it may still write, cut after an EOS."""
        assert self.drafter is not None
        generated = self._generated[row]
        room = min(self.max_draft, self.generation.max_new_tokens - len(generated))
        draft = self.drafter.draft(generated, room, lookup=self._lookup_ok.get(row, True))
        for i, token in enumerate(draft):
            if token in self.eos_token_ids:
                return draft[: i + 1]
        return draft

    def _verify(self, tokens: np.ndarray, drafts: list[list[int]]) -> None:
        """One forward pass over each row's chosen token and its draft; keep the drafted tokens greedy picks."""
        live, width = tokens.shape[0], 1 + max(len(d) for d in drafts)
        input_ids = np.full((live, width), self.pad_token_id, dtype=np.int64)
        new_mask = np.zeros((live, width), dtype=np.int64)
        input_ids[:, 0] = tokens
        for i, draft in enumerate(drafts):
            input_ids[i, 1 : 1 + len(draft)] = draft
            new_mask[i, : 1 + len(draft)] = 1
        positions = self._positions[:, None] + np.arange(width)[None, :]  # a pad's position is masked anyway
        mask = np.concatenate([self._mask, new_mask], axis=1)
        logits, past = self.decoder.forward(input_ids, mask, positions, self._past, all_positions=True)
        self.forwards += 1
        choices = self.next_token(logits.reshape(live * width, -1)).reshape(live, width)
        keep = np.ones(live, dtype=bool)
        accepted = np.zeros(live, dtype=np.int64)
        for i, (row, draft) in enumerate(zip(self._rows.tolist(), drafts, strict=True)):
            self.drafted += len(draft)
            for k, token in enumerate(draft):  # greedy after position k picked choices[i, k]
                if int(choices[i, k]) != token:
                    break
                self._append(row, token)
                accepted[i] += 1
                if self._stopped(row):
                    keep[i] = False
                    break
            self.accepted += int(accepted[i])
            if draft and not accepted[i]:
                self._lookup_ok[row] = False
            new_mask[i, 1 + accepted[i] :] = 0  # rejected drafts and pads: never attended to again
        self._logits = logits[np.arange(live), accepted]
        self._mask = np.concatenate([self._mask, new_mask], axis=1)
        self._positions = self._positions + 1 + accepted
        self._past = past
        if not self._drop(keep):
            return
        used = int(np.flatnonzero(self._mask.any(axis=0)).max()) + 1
        if used < self._mask.shape[1] and isinstance(self._past[0], np.ndarray):
            self._mask = self._mask[:, :used]
            self._past = self.decoder.trim_past(self._past, used)

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
