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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .policy_format import brief_repr

if TYPE_CHECKING:  # the route table is read by training and the library without loading ONNX Runtime
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


# The temperatures RouteTable.fit_temperature tries: the route scores are whole-prompt log-probabilities, often tens
# of nats apart, so the useful range is wide.
TEMPERATURE_GRID = tuple(2.0**k for k in range(-3, 7))


@dataclass(frozen=True)
class RouteTable:
    """What to send when a ``label_route`` policy's route scores say which label a query has.

    A ``label_route`` policy learned to write (or, constrained to its routes, pick) the prompt that D0 found best
    for the query's label. Read as a classifier, its route scores give a posterior over labels::

        p(route | query) = softmax(route scores / temperature)
        p(label | query) = p(route of label | query) * share(label) / share(labels of that route)

    and the prompt sent is the one with the most expected right answers under it::

        pick = argmax_prompt  sum_label p(label | query) * accuracy[label][prompt]

    ``accuracy`` is the target's accuracy with each prompt on D0's queries of each label. A confident read sends
    the label's specialist; an unsure one a prompt that holds up on the labels in doubt. ``temperature``
    calibrates the scores (:meth:`fit_temperature`, on labelled queries: no target call).

    With ``read`` set (rule ``remap``) the table trusts only which route scores highest, and how often that is the
    query's own: the policy is taken to pick its gold label's route a share ``read`` of the time (the route read,
    measured on labelled held-out queries) and otherwise another label's, in proportion to the labels' shares::

        p(label | top route r)  ~  share(label) * p(r | label)

    so each route sends one fixed prompt, the one with the most expected right answers at that read rate: the
    route itself when reads are good, a prompt that holds up on every label as they fall. ``temperature`` plays
    no part then. On ties a route keeps its own prompt.
    """

    labels: tuple[str, ...]
    shares: tuple[float, ...]  # each label's share of D0's queries
    routes: tuple[str, ...]  # the route prompts, in the order of the scores passed in
    route_labels: tuple[tuple[int, ...], ...]  # per route, the labels (indices) it stands for
    prompts: tuple[str, ...]  # the prompts that may be sent
    accuracy: tuple[tuple[float, ...], ...]  # labels x prompts
    temperature: float = 1.0
    read: float | None = None  # rule remap: the share of queries whose top route is their label's (None: posterior)

    def __post_init__(self) -> None:
        def bad(rule: str) -> ValueError:
            return ValueError(f"RouteTable: {rule}; rebuild it from the run's D0 (qpo export).")

        if not self.labels or len(self.shares) != len(self.labels):
            raise bad("labels and shares must be non-empty and the same length")
        if not all(isinstance(s, int | float) and math.isfinite(s) and s > 0 for s in self.shares):
            raise bad("every label share must be a number > 0")
        if not self.routes or len(self.route_labels) != len(self.routes):
            raise bad("routes and route_labels must be non-empty and the same length")
        covered = [i for group in self.route_labels for i in group]
        if sorted(covered) != list(range(len(self.labels))):
            raise bad("every label must stand under exactly one route")
        if not self.prompts or len(self.accuracy) != len(self.labels) or \
                any(len(row) != len(self.prompts) for row in self.accuracy):
            raise bad("accuracy must hold one row per label and one column per prompt")
        if not all(isinstance(a, int | float) and 0.0 <= a <= 1.0 for row in self.accuracy for a in row):
            raise bad("every accuracy must be a number in [0, 1]")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not (math.isfinite(t) and t > 0):
            raise bad(f"temperature must be a number > 0, not {t!r}")
        r = self.read
        if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r <= 1.0):
            raise bad(f"read must be None or a share in [0, 1], not {r!r}")

    def label_posterior(self, route_scores: np.ndarray) -> np.ndarray:
        """``p(label | query)`` for route scores of shape ``(..., len(routes))``: shape ``(..., len(labels))``."""
        scores = np.asarray(route_scores, dtype=np.float64)
        if scores.shape[-1] != len(self.routes):
            raise ValueError(f"RouteTable: expected {len(self.routes)} route scores per query, got {scores.shape[-1]}.")
        if self.read is not None:  # only the top route counts: its row of the misread model
            return self._misread_posterior()[np.argmax(scores, axis=-1)]
        shifted = scores / self.temperature
        shifted = shifted - shifted.max(axis=-1, keepdims=True)
        route_p = np.exp(shifted)
        route_p /= route_p.sum(axis=-1, keepdims=True)
        shares = np.asarray(self.shares, dtype=np.float64)
        split = np.zeros((len(self.routes), len(self.labels)))  # route -> its labels, by share
        for r, group in enumerate(self.route_labels):
            split[r, list(group)] = shares[list(group)] / shares[list(group)].sum()
        return route_p @ split

    def _misread_posterior(self) -> np.ndarray:
        """``p(label | top route)`` under ``read`` (routes x labels): a label's queries go to its own route a share
        ``read`` of the time and to each other label's route in proportion to that label's share of the rest."""
        read = float(self.read if self.read is not None else 1.0)
        shares = np.asarray(self.shares, dtype=np.float64) / sum(self.shares)
        n = len(self.labels)
        rest = 1.0 - shares
        send = np.zeros((n, n))  # gold label -> the label whose route it is sent
        for gold in range(n):
            if rest[gold] <= 0:  # one label: always its own route
                send[gold, gold] = 1.0
                continue
            send[gold] = (1.0 - read) * shares / rest[gold]
            send[gold, gold] = read
        to_route = np.zeros((n, len(self.routes)))
        for r, group in enumerate(self.route_labels):
            to_route[:, r] = send[:, list(group)].sum(axis=1)
        joint = shares[:, None] * to_route  # labels x routes
        mass = joint.sum(axis=0)
        return (joint / np.where(mass > 0, mass, 1.0)).T

    def expected(self, route_scores: np.ndarray) -> np.ndarray:
        """Each prompt's expected accuracy for each query: shape ``(..., len(prompts))``."""
        return self.label_posterior(route_scores) @ np.asarray(self.accuracy, dtype=np.float64)

    def pick(self, route_scores: np.ndarray) -> np.ndarray:
        """The index (into ``prompts``) of the prompt with the most expected right answers (the first of ties; with
        ``read`` set, a route's own prompt where it ties)."""
        expected = self.expected(route_scores)
        best = np.argmax(expected, axis=-1)
        if self.read is None:
            return best
        column = {prompt: j for j, prompt in enumerate(self.prompts)}
        own = np.array([column.get(route, -1) for route in self.routes])[np.argmax(route_scores, axis=-1)]
        own_value = np.take_along_axis(expected, np.maximum(own, 0)[..., None], axis=-1)[..., 0]
        keep = (own >= 0) & (own_value >= np.max(expected, axis=-1) - 1e-12)
        return np.where(keep, own, best)

    def sent_by_route(self) -> dict[str, str]:
        """``route -> prompt``: what the table sends when that route scores far above the others (under ``read``,
        when it scores highest at all: rule remap's fixed map)."""
        top = np.where(np.eye(len(self.routes), dtype=bool), 0.0, -1e9)
        return {route: self.prompts[i] for route, i in zip(self.routes, self.pick(top).tolist(), strict=True)}

    def fit_temperature(self, route_scores: np.ndarray, gold: Sequence[int],
                        grid: Sequence[float] = TEMPERATURE_GRID) -> RouteTable:
        """A copy with the temperature from ``grid`` under which the route scores give the gold labels (indices
        into ``labels``) the most likelihood: calibrated on labelled queries, with no target call."""
        scores = np.asarray(route_scores, dtype=np.float64)
        if scores.ndim != 2 or len(scores) != len(gold) or not len(gold):
            raise ValueError(f"fit_temperature needs one row of route scores per gold label; got {scores.shape} "
                             f"scores and {len(gold)} labels.")
        rows = np.arange(len(gold))

        def loglik(t: float) -> float:
            posterior = replace(self, temperature=t).label_posterior(scores)
            return float(np.log(np.maximum(posterior[rows, list(gold)], 1e-12)).mean())

        return replace(self, temperature=max(grid, key=loglik))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "shares": list(self.shares), "routes": list(self.routes),
                "route_labels": [list(g) for g in self.route_labels], "prompts": list(self.prompts),
                "accuracy": [list(row) for row in self.accuracy], "temperature": self.temperature,
                **({"read": self.read} if self.read is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouteTable:
        known = {"labels", "shares", "routes", "route_labels", "prompts", "accuracy", "temperature", "read"}
        if not isinstance(data, Mapping) or set(data) - known or not {"labels", "routes", "prompts"} <= set(data):
            raise ValueError(f"RouteTable: expected an object with fields {sorted(known)}; got {brief_repr(data)}.")
        try:
            return cls(labels=tuple(map(str, data["labels"])), shares=tuple(data["shares"]),
                       routes=tuple(map(str, data["routes"])),
                       route_labels=tuple(tuple(int(i) for i in g) for g in data["route_labels"]),
                       prompts=tuple(map(str, data["prompts"])),
                       accuracy=tuple(tuple(row) for row in data["accuracy"]),
                       temperature=data.get("temperature", 1.0), read=data.get("read"))
        except (KeyError, TypeError) as error:
            raise ValueError(f"RouteTable: malformed field ({error}); rebuild it from the run's D0 (qpo export).") \
                from error
