"""Statistics used by the benchmarks, ``qpo eval`` and the training loops: one home, numpy and stdlib only.

* :func:`quantile` — the nearest-rank quantile of a sample (the loops' reward floors, report summaries);
* :func:`percentiles` — p50/p95/p99/mean/min of latencies (linear interpolation, as numpy);
* :func:`summary` — n/mean/median/p10/p90/min/max of a sample (report tables);
* :func:`bootstrap_ci` — a percentile-bootstrap interval of an accuracy;
* :func:`paired_bootstrap_ci` — the same for the difference of two methods scored on the same queries.

Every bootstrap is seeded, so a report rebuilt from the same hits gives the same interval.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

import numpy as np


def quantile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile of ``values`` (an element of the sample); ``-inf`` when empty."""
    ordered = sorted(values)
    if not ordered:
        return float("-inf")
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, median, p10, p90, min and max of ``values`` (nearest-rank quantiles; ``None`` when empty)."""
    if not values:
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None, "min": None, "max": None}
    ordered = sorted(values)
    return {"n": len(ordered), "mean": statistics.fmean(ordered), "median": quantile(ordered, 0.5),
            "p10": quantile(ordered, 0.1), "p90": quantile(ordered, 0.9), "min": ordered[0], "max": ordered[-1]}


def percentiles(values_ms: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/min of a list of milliseconds (linear interpolation)."""
    array = np.asarray(values_ms, dtype=np.float64)
    return {
        "n": int(array.size),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "p99": float(np.percentile(array, 99)),
        "mean": float(array.mean()),
        "min": float(array.min()),
    }


def _bootstrap_means(values: Sequence[int], samples: int, seed: int, level: float) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    return means[int((1 - level) / 2 * samples)], means[min(samples - 1, int((1 + level) / 2 * samples))]


def bootstrap_ci(hits: Sequence[bool], *, samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``hits``; deterministic given ``seed``."""
    if not hits:
        return (0.0, 0.0)
    return _bootstrap_means([int(h) for h in hits], samples, seed, level)


def paired_bootstrap_ci(a: Sequence[bool | None], b: Sequence[bool | None], *, samples: int = 2000,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean of a - b, low, high, n) over queries where both were scored; percentile bootstrap, seeded."""
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not diffs:
        return (0.0, 0.0, 0.0, 0)
    low, high = _bootstrap_means(diffs, samples, seed, level)
    return (sum(diffs) / len(diffs), low, high, len(diffs))
