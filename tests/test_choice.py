"""Strategy 'choose': the runtime picks a library prompt by the policy's own score, as training scores it.

The tiny random policy (tests/_tiny.py) is exported with a library and offsets; the runtime's scores must
equal training's ``candidate_logps`` (torch) on the same checkpoint, and its pick the argmax of score - offset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _tiny import QUERIES

from qpo_middleware.bundle import BundleError
from qpo_middleware.library import LIBRARY_FILE, read_library

# Prompts of different lengths, one longer than the tiny policy's 12-token cap (its ids are cut, its text is not).
LIBRARY = {
    "Classify the sentiment of this review.": 5,
    "Is it positive or negative?": 3,
    "Answer with one word.": 2,
    "You are a careful film critic who reads every review twice before deciding whether the reviewer liked it.": 1,
    "Think.": 1,
    "": 4,  # no instruction: a choice too (EOS alone)
}
OFFSETS: dict[str, float] = {}  # each prompt's mean score over QUERIES (as training's are over its queries)


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _tiny import export_tiny

    texts = list(LIBRARY)
    OFFSETS.update(zip(texts, torch_scores(tiny, QUERIES, texts).mean(0).tolist(), strict=True))
    return export_tiny(tiny, tmp_path_factory.mktemp("choose") / "bundle", library=LIBRARY, offsets=OFFSETS,
                       generation={"strategy": "choose"})


def torch_scores(tiny, queries: list[str], prompts: list[str]) -> np.ndarray:
    from qpo_middleware.training.preference import candidate_logps

    return candidate_logps(tiny.model, tiny.tokenizer, tiny.policy, queries, prompts, (tiny.policy.top_bucket,))[0].numpy()


def test_choose_scores_equal_training_and_pick_the_best_offset_score(tiny, optimizer) -> None:
    texts = [e.text for e in optimizer._choices]
    assert sorted(texts) == sorted(LIBRARY) and optimizer.info()["strategy"] == "choose"
    expected = torch_scores(tiny, QUERIES, texts)
    offsets = np.array([OFFSETS[t] for t in texts])
    for q, query in enumerate(QUERIES):
        scored = dict(optimizer.scores(query))
        runtime = np.array([scored[t] for t in texts]) + offsets
        np.testing.assert_allclose(runtime, expected[q], atol=2e-3)
    results = optimizer.optimize_batch(QUERIES)
    picks = [texts[int(np.argmax(row - offsets))] for row in expected]
    assert [r.prompt for r in results] == picks
    assert len(set(picks)) > 1  # the offsets and the queries both matter on this random policy
    assert all(query in r.text for query, r in zip(QUERIES, results, strict=True))
    assert optimizer.stats()["choices"] >= len(QUERIES)


def test_offsets_change_the_pick_and_generate_still_writes(tiny, optimizer) -> None:
    texts = [e.text for e in optimizer._choices]
    plain = torch_scores(tiny, QUERIES[:1], texts)[0]
    # Without offsets the rule is the policy's likelihood: compare with the bundle's offset-adjusted pick.
    by_likelihood = texts[int(np.argmax(plain))]
    by_offset = optimizer.optimize(QUERIES[0]).prompt
    assert by_offset == texts[int(np.argmax(plain - np.array([OFFSETS[t] for t in texts])))]
    assert by_likelihood in LIBRARY
    written = optimizer.optimize(QUERIES[0], strategy="generate")
    assert written.tokens > 0 and written.status == "rewritten"
    with pytest.raises(BundleError, match="do_sample"):
        optimizer.optimize(QUERIES[0], do_sample=True)
    sampled = optimizer.optimize(QUERIES[0], strategy="generate", do_sample=True, seed=1)
    assert QUERIES[0] in sampled.text
    assert optimizer.optimize("   ").status == "skipped"


def test_choose_respects_the_latency_budget(optimizer) -> None:
    out = optimizer.optimize(QUERIES[2], latency_budget_ms=0.0, fail_open=True)
    assert out.status == "timeout" and out.prompt == ""


def test_a_library_without_offsets_chooses_by_likelihood_and_no_library_cannot_choose(tiny, tmp_path: Path) -> None:
    from _tiny import export_tiny

    from qpo_middleware import PromptOptimizer
    from qpo_middleware.training.export import ExportError

    plain = export_tiny(tiny, tmp_path / "plain", library=LIBRARY)
    optimizer = PromptOptimizer.from_bundle(plain)
    assert optimizer.info()["strategy"] == "generate" and not optimizer.info()["library"]["offsets"]
    texts = [e.text for e in optimizer._choices]
    expected = torch_scores(tiny, QUERIES, texts)
    chosen = optimizer.optimize_batch(QUERIES, strategy="choose")
    assert [r.prompt for r in chosen] == [texts[int(np.argmax(row))] for row in expected]

    # A prompt longer than the policy's prompt length is scored on its cut ids and comes back whole.
    long = max(LIBRARY, key=len)
    favoured = export_tiny(tiny, tmp_path / "long", library=LIBRARY,
                           offsets={text: -1e4 if text == long else 0.0 for text in LIBRARY})
    result = PromptOptimizer.from_bundle(favoured).optimize(QUERIES[1], strategy="choose")
    assert result.prompt == long and result.tokens == tiny.policy.prompt_max_tokens + 1
    blank = export_tiny(tiny, tmp_path / "blank", library=LIBRARY,
                        offsets={text: -1e4 if text == "" else 0.0 for text in LIBRARY})
    result = PromptOptimizer.from_bundle(blank).optimize(QUERIES[0], strategy="choose")
    assert result.prompt == "" and result.status == "rewritten" and result.tokens == 1
    assert result.text == PromptOptimizer.from_bundle(blank).template.render("", QUERIES[0]).text

    with pytest.raises(ExportError, match="library"):
        export_tiny(tiny, tmp_path / "none", library={}, generation={"strategy": "choose"})
    assert not (tmp_path / "none").exists()
    bare = PromptOptimizer.from_bundle(export_tiny(tiny, tmp_path / "bare", library={}))
    with pytest.raises(BundleError, match="has none; re-export it from a run directory"):
        bare.optimize(QUERIES[0], strategy="choose")
    # A hand-edited manifest asking for 'choose' without a library is refused at load, naming the fix.
    manifest = json.loads((tmp_path / "bare" / "qpo.json").read_text())
    manifest["generation"]["strategy"] = "choose"
    (tmp_path / "bare" / "qpo.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="qpo export --strategy choose"):
        PromptOptimizer.from_bundle(tmp_path / "bare")
    manifest["generation"]["strategy"] = "pick"
    (tmp_path / "bare" / "qpo.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="strategy"):
        PromptOptimizer.from_bundle(tmp_path / "bare")
    with pytest.raises(ExportError, match="no choice offset"):
        export_tiny(tiny, tmp_path / "partial", library=LIBRARY, offsets={"Think.": 0.0})
    assert not (tmp_path / "partial").exists()


def test_library_offsets_are_validated_and_version_1_still_reads(tmp_path: Path, bundle: Path) -> None:
    data = json.loads((bundle / LIBRARY_FILE).read_text())
    assert data["version"] == 3 and all("offset" in p for p in data["prompts"]) and "routes" not in data
    path = tmp_path / LIBRARY_FILE
    old = {**data, "version": 1, "prompts": [{k: v for k, v in p.items() if k != "offset"} for p in data["prompts"]]}
    path.write_text(json.dumps(old))
    assert all(e.offset is None for e in read_library(path, vocab_size=10**6, max_ids=13))
    for prompts, message in (
        ([{**data["prompts"][0], "offset": "x"}], "finite number"),
        ([{**data["prompts"][0], "offset": float("nan")}], "finite number"),
        ([data["prompts"][0], {k: v for k, v in data["prompts"][1].items() if k != "offset"}], "every prompt"),
    ):
        path.write_text(json.dumps({**data, "prompts": prompts}))
        with pytest.raises(BundleError, match=message):
            read_library(path, vocab_size=10**6, max_ids=13)
    path.write_text(json.dumps({**old, "prompts": [{**old["prompts"][0], "offset": 1.0}]}))
    with pytest.raises(BundleError, match="text, ids and count"):  # version 1 has no offsets
        read_library(path, vocab_size=10**6, max_ids=13)


def test_choose_through_the_micro_batcher_cache_and_async_calls(bundle: Path, optimizer) -> None:
    import asyncio

    from qpo_middleware import PromptOptimizer, RuntimeConfig

    expected = [r.prompt for r in optimizer.optimize_batch(QUERIES)]
    served = PromptOptimizer.from_bundle(bundle, config=RuntimeConfig(batch_window_ms=2, cache_size=8))
    try:
        results = asyncio.run(served.aoptimize_batch(QUERIES))
        assert [r.prompt for r in results] == expected
        assert served.stats()["batched_queries"] == len(QUERIES)
        again = served.optimize(QUERIES[0])
        assert again.status == "cached" and again.prompt == expected[0]
        # Another strategy per call bypasses the cache and the batcher (they serve the bundle's own).
        assert served.optimize(QUERIES[0], strategy="generate").status == "rewritten"
    finally:
        served.close()


def _table(**changes):
    from qpo_middleware.choice import RouteTable

    # Two labels of equal share. P is right on 88% of pos and 2% of neg, N the mirror image, G on 70% of both.
    fields = {"labels": ("pos", "neg"), "shares": (0.5, 0.5), "routes": ("P", "N"), "route_labels": ((0,), (1,)),
              "prompts": ("G", "N", "P"), "accuracy": ((0.70, 0.02, 0.88), (0.70, 0.88, 0.02))}
    return RouteTable(**{**fields, **changes})


def test_route_table_sends_the_specialist_only_when_the_read_is_sure() -> None:
    # p = p(pos | query) = sigmoid(score_P - score_N). P's expected accuracy 0.86 p + 0.02 beats G's 0.70 above
    # p = 0.791: at p = 0.8 the route P, at p = 0.75 the generalist G; N mirrors it.
    table = _table()
    sure, unsure = np.log(0.8 / 0.2), np.log(0.75 / 0.25)
    scores = np.array([[sure, 0.0], [unsure, 0.0], [0.0, sure], [0.0, unsure]])
    assert table.label_posterior(scores)[:, 0] == pytest.approx([0.8, 0.75, 0.2, 0.25])
    assert [table.prompts[i] for i in table.pick(scores)] == ["P", "G", "N", "G"]
    # A higher temperature makes every read less sure: the generalist everywhere.
    assert [table.prompts[i] for i in _table(temperature=4.0).pick(scores)] == ["G"] * 4
    with pytest.raises(ValueError, match="expected 2 route scores per query, got 3"):
        table.pick(np.zeros((1, 3)))


def test_a_shared_route_splits_its_labels_by_share() -> None:
    from qpo_middleware.choice import RouteTable

    # joy (0.3) and optimism (0.1) share route J; anger (0.6) has route A. A sure read of J is 75% joy.
    table = RouteTable(labels=("anger", "joy", "optimism"), shares=(0.6, 0.3, 0.1), routes=("A", "J"),
                       route_labels=((0,), (1, 2)), prompts=("A", "J", "O"),
                       accuracy=((0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.5, 0.9)))
    assert table.label_posterior(np.array([[0.0, 50.0]]))[0] == pytest.approx([0.0, 0.75, 0.25])
    # J: 0.75 * 0.8 + 0.25 * 0.5 = 0.725 against O: 0.75 * 0.1 + 0.25 * 0.9 = 0.3
    assert table.expected(np.array([[0.0, 50.0]]))[0] == pytest.approx([0.1, 0.725, 0.3])


def test_route_table_temperature_is_fit_on_labels_and_round_trips() -> None:
    from qpo_middleware.choice import RouteTable

    table = _table()
    scores = np.tile([4.0, 0.0], (10, 1))
    assert table.fit_temperature(scores, [0] * 10).temperature == 0.125  # always right: as sharp as the grid goes
    assert table.fit_temperature(scores, [0, 1] * 5).temperature == 64.0  # a coin: as flat as it goes
    # Right on 8 of 10: the likelihood is highest where sigmoid(4 / T) is nearest 0.8 (T = 2.9): T = 4 beats T = 2
    # (-0.513 against -0.527 per query).
    assert table.fit_temperature(scores, [0] * 8 + [1] * 2).temperature == 4.0
    with pytest.raises(ValueError, match="one row of route scores per gold label"):
        table.fit_temperature(scores, [0])
    fitted = table.fit_temperature(scores, [0] * 8 + [1] * 2)
    assert RouteTable.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted
    with pytest.raises(ValueError, match="every label must stand under exactly one route"):
        _table(route_labels=((0,), (0,)))
    with pytest.raises(ValueError, match="accuracy must be a number in"):
        _table(accuracy=((0.7, 0.02, 1.5), (0.7, 0.88, 0.02)))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        _table(temperature=0.0)
    with pytest.raises(ValueError, match="expected an object with fields"):
        RouteTable.from_dict({"labels": ["a"], "bogus": 1})


def test_a_route_table_bundle_scores_the_routes_and_sends_by_the_table(tiny, tmp_path: Path) -> None:
    """A label_route bundle: 'choose' scores only the table's routes (as training's candidate_logps does) and sends
    the prompt the table picks from those scores, which need not be a route; the table travels in library.json."""
    from dataclasses import replace

    from _tiny import export_tiny

    from qpo_middleware import PromptOptimizer
    from qpo_middleware.choice import RouteTable
    from qpo_middleware.library import load_library
    from qpo_middleware.training.export import ExportError

    routes = ["Classify the sentiment of this review.", "Is it positive or negative?"]
    # A generalist ("Answer with one word.") beats either route unless the read is sure, so the pick depends on
    # how far apart the two route scores are, not only on which is higher.
    table = RouteTable(labels=("neg", "pos"), shares=(0.5, 0.5), routes=tuple(routes), route_labels=((0,), (1,)),
                       prompts=("Answer with one word.", *routes), accuracy=((0.7, 0.95, 0.05), (0.7, 0.05, 0.95)))
    scores = torch_scores(tiny, QUERIES, routes)
    margins = np.abs(scores[:, 0] - scores[:, 1])
    table = replace(table, temperature=float(np.median(margins)))  # some reads sure, some not, on this policy
    expected = [table.prompts[i] for i in table.pick(scores)]
    assert len(set(expected)) > 1

    bundle = export_tiny(tiny, tmp_path / "routed", library=LIBRARY, routes=table)
    optimizer = PromptOptimizer.from_bundle(bundle)
    assert optimizer.info()["strategy"] == "choose"  # a route table makes 'choose' the default
    assert optimizer.info()["routes"] == {"routes": 2, "prompts": 3, "labels": ["neg", "pos"], "rule": "posterior",
                                          "read": None}
    results = optimizer.optimize_batch(QUERIES)
    assert [r.prompt for r in results] == expected
    assert all(query in r.text for query, r in zip(QUERIES, results, strict=True))

    # With the route read set (rule remap) only the top route counts: at a read of 0.9 each route sends itself
    # (0.95 * 0.9 + 0.05 * 0.1 = 0.86 beats the generalist's 0.7), at 0.6 the generalist (0.59 < 0.7).
    for read, sends in ((0.9, {r: r for r in routes}), (0.6, {r: "Answer with one word." for r in routes})):
        remapped = replace(table, read=read)
        assert remapped.sent_by_route() == sends
        optimizer = PromptOptimizer.from_bundle(export_tiny(tiny, tmp_path / f"remap{read}", library=LIBRARY,
                                                            routes=remapped))
        assert optimizer.info()["routes"]["rule"] == "remap" and optimizer.info()["routes"]["read"] == read
        assert [r.prompt for r in optimizer.optimize_batch(QUERIES)] == [sends[routes[int(i)]]
                                                                          for i in scores.argmax(-1)]
    assert load_library(bundle / LIBRARY_FILE, vocab_size=10**6, max_ids=13)[1] == table

    # A table naming a prompt outside the library is refused at export and at load, with the fix named.
    with pytest.raises(ExportError, match="does not hold"):
        export_tiny(tiny, tmp_path / "bad", library={routes[0]: 1, routes[1]: 1}, routes=table)
    assert not (tmp_path / "bad").exists()
    data = json.loads((bundle / LIBRARY_FILE).read_text())
    path = tmp_path / LIBRARY_FILE
    path.write_text(json.dumps({**data, "routes": {**data["routes"], "prompts": ["not in the library"],
                                                   "accuracy": [[0.5], [0.5]]}}))
    with pytest.raises(BundleError, match="routes name 1 prompt"):
        load_library(path, vocab_size=10**6, max_ids=13)
    path.write_text(json.dumps({**data, "routes": {**data["routes"], "temperature": -1}}))
    with pytest.raises(BundleError, match="temperature must be a number > 0"):
        load_library(path, vocab_size=10**6, max_ids=13)
    path.write_text(json.dumps({**data, "routes": {**data["routes"], "read": 1.5}}))
    with pytest.raises(BundleError, match=r"read must be None or a share in \[0, 1\]"):
        load_library(path, vocab_size=10**6, max_ids=13)
    path.write_text(json.dumps({**data, "version": 2}))
    with pytest.raises(BundleError, match="unknown field"):  # version 2 has no routes
        load_library(path, vocab_size=10**6, max_ids=13)

