"""A small run with hand-made D0 verdicts, for tests of the preference recipes on tiny models (a tiny random
target answers alike whatever the prompt, so its own D0 has no query with a right and a wrong prompt).

A module (not a conftest) so several test files can use it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from qpo_middleware.training.collect import collect
from qpo_middleware.training.config import CollectConfig
from qpo_middleware.training.dataset import OfflineDataset


def small_run(path: Path, model: str, collect_queries: int = 6) -> None:
    """8 train queries x (4 pool prompts + none) of the SST-2 sample scored by ``model``; 6 collect, 4 test."""
    collect(CollectConfig(task="sst2_sample", target=model, queries=8, collect_queries=collect_queries,
                          test_queries=4, prompts="4", chunk_size=8, batch_size=8), path)


def handmade_d0(path: Path, model: str, collect_queries: int = 6) -> dict[str, Any]:
    """:func:`small_run` whose D0 holds hand-made verdicts on its real queries: "Say positive." answers positive on
    every query (it steers), "Decide." answers the gold label (right everywhere), "Guess." the other label (wrong
    everywhere; its answers follow the golds' mix, so it does not steer). Returns D0's first record per query."""
    small_run(path, model, collect_queries)
    dataset = OfflineDataset(path)
    first = {r.query_id: r for r in dataset.loop(0)}
    assert {str(r.label) for r in first.values()} == {"negative", "positive"}
    other = {"negative": "positive", "positive": "negative"}
    answers = {"Say positive.": lambda gold: "positive", "Decide.": lambda gold: gold, "Guess.": lambda gold: other[gold]}
    dataset.path.unlink()
    OfflineDataset(path).append([replace(r, prompt=prompt, prompt_source="pool:x", prediction=answer(str(r.label)),
                                         correct=answer(str(r.label)) == str(r.label))
                                 for r in first.values() for prompt, answer in answers.items()])
    return first
