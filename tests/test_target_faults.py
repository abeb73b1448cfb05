"""Target faults: a LangChain chat-model target that times out, errors, hangs or answers garbage.

The provider is ``_faulty_chat.FaultyChat``, loaded as a `module:factory` target. On a
seeded 30% of calls it raises (TimeoutError, ConnectionError, HTTP 429), hangs past the
target's timeout, or replies garbage (empty, random code points, 120,000 characters, a word
that is no label); 5% of the inputs time out on every call while the faults last. Every
outcome is predicted from the seed (``FaultyChat.plan``), so the tests check exact counts:

* each pair is called until it gets a reply, at most ``max_retries + 1`` times, with the
  backoff between tries (``backoff_seconds``, doubling);
* pairs with no reply after the last try are counted as failed: not in the dataset, not
  cached, not counted as wrong;
* garbage replies are answers: scored as wrong (no prediction), cached, never a crash;
* a re-run calls only the failed pairs (the cached ones cost nothing), and once the faults
  stop it ends with the same records as a run that never saw a fault.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from qpo_middleware.training.chat_target import ChatModelTarget  # noqa: E402
from qpo_middleware.training.collect import collect  # noqa: E402
from qpo_middleware.training.config import CollectConfig  # noqa: E402
from qpo_middleware.training.dataset import OfflineDataset  # noqa: E402
from qpo_middleware.training.io import decode_line  # noqa: E402
from qpo_middleware.training.run import Run, RunPaths  # noqa: E402
from qpo_middleware.training.targets import Pair, ScoreCache, make_target  # noqa: E402
from qpo_middleware.training.tasks import Example, get_task, resolve_prompts  # noqa: E402

TESTS = Path(__file__).resolve().parent
SPEC = "_faulty_chat:make"
TASK = get_task("sst2_sample")
RETRIES = 3
BACKOFF = 0.02
TIMEOUT = 0.5  # the target gives up on a call after this; a "hang" lasts HANG
HANG = 3.0
FAULT_RATE, STICKY_RATE = 0.3, 0.05
CONFIG = dict(task="sst2_sample", target=SPEC, queries=40, collect_queries=2, test_queries=2, prompts="2")
PAIRS = 40 * 3  # 2 pool prompts + no instruction


@pytest.fixture(autouse=True)
def _faulty_chat_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def expected(model: Any, text: str, tries: int) -> tuple[list[str], str]:
    """The kinds of the calls the target will make for ``text``, and the outcome: ok, garbage or failed."""
    from _faulty_chat import ERRORS, GARBAGE, STICKY

    asked = model.asked(text)
    kinds: list[str] = []
    for n in range(asked + 1, asked + tries + 1):
        kinds.append(model.plan(text, n))
        if kinds[-1] not in (*ERRORS, STICKY):
            break
    last = kinds[-1]
    return kinds, ("failed" if last in (*ERRORS, STICKY) else "garbage" if last in GARBAGE else "ok")


def texts_by_key(target: ChatModelTarget, run: Path, config: CollectConfig) -> dict[str, tuple[str, str, int]]:
    """What the target sends for every pair of the run (the model's input) -> the pair's record key."""
    opened = Run.open(run, config)
    pairs = opened.pairs(opened.splits.train, resolve_prompts(opened.task, config.prompts, config.include_empty))
    out = {target._messages(opened.task, p)[-1][1]: (p.example.id, p.prompt, 0) for p in pairs}
    assert len(out) == len(pairs) == PAIRS
    return out


def dataset_records(run: Path) -> dict[tuple[str, str, int], Any]:
    lines = RunPaths(run).dataset.read_text(encoding="utf-8").splitlines()
    assert all(decode_line(line) is not None for line in lines)
    records = OfflineDataset(run).records
    assert len({r.key() for r in records}) == len(records) == len(lines), "duplicate records"
    return {r.key(): r for r in records}


def cached_count(run: Path) -> int:
    cache = ScoreCache(RunPaths(run).scores)
    try:
        return cache._db.execute("SELECT count(*) FROM scores").fetchone()[0]
    finally:
        cache.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faulty_target_retries_keeps_failures_apart_and_a_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    from _faulty_chat import ERRORS, GARBAGE, STICKY, FaultyChat

    monkeypatch.setenv("QPO_FAULT_SEED", str(seed))
    monkeypatch.setenv("QPO_FAULT_RATE", str(FAULT_RATE))
    monkeypatch.setenv("QPO_FAULT_STICKY", str(STICKY_RATE))
    monkeypatch.setenv("QPO_FAULT_HANG", str(HANG))
    config = CollectConfig(**CONFIG)

    # The same provider with no fault: what the dataset must end up as.
    ref = tmp_path / "ref"
    clean = ChatModelTarget(FaultyChat(faults=False), id=f"chat:{SPEC}", cache=ScoreCache(RunPaths(ref).scores))
    collect(config, ref, target=clean)
    reference = dataset_records(ref)
    assert len(reference) == PAIRS

    run = tmp_path / "run"
    target = make_target(SPEC, cache_path=RunPaths(run).scores)  # as `qpo collect --target _faulty_chat:make`
    assert isinstance(target, ChatModelTarget) and isinstance(target.model, FaultyChat)
    assert target.id == clean.id
    target.max_retries, target.backoff_seconds, target.timeout_seconds = RETRIES, BACKOFF, TIMEOUT
    model = target.model
    keys = texts_by_key(target, run, config)
    settled: set[str] = set()  # pairs with a cached verdict (a reply, garbage or not)
    figures = []
    for round_number, faults in enumerate((True, True, False), start=1):  # faults, faults again, recovered
        model.faults = faults
        todo = [text for text in keys if text not in settled]
        plans = {text: expected(model, text, RETRIES + 1) for text in todo}
        first_call = len(model.log)
        started = time.monotonic()
        summary = collect(config, run, target=target)
        seconds = time.monotonic() - started
        log = model.log[first_call:]

        # Only the pairs without a cached verdict are called, each exactly as often as the plan says:
        # again after every error (a hang past the timeout is one), never after a reply.
        calls = Counter(text for text, _, _ in log)
        assert set(calls) == set(todo)
        assert calls == {text: len(kinds) for text, (kinds, _) in plans.items()}
        for text in todo:
            assert [kind for other, kind, _ in log if other == text] == plans[text][0]
        # Backoff: try n+1 starts at least backoff * 2**(n-1) after try n started.
        for text in todo:
            times = [t for other, _, t in log if other == text]
            for n, (before, after) in enumerate(zip(times, times[1:], strict=False), start=1):
                assert after - before >= BACKOFF * 2 ** (n - 1) * 0.99, (text, n, after - before)

        failed = {text for text, (_, outcome) in plans.items() if outcome == "failed"}
        garbage = {text for text, (_, outcome) in plans.items() if outcome == "garbage"}
        assert summary.failed_pairs == len(failed)
        assert summary.cached_pairs == PAIRS - len(todo)
        assert summary.target_calls == len(todo)
        assert cached_count(run) == PAIRS - len(failed)  # failed pairs are never cached
        records = dataset_records(run)
        assert set(records) == {keys[text] for text in keys if text not in failed}  # failed: not in the dataset
        for text in todo:
            if text in failed:
                continue
            record, want = records[keys[text]], reference[keys[text]]
            if text in garbage:  # an answer, and a wrong one
                assert record.correct is False and record.prediction is None
            else:
                assert (record.correct, record.prediction) == (want.correct, want.prediction)
        # A pair's accuracy counts replies only: failed pairs are neither right nor wrong.
        for stats in summary.prompts:
            assert stats.n == sum(1 for text in keys if text not in failed and keys[text][1] == stats.prompt)
        settled |= set(todo) - failed
        kinds = Counter(kind for _, kind, _ in log)
        figures.append(dict(round=round_number, faults=faults, pairs_called=len(todo), calls=len(log),
                            faulty_calls=sum(n for kind, n in kinds.items() if kind != "ok"),
                            kinds={k: kinds[k] for k in (*ERRORS, STICKY, *GARBAGE) if kinds[k]},
                            failed=len(failed), garbage=len(garbage), seconds=round(seconds, 2)))
        if round_number == 1:
            assert failed and garbage and kinds["hang"]  # the seeds exercise every path
            stale = {keys[text] for text in keys} - {keys[text] for text in failed}
    # Once the faults stop, a re-run completes the dataset: every pair, once.
    assert summary.failed_pairs == 0 and not failed
    assert set(records) == set(reference)
    # Records written while some pairs of their prompt had failed keep the prompt accuracy of that run
    # (append-only); measure how far it is from the final one.
    final = {s.prompt: s.accuracy for s in summary.prompts}
    drift = max(abs(records[key].prompt_mean_accuracy - final[key[1]]) for key in stale)
    for figure in figures:
        print(f"seed {seed}: {figure}")
    print(f"seed {seed}: largest prompt-accuracy drift of records written in round 1: {drift:.3f}")


@pytest.mark.parametrize("kind", ["empty", "unicode", "long", "wrong_label"])
def test_garbage_replies_are_wrong_answers_not_crashes(tmp_path: Path, kind: str) -> None:
    from _faulty_chat import FaultyChat

    model = FaultyChat(always=kind)
    target = ChatModelTarget(model, id="chat:garbage", backoff_seconds=BACKOFF, cache=ScoreCache(tmp_path / "c.sqlite"))
    pairs = [Pair(Example(str(i), f"review number {i} here", label=i % 2), "Classify.") for i in range(4)]
    scores = target.score(TASK, pairs)
    assert [(s.failed, s.correct, s.prediction) for s in scores] == [(False, False, None)] * 4
    assert len(model.log) == 4  # a reply is final: no retry
    again = target.score(TASK, pairs)
    assert all(s.cached for s in again) and len(model.log) == 4
    assert again[0].response == scores[0].response  # even lone surrogates round-trip through the cache


def test_timeout_gives_up_on_hung_calls() -> None:
    from _faulty_chat import FaultyChat

    model = FaultyChat(always="hang", hang_seconds=HANG)
    target = ChatModelTarget(model, id="chat:hang", max_retries=1, backoff_seconds=BACKOFF, timeout_seconds=0.2,
                             max_concurrency=4)
    pairs = [Pair(Example(str(i), f"review {i}", label=1), "Classify.") for i in range(8)]
    started = time.monotonic()
    scores = target.score(TASK, pairs)
    elapsed = time.monotonic() - started
    assert all(s.failed and "TimeoutError" in s.error for s in scores)
    assert len(model.log) == 16  # 8 pairs x 2 tries
    assert elapsed < HANG, elapsed  # 2 tries x 2 waves of 4 calls x 0.2 s, not the 3 s hang


def test_timeout_keeps_the_concurrency_bound_and_the_answers() -> None:
    from _faulty_chat import FaultyChat, good_answer

    model = FaultyChat(faults=False, latency=0.05)
    target = ChatModelTarget(model, id="chat:slow", timeout_seconds=5.0, max_concurrency=3)
    pairs = [Pair(Example(str(i), " ".join(["word"] * (i + 1)), label=1), "Classify.") for i in range(12)]
    scores = target.score(TASK, pairs)
    assert [s.prediction for s in scores] == [good_answer(p.example.query) for p in pairs]
    assert 2 <= model.max_active <= 3
