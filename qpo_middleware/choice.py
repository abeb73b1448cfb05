"""The ``choose`` strategy: the policy picks one of the bundle's library prompts instead of writing one.

Each library prompt is scored for the query by the policy itself::

    score(prompt) = log p(prompt ids | top reward bucket, query) - offset(prompt)

and the highest score wins (ties go to the earlier library entry, the more frequent prompt). This is
decoding constrained to the library: the exact most likely library prompt, not a greedy approximation
of it, and the prompt comes back verbatim. ``offset`` is the prompt's mean log-probability under the
policy's DPO reference over training queries (written by training, carried in ``library.json``), so a
preference-trained policy is scored by what preference training added for this query rather than by
how likely the prompt was to begin with; a library without offsets scores by log-probability alone.
The benchmarks (``benchmarks/pool_choice.py``, ``benchmarks/choice_rules.py``) measured this rule
against the best single prompt and a selector; ``docs/benchmarks.md`` has the numbers.

The numbers equal training's ``candidate_logps`` (``qpo_middleware.training.preference``) on the same
model: the query's context runs once, its KV cache is repeated for every candidate, and one pass per
chunk of candidates reads every candidate token's log-probability over the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .decoder import OnnxDecoder

# The most float32 logits one candidate pass may return (rows x tokens x vocab): 64 MB.
LOGITS_BUDGET = 1 << 24


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log softmax`` over the last axis, in float32."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def candidate_logps(decoder: OnnxDecoder, context: Sequence[int], candidates: Sequence[Sequence[int]], *,
                    pad_token_id: int, check: Callable[[], None] | None = None) -> np.ndarray:
    """``log p(candidate | context)`` of every candidate (its ids, EOS included): shape ``(len(candidates),)``.

    ``check`` runs before every model pass (the runtime raises there when a latency budget ran out).
    """
    if not candidates:
        return np.zeros(0, dtype=np.float64)
    if not context or any(not c for c in candidates):
        raise ValueError("candidate_logps needs a non-empty context and non-empty candidates.")
    if check:
        check()
    width = len(context)
    ones = np.ones((1, width), dtype=np.int64)
    first, past = decoder.forward(np.asarray([context], dtype=np.int64), ones, np.arange(width)[None, :],
                                  decoder.empty_past(1))
    past = decoder.take_rows(past, np.ones(1, dtype=bool))  # on the host, to repeat per candidate
    first_logps = log_softmax(first[0])  # predicts every candidate's first token
    out = first_logps[[c[0] for c in candidates]].astype(np.float64)
    # Token i > 0 is predicted by the candidate's position i - 1, so its last token is never fed.
    length = max(len(c) for c in candidates) - 1
    if length == 0:
        return out
    rows = max(1, LOGITS_BUDGET // (length * first.shape[-1]))
    for lo in range(0, len(candidates), rows):
        chunk = candidates[lo : lo + rows]
        if check:
            check()
        batch = len(chunk)
        ids = np.full((batch, length + 1), pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, length + 1), dtype=np.int64)
        for i, candidate in enumerate(chunk):
            ids[i, : len(candidate)] = candidate
            mask[i, : len(candidate)] = 1
        attention = np.concatenate([np.ones((batch, width), dtype=np.int64), mask[:, :-1]], axis=1)
        positions = np.broadcast_to(width + np.arange(length)[None, :], (batch, length))
        logits, _ = decoder.forward(ids[:, :-1], attention, positions, [np.repeat(p, batch, axis=0) for p in past],
                                    all_positions=True)  # (batch, length, vocab)
        logps = log_softmax(logits)
        picked = np.take_along_axis(logps, ids[:, 1:, None], axis=-1)[..., 0]  # (batch, length)
        out[lo : lo + batch] += (picked * mask[:, 1:]).sum(axis=-1)
    return out


def choose(scores: np.ndarray, offsets: np.ndarray | None) -> int:
    """The index of the best candidate by ``scores - offsets`` (the first of ties)."""
    return int(np.argmax(scores if offsets is None else scores - offsets))
