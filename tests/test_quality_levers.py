"""The quality levers of QPO (issue: per-query prompts that beat the best task-level prompt), on real parts."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpo_middleware.training.collect import collect
from qpo_middleware.training.config import CollectConfig
from qpo_middleware.training.hf_target import HFTarget
from qpo_middleware.training.policy import RewardBuckets, top_bucket_coverage
from qpo_middleware.training.run import Run
from qpo_middleware.training.targets import ScoreCache

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def sst2_d0(tmp_path_factory: pytest.TempPathFactory, real_data: Path, smollm2_target: HFTarget) -> list:
    """A real D0: SmolLM2 on 60 SST-2 train sentences x 8 pool prompts + no instruction."""
    path = tmp_path_factory.mktemp("sst2-d0")
    target = HFTarget(batch_size=24, cache=ScoreCache(path / "scores.sqlite"))
    target._lm, target._tok = smollm2_target._lm, smollm2_target._tok  # share the loaded weights
    collect(CollectConfig(task="sst2", queries=60, collect_queries=0, test_queries=0, prompts="8",
                          data_dir=str(real_data)), path, target=target)
    return Run.open(path).dataset().loop(0)


def test_query_rank_top_bucket_holds_a_correct_prompt_for_nearly_every_query(sst2_d0: list) -> None:
    queries_with_correct = {r.query_id for r in sst2_d0 if r.correct}
    assert len(queries_with_correct) >= 40
    ranked = top_bucket_coverage(sst2_d0, RewardBuckets.for_records(sst2_d0, 10, "query_rank"))
    absolute = top_bucket_coverage(sst2_d0, RewardBuckets.for_records(sst2_d0, 10, "absolute"))
    assert ranked is not None and absolute is not None
    assert ranked >= 0.9, (ranked, absolute)
    # The paper's reward puts the best average prompts on top: many queries never see their right prompt there.
    assert absolute < ranked, (ranked, absolute)
