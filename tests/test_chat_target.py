"""Black-box LangChain chat-model targets: parsing, retries with backoff, failures kept apart, cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")

from qpo_middleware.training.chat_target import ChatModelTarget  # noqa: E402
from qpo_middleware.training.collect import collect  # noqa: E402
from qpo_middleware.training.config import CollectConfig  # noqa: E402
from qpo_middleware.training.dataset import OfflineDataset  # noqa: E402
from qpo_middleware.training.targets import Pair, ScoreCache, make_target  # noqa: E402
from qpo_middleware.training.tasks import Example, get_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _flaky_chat import FlakyChat  # noqa: E402

TASK = get_task("sst2_sample")


def pairs() -> list[Pair]:
    return [
        Pair(Example("a", "two words", label=1), "Classify."),
        Pair(Example("b", "three words here", label=1), "Classify."),
        Pair(Example("c", "ALWAYS_FAIL now", label=0), "Classify."),
    ]


def test_retries_then_records_failures_apart(tmp_path: Path) -> None:
    model = FlakyChat(fail_first=2)
    target = ChatModelTarget(model, id="chat:flaky", max_retries=3, backoff_seconds=0.001,
                             cache=ScoreCache(tmp_path / "c.sqlite"))
    scores = target.score(TASK, pairs())
    assert [s.prediction for s in scores[:2]] == ["positive", "negative"]
    assert [s.correct for s in scores[:2]] == [True, False]
    assert scores[2].failed and "simulated provider timeout" in scores[2].error
    assert not scores[2].correct
    assert model.calls["Classify.\n\ntwo words"] == 3  # two failures, then success
    # Second run: successes come from the cache; the failed pair is tried again (not cached).
    again = target.score(TASK, pairs())
    assert again[0].cached and again[1].cached and not again[2].cached
    assert model.calls["Classify.\n\ntwo words"] == 3


def test_collect_with_a_chat_target_named_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    target = make_target("_flaky_chat:make", cache_path=tmp_path / "scores.sqlite")
    assert isinstance(target, ChatModelTarget) and target.id == "chat:_flaky_chat:make"
    summary = collect(CollectConfig(task="sst2_sample", target="_flaky_chat:make", queries=5, collect_queries=2,
                                    test_queries=2, prompts="2"), tmp_path)
    assert summary.dataset_records == 15 and summary.failed_pairs == 0
    records = OfflineDataset(tmp_path).records
    assert all(r.target == "chat:_flaky_chat:make" and r.gold_nll is None for r in records)


def test_bad_factory_names_the_format() -> None:
    with pytest.raises(ValueError, match="module:factory"):
        ChatModelTarget("no_colon")
    with pytest.raises(ValueError, match="Cannot import"):
        ChatModelTarget("no_such_module_xyz:make")


def test_chat_target_call_settings_come_from_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qpo_middleware.training.chat_target import ChatModelTarget
    from qpo_middleware.training.run import Run

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = CollectConfig(task="sst2_sample", target="_flaky_chat:make", queries=2, collect_queries=0,
                           test_queries=0, prompts="1", target_retries=0, target_timeout=2.5, target_concurrency=3)
    target = Run.open(tmp_path, config).make_target()
    assert isinstance(target, ChatModelTarget)
    assert (target.max_retries, target.timeout_seconds, target.max_concurrency) == (0, 2.5, 3)
    # A resume may call the target differently: those settings are not part of the run's identity.
    resumed = Run.open(tmp_path, CollectConfig(**{**config.to_dict(), "target_retries": 5})).make_target()
    assert isinstance(resumed, ChatModelTarget) and resumed.max_retries == 5
    with pytest.raises(ValueError, match="target_timeout"):
        CollectConfig(target_timeout=0)
