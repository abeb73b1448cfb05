"""A Prompt-OIRL-style query-dependent *selector*: the baseline that picks, not writes, a prompt per query.

An offline reward model is fit on the initial dataset D0 (every pool prompt scored
on the train queries) to predict ``P(correct | query, prompt)``; at inference it
scores every pool prompt for the query and returns the best one. Prompt-OIRL used
gradient-boosted trees on 1536-d embeddings; this stand-in is deliberately small,
deterministic and torch-free (numpy only):

* the query is a hashed bag of lowercase words, word bigrams and character 3/4-grams
  (signed feature hashing, ``log1p`` counts, L2-normalised);
* each pool prompt (by exact text) gets a bias (its one-hot) and its own weight vector
  on the query features, shrunk towards a weight vector shared by all prompts::

      logit(q, p) = b_p + x(q) . (w + V_p)

  fit jointly by full-batch Adam on the mean logistic loss with L2 penalties
  (``l2_shared`` on ``w``, ``l2_prompt`` on every ``V_p``). Only the per-prompt part
  ``b_p + x . V_p`` changes which prompt wins; the shared part calibrates probabilities.

A prompt that is not in the pool (e.g. a prompt the QPO policy wrote) gets the
parameters of the pool prompts averaged with weights ``softmax(cos(prompt, p) / tau)``
over the prompts' hashed character n-grams: it is scored like the pool prompts it
resembles.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .dataset import Record

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", flags=re.UNICODE)


@dataclass(frozen=True)
class SelectorConfig:
    """Settings of the selector's features and fit (defaults work from tens to thousands of queries)."""

    dim: int = 4096  # hashed feature dimensions of a query
    char_ngrams: tuple[int, ...] = (3, 4)
    word_bigrams: bool = True
    l2_shared: float = 1e-3
    l2_prompt: float = 1e-3  # used as is when cross-validation is off (cv_folds < 2)
    l2_prompt_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    cv_folds: int = 3  # pick l2_prompt from the grid by held-out log loss over query folds
    steps: int = 300
    learning_rate: float = 0.05
    prompt_similarity_temperature: float = 0.05

    def __post_init__(self) -> None:
        if self.dim < 16 or self.steps < 1 or self.learning_rate <= 0:
            raise ValueError("SelectorConfig: dim must be >= 16, steps >= 1 and learning_rate > 0.")
        if self.l2_shared < 0 or self.l2_prompt < 0 or self.prompt_similarity_temperature <= 0:
            raise ValueError("SelectorConfig: L2 weights must be >= 0 and the temperature > 0.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- features


def _hash(token: str) -> int:
    return zlib.crc32(token.encode("utf-8"))


def text_features(texts: Sequence[str], dim: int, char_ngrams: Sequence[int] = (3, 4),
                  word_bigrams: bool = True) -> np.ndarray:
    """Signed hashed bag of words (+ bigrams) and character n-grams, ``log1p`` counts, rows L2-normalised.

    Deterministic across processes (CRC-32, not Python's salted ``hash``). An empty text is a zero row.
    """
    out = np.zeros((len(texts), dim), dtype=np.float64)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        tokens = [f"w:{w}" for w in words]
        if word_bigrams:
            tokens += [f"b:{a} {b}" for a, b in zip(words, words[1:], strict=False)]
        padded = f" {' '.join(words)} "
        for n in char_ngrams:
            tokens += [f"c{n}:{padded[i : i + n]}" for i in range(max(0, len(padded) - n + 1))]
        for token in tokens:
            h = _hash(token)
            out[row, h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    out = np.sign(out) * np.log1p(np.abs(out))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for any z


def _log_loss(prob: np.ndarray, hits: np.ndarray, counts: np.ndarray) -> float:
    clipped = np.clip(prob, 1e-12, 1 - 1e-12)
    total = -(hits * np.log(clipped) + (counts - hits) * np.log(1 - clipped)).sum()
    return float(total / max(counts.sum(), 1.0))


def _logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    # einsum (numpy's own loops, not BLAS): at these sizes it is faster than a threaded BLAS on a busy
    # machine, and single-threaded sums make the fit bit-for-bit reproducible.
    weights = params["shared"][None, :] + params["per_prompt"]
    return params["bias"][None, :] + np.einsum("qd,pd->qp", x, weights)  # (Q, P)


def _fit_arrays(x: np.ndarray, hits: np.ndarray, counts: np.ndarray, config: SelectorConfig,
                l2_prompt: float) -> tuple[dict[str, np.ndarray], float]:
    """Full-batch Adam on the mean logistic loss + L2; returns the parameters and the final train loss."""
    n = max(counts.sum(), 1.0)
    n_p = hits.shape[1]
    accuracy = (hits.sum(0) + 0.5) / (counts.sum(0) + 1.0)  # smoothed, never 0 or 1
    params = {
        "bias": np.log(accuracy / (1.0 - accuracy)),
        "shared": np.zeros(x.shape[1]),
        "per_prompt": np.zeros((n_p, x.shape[1])),
    }
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, config.steps + 1):
        prob = _sigmoid(_logits(params, x))
        residual = (counts * prob - hits) / n  # d(mean loss)/d(logit)
        grad_v = residual.T @ x  # (P, D), through BLAS: einsum here loops in numpy, minutes on thousands of queries
        grads = {
            "bias": residual.sum(0),
            "shared": grad_v.sum(0) + config.l2_shared * params["shared"],
            "per_prompt": grad_v + l2_prompt * params["per_prompt"],
        }
        for key, grad in grads.items():
            m, v = moments[key]
            m *= beta1
            m += (1 - beta1) * grad
            v *= beta2
            v += (1 - beta2) * grad * grad
            params[key] -= config.learning_rate * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
    return params, _log_loss(_sigmoid(_logits(params, x)), hits, counts)


def _cross_validate(x: np.ndarray, hits: np.ndarray, counts: np.ndarray, config: SelectorConfig) -> float:
    """The ``l2_prompt`` of the grid with the lowest held-out log loss (folds: query index mod k)."""
    folds = np.arange(x.shape[0]) % config.cv_folds
    losses = []
    for l2 in config.l2_prompt_grid:
        total = 0.0
        for fold in range(config.cv_folds):
            train, held = folds != fold, folds == fold
            params, _ = _fit_arrays(x[train], hits[train], counts[train], config, l2)
            prob = _sigmoid(_logits(params, x[held]))
            total += _log_loss(prob, hits[held], counts[held]) * counts[held].sum()
        losses.append(total / max(counts.sum(), 1.0))
    best = float(config.l2_prompt_grid[int(np.argmin(losses))])
    logger.debug("selector CV: l2_prompt %s -> held-out log loss %s; chose %g",
                 list(config.l2_prompt_grid), [round(v, 4) for v in losses], best)
    return best


def outcome_table(records: Iterable[Record]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Scored records as ``(query texts, prompts, hits, counts)``: ``hits[q, p]`` of ``counts[q, p]`` verdicts right.

    Queries are keyed by id (else text) in first-seen order, prompts by exact text in first-seen order.
    """
    rows = list(records)
    if not rows:
        raise ValueError("Selector.fit needs at least one record (the run's D0: `qpo collect` first).")
    queries: dict[str, int] = {}
    query_texts: list[str] = []
    prompts: dict[str, int] = {}
    for record in rows:
        key = record.query_id or record.query
        if key not in queries:
            queries[key] = len(query_texts)
            query_texts.append(record.query)
        prompts.setdefault(record.prompt, len(prompts))
    hits = np.zeros((len(query_texts), len(prompts)))
    counts = np.zeros((len(query_texts), len(prompts)))
    for record in rows:
        q, p = queries[record.query_id or record.query], prompts[record.prompt]
        counts[q, p] += 1.0
        hits[q, p] += float(record.correct)
    return query_texts, list(prompts), hits, counts


def fit_outcome_model(x: np.ndarray, hits: np.ndarray, counts: np.ndarray,
                      config: SelectorConfig) -> tuple[dict[str, np.ndarray], float, float]:
    """The selector's ``logit(q, p) = b_p + x(q) . (w + V_p)`` fit on any query features ``x`` (Q, D).

    ``l2_prompt`` comes from the config's grid by cross-validation when the config asks for it and there are
    enough queries, else ``config.l2_prompt``. Returns ``(params, l2_prompt, final train loss)``; score new
    queries with :func:`outcome_logits`.
    """
    l2_prompt = config.l2_prompt
    if config.cv_folds >= 2 and len(config.l2_prompt_grid) > 1 and x.shape[0] >= 2 * config.cv_folds:
        l2_prompt = _cross_validate(x, hits, counts, config)
    params, loss = _fit_arrays(x, hits, counts, config, l2_prompt)
    return params, l2_prompt, loss


def outcome_logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """(queries, prompts) logits of a :func:`fit_outcome_model` fit; its argmax per row is the prompt it picks."""
    return _logits(params, x)


# ---------------------------------------------------------------------------- the model


class Selector:
    """Predicts ``P(correct | query, prompt)`` and selects the best pool prompt per query.

    >>> selector = Selector.fit(run.dataset().loop(0))      # doctest: +SKIP
    >>> selector.select("a gorgeous , witty movie .")      # doctest: +SKIP
    """

    def __init__(self, prompts: Sequence[str], bias: np.ndarray, shared: np.ndarray, per_prompt: np.ndarray,
                 config: SelectorConfig, train_accuracy: Sequence[float], final_loss: float) -> None:
        self.prompts = list(prompts)
        self.bias = bias  # (P,)
        self.shared = shared  # (D,)
        self.per_prompt = per_prompt  # (P, D)
        self.config = config
        self.train_accuracy = list(train_accuracy)
        self.final_loss = final_loss
        self._index = {p: i for i, p in enumerate(self.prompts)}
        self._prompt_features = self._prompt_vectors(self.prompts)

    # -- fit -------------------------------------------------------------------------------

    @classmethod
    def fit(cls, records: Iterable[Record], config: SelectorConfig | None = None) -> Selector:
        """Fit on scored (query, prompt, correct) records, usually D0 (loop 0) of a run."""
        config = config or SelectorConfig()
        query_texts, ordered, hits, counts = outcome_table(records)
        x = text_features(query_texts, config.dim, config.char_ngrams, config.word_bigrams)  # (Q, D)
        # Weights of features no train query has get no gradient and stay 0: fit on the active columns only.
        active = np.flatnonzero(np.abs(x).sum(axis=0) > 0)
        params, l2_prompt, loss = fit_outcome_model(np.ascontiguousarray(x[:, active]), hits, counts, config)
        n_p = len(ordered)
        shared = np.zeros(config.dim)
        shared[active] = params["shared"]
        per_prompt = np.zeros((n_p, config.dim))
        per_prompt[:, active] = params["per_prompt"]
        n = counts.sum()
        logger.info("selector: %d queries x %d prompts (%d observations), l2_prompt %g, final train loss %.4f",
                    len(query_texts), n_p, int(n), l2_prompt, loss)
        config = replace(config, l2_prompt=l2_prompt)
        return cls(ordered, params["bias"], shared, per_prompt, config,
                   train_accuracy=list(hits.sum(0) / np.maximum(counts.sum(0), 1.0)), final_loss=loss)

    # -- inference --------------------------------------------------------------------------

    def query_features(self, queries: Sequence[str]) -> np.ndarray:
        c = self.config
        return text_features(queries, c.dim, c.char_ngrams, c.word_bigrams)

    def _prompt_vectors(self, prompts: Sequence[str]) -> np.ndarray:
        return text_features(prompts, 1024, (2, 3, 4), word_bigrams=True)

    def _params_for(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(bias, per-prompt weights) for any prompts: a pool prompt's own, else a similarity-weighted mix."""
        bias = np.empty(len(prompts))
        weights = np.empty((len(prompts), self.config.dim))
        unseen = [i for i, p in enumerate(prompts) if p not in self._index]
        for i, prompt in enumerate(prompts):
            if prompt in self._index:
                j = self._index[prompt]
                bias[i], weights[i] = self.bias[j], self.per_prompt[j]
        if unseen:
            similarity = self._prompt_vectors([prompts[i] for i in unseen]) @ self._prompt_features.T  # cosine
            scaled = similarity / self.config.prompt_similarity_temperature
            mix = np.exp(scaled - scaled.max(axis=1, keepdims=True))
            mix /= mix.sum(axis=1, keepdims=True)
            bias[unseen] = mix @ self.bias
            weights[unseen] = mix @ self.per_prompt
        return bias, weights

    def predict(self, query: str, prompts: Sequence[str]) -> list[float]:
        """``P(correct)`` of each prompt for ``query``; prompts outside the pool are scored by similarity."""
        if not prompts:
            return []
        x = self.query_features([query])[0]
        bias, weights = self._params_for(prompts)
        return _sigmoid(bias + weights @ x + x @ self.shared).tolist()

    def pool_scores(self, queries: Sequence[str]) -> np.ndarray:
        """(queries, pool prompts) predicted ``P(correct)``."""
        x = self.query_features(queries)
        return _sigmoid(self.bias[None, :] + x @ (self.shared[None, :] + self.per_prompt).T)

    def select(self, query: str) -> str:
        """The pool prompt with the highest predicted ``P(correct)`` for ``query`` (ties: earliest in the pool)."""
        return self.select_batch([query])[0]

    def select_batch(self, queries: Sequence[str]) -> list[str]:
        if not queries:
            return []
        return [self.prompts[int(i)] for i in np.argmax(self.pool_scores(queries), axis=1)]

    def best_of(self, query: str, candidates: Sequence[str]) -> tuple[str, float]:
        """The candidate prompt with the highest predicted ``P(correct)`` (ties: the first), with that value."""
        if not candidates:
            raise ValueError("best_of needs at least one candidate prompt.")
        scores = self.predict(query, candidates)
        best = int(np.argmax(scores))
        return candidates[best], scores[best]
