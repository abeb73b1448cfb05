"""qpo_middleware.stats: hand-worked values, seeded determinism, empty inputs, and the committed reports' numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qpo_middleware.stats import bootstrap_ci, paired_bootstrap_ci, percentiles, quantile, summary

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_quantile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # unsorted on purpose
    # index = round(q * (n - 1)) into the sorted sample, clamped; Python rounds halves to even.
    assert [quantile(values, q) for q in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0)] == [1.0, 1.0, 2.0, 3.0, 5.0, 5.0]
    assert quantile(values, 0.375) == 3.0  # 1.5 -> 2
    assert quantile(values, 0.625) == 3.0  # 2.5 -> 2
    assert quantile(values, -1.0) == 1.0 and quantile(values, 2.0) == 5.0
    assert quantile([7.0], 0.3) == 7.0
    assert quantile([], 0.5) == float("-inf")  # nothing can be below an empty floor


def test_summary() -> None:
    assert summary([4.0, 1.0, 3.0, 2.0, 5.0]) == {"n": 5, "mean": 3.0, "median": 3.0, "p10": 1.0, "p90": 5.0,
                                                  "min": 1.0, "max": 5.0}
    assert summary([2.0, 4.0]) == {"n": 2, "mean": 3.0, "median": 2.0, "p10": 2.0, "p90": 4.0, "min": 2.0, "max": 4.0}
    assert summary([]) == {"n": 0, "mean": None, "median": None, "p10": None, "p90": None, "min": None, "max": None}


def test_percentiles_interpolate_linearly() -> None:
    result = percentiles([4.0, 1.0, 3.0, 2.0])
    assert result["n"] == 4 and result["mean"] == 2.5 and result["min"] == 1.0
    # rank p * (n - 1) between the sorted values: 1.5 -> 2.5, 2.85 -> 3.85, 2.97 -> 3.97
    assert result["p50"] == pytest.approx(2.5) and result["p95"] == pytest.approx(3.85)
    assert result["p99"] == pytest.approx(3.97)
    assert percentiles([10.0]) == {"n": 1, "p50": 10.0, "p95": 10.0, "p99": 10.0, "mean": 10.0, "min": 10.0}


def reference_interval(values: list[int], samples: int, seed: int) -> tuple[float, float]:
    """The percentile bootstrap written out: ``samples`` resampled means, the 2.5% and 97.5% order statistics."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(samples))
    return means[int(0.025 * samples)], means[min(samples - 1, int(0.975 * samples))]


def test_bootstrap_ci() -> None:
    assert bootstrap_ci([True] * 7) == (1.0, 1.0) and bootstrap_ci([False] * 3) == (0.0, 0.0)
    assert bootstrap_ci([]) == (0.0, 0.0)
    hits = [True, False, True, True, False, True, False, True, True, True]
    low, high = bootstrap_ci(hits, samples=400, seed=3)
    assert (low, high) == reference_interval([int(h) for h in hits], 400, 3)
    assert 0.0 <= low <= 0.7 <= high <= 1.0
    assert bootstrap_ci(hits, samples=400, seed=3) == (low, high)  # seeded: the same interval every time
    one = bootstrap_ci(hits, samples=1)  # one resample: both bounds are its mean
    assert one[0] == one[1]
    wider = bootstrap_ci(hits, samples=2000, seed=0, level=0.99)
    narrower = bootstrap_ci(hits, samples=2000, seed=0, level=0.5)
    assert wider[0] <= narrower[0] <= narrower[1] <= wider[1]


def test_paired_bootstrap_ci() -> None:
    # Queries where either side failed (None) are left out: 3 pairs, differences +1, 0, 0.
    diff, low, high, n = paired_bootstrap_ci([True, True, False, None], [False, True, False, True], samples=500)
    assert n == 3 and diff == pytest.approx(1 / 3) and low <= diff <= high
    assert (low, high) == reference_interval([1, 0, 0], 500, 0)
    assert paired_bootstrap_ci([True] * 4, [False] * 4) == (1.0, 1.0, 1.0, 4)
    assert paired_bootstrap_ci([True, False], [True, False]) == (0.0, 0.0, 0.0, 2)
    assert paired_bootstrap_ci([], []) == (0.0, 0.0, 0.0, 0)
    assert paired_bootstrap_ci([None], [True]) == (0.0, 0.0, 0.0, 0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([True, False], [True])


@pytest.mark.parametrize("folder", ["quality-cpu", "quality-cpu-seed1", "quality-gpu"])
def test_the_committed_reports_numbers(folder: str) -> None:
    """Every interval, gap and reward summary in a committed results.json comes out of these functions."""
    payload = json.loads((RESULTS / folder / "results.json").read_text(encoding="utf-8"))
    bench = payload["config"]["benchmark"]
    samples, seed = bench["bootstrap_samples"], bench["seed"]
    for task in payload["tasks"].values():
        hits = {name: [None if h is None else bool(h) for h in values]
                for name, values in task["per_query"]["hits"].items()}
        for method in task["methods"]:
            valid = [h for h in hits[method["method"]] if h is not None]
            assert bootstrap_ci(valid, samples=samples, seed=seed) == (method["ci_low"], method["ci_high"])
        for gap in task["gaps"]:
            diff, low, high, n = paired_bootstrap_ci(hits[gap["method"]], hits[gap["versus"]], samples=samples,
                                                     seed=seed)
            assert (diff, low, high, n) == (gap["difference"], gap["ci_low"], gap["ci_high"], gap["n"])
        assert summary(task["d0"]["rewards"]) == task["d0"]["reward_summary"]
        for row in task["loops"]:
            assert summary(row["new_rewards"]) == row["new_reward_summary"]
