"""The leakage check ``qpo eval`` and the quality benchmark report beside every per-query method."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from qpo_middleware.training.evaluate import flagged, leakage


def test_leakage_replaces_flagged_queries_with_the_best_pool_verdict() -> None:
    prompts = ["Answer: positive or negative?", "The answer is positive.", "Be brief.", "Be brief.", "unseen"]
    hits = [True, True, True, False, None]  # the last query's target call failed
    fallback = [None, False, True, True, True]  # the best pool prompt's verdicts, read only where flagged
    check = leakage(prompts, hits, fallback, ("negative", "positive"), {"Be brief.": "negative"},
                    {"Answer: positive or negative?", "The answer is positive.", "Be brief."},
                    leaning={"Be brief.": "negative", "The answer is positive.": "positive"})
    assert check.label_leak_share == pytest.approx(0.2)  # only the second names exactly one label
    assert check.accuracy_without_leaks == pytest.approx(2 / 4)  # T, F (fallback), T, F; the failed one skipped
    assert check.steered_share == pytest.approx(0.4)
    assert check.steering_checked_share == pytest.approx(0.8)  # D0 never scored "unseen"
    assert check.accuracy_without_steering == pytest.approx(1.0)  # T, T, T (fallback), T (fallback)
    assert check.leaning_share == pytest.approx(0.6)
    assert check.accuracy_without_leaning == pytest.approx(3 / 4)  # T, F (fallback), T, T (fallback)
    assert set(asdict(check)) == {"label_leak_share", "accuracy_without_leaks", "steered_share",
                                  "steering_checked_share", "accuracy_without_steering", "leaning_share",
                                  "accuracy_without_leaning"}
    # The queries the check may replace, so the only ones the best pool prompt is scored on for it.
    assert flagged(prompts, ("negative", "positive"), {"Be brief.": "negative"}) == [1, 2, 3]


def test_leakage_refuses_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="2 prompts, 1 verdicts and 2 fallbacks"):
        leakage(["a", "b"], [True], [True, False], ("x", "y"), {}, set(), leaning={})
