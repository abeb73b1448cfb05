"""Prompt-pool induction (training/induce.py): the filters, dedup, request rotation, and collect's resume.

The plumbing runs on scripted inducers (a callable, LangChain's fake chat model) and the tiny random
target; one real test induces with a local instruct model and scores the pool on SmolLM2.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from typer.testing import CliRunner

from qpo_middleware.training.collect import CollectSummary, collect
from qpo_middleware.training.config import CollectConfig
from qpo_middleware.training.dataset import OfflineDataset, steering_prompts
from qpo_middleware.training.induce import (
    STYLES,
    Candidate,
    ChatInducer,
    InducedPool,
    Reply,
    clean_candidate,
    filter_candidates,
    induce,
    load_pool,
    reject_reason,
    request_wording,
    requests,
)
from qpo_middleware.training.run import Run, RunPaths
from qpo_middleware.training.targets import Score
from qpo_middleware.training.tasks import TaskError, get_task, names_one_label, resolve_prompts

LABELS = ("negative", "positive")
EXAMPLE = "A quiet, moving story with a great lead performance."

REPLIES = [
    "Instruction: \"Decide whether the review is positive or negative.\"",  # kept, once cleaned
    "",  # empty
    "positive",  # a bare label word
    "You are a film critic. Say if the review is positive or negative.<|im_end|><|im_start|>user",  # markup
    "decide whether the review is Positive or Negative",  # a duplicate of the first
    "Think step by step about the review, then answer positive or negative.",  # kept
    "Label the sentiment.",  # kept
]


class ScriptedInducer:
    """Replies from a list, in order; records every request and the seed of each batch."""

    def __init__(self, replies: list[str | Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[list[dict[str, str]]] = []
        self.seeds: list[int] = []

    def __call__(self, batch: list[list[dict[str, str]]], seed: int) -> list[str | Reply]:
        first = len(self.requests)
        self.requests += batch
        self.seeds.append(seed)
        return [self.replies[(first + i) % len(self.replies)] for i in range(len(batch))]


class Refuses:
    def __call__(self, batch: list[list[dict[str, str]]], seed: int) -> list[str]:
        raise AssertionError("a resumed collect must not induce again")


def make_fake_chat() -> GenericFakeChatModel:
    """A ``module:factory`` inducer for the CLI test: LangChain's fake chat model with fixed replies."""
    return GenericFakeChatModel(messages=iter([AIMessage(content=r) for r in REPLIES * 3]))


def config(**kwargs) -> CollectConfig:  # noqa: ANN003
    base = dict(task="sst2_sample", queries=6, collect_queries=2, test_queries=2, prompts="induce:7", chunk_size=8,
                batch_size=4)
    return CollectConfig(**{**base, **kwargs})


# -- cleaning and filters ------------------------------------------------------------------------


def test_clean_candidate_keeps_the_instruction_only() -> None:
    assert clean_candidate('Instruction: "Classify the review."') == "Classify the review."
    assert clean_candidate("**Instruction:** `Say positive or negative.`") == "Say positive or negative."
    assert clean_candidate("  Rate the review.\n\nThis instruction asks the reader to ...") == "Rate the review."
    assert clean_candidate("Classify\u200b the\x00 review.\r\n") == "Classify the review."
    assert clean_candidate("Rate it.\nAnswer positive or negative.") == "Rate it. Answer positive or negative."
    assert clean_candidate("The instruction is to classify the review.") == "Classify the review."


@pytest.mark.parametrize(("raw", "reason", "kwargs"), [
    ("", "empty", {}),
    ('  ""  ', "empty", {}),
    ("Positive.", "label_word", {}),
    ("negative or positive", "label_word", {}),
    ('Read the review; the output is "Positive".', "names_one_label", {}),
    ("Rate how positive the review is.", "names_one_label", {}),
    ('Classify the headline; the output is "Sports".', "names_one_label",
     {"labels": ("World", "Sports", "Business", "Sci/Tech")}),
    ("Is the headline about World or Sports news?", None,  # two of four labels: a format, not one answer
     {"labels": ("World", "Sports", "Business", "Sci/Tech")}),
    ("Classify the review. <|im_start|>assistant", "markup", {}),
    ("Classify the review.<|endoftext|>", "markup", {}),
    ("Classify the review. [INST] again", "markup", {}),
    ("Classify the review. <extra_0>", "markup", {"special_strings": ("<extra_0>",)}),
    ("Classify the review. " * 20, "too_long", {}),
    ("Classify the review as positive or", "too_long", {"finished": False}),
    ("To classify the review, follow these steps:", "too_long", {}),
    ("Classify the review.\n\nThis instruction asks the reader to read the", None, {"finished": False}),
    (f"Input: {EXAMPLE}", "copies_example", {}),
    ("a quiet moving story with a great lead", "copies_example", {}),
    ("Say whether the review is positive or negative.", None, {}),
    ("Is it great? Answer positive or negative.", None, {"examples": ["great"]}),  # a word is not a copy
])
def test_each_drop_reason(raw: str, reason: str | None, kwargs: dict) -> None:
    args = {"labels": LABELS, "examples": [EXAMPLE], **kwargs}
    assert reject_reason(raw, clean_candidate(raw), **args) == reason


def test_a_reply_that_echoes_the_request_is_dropped() -> None:
    task = get_task("sst2_sample")
    wording = request_wording(task, "plain")
    assert "Input:" not in wording and "negative, positive" in wording
    for echo in ("Write the output for each input below.", "Follow the output for each input.",
                 "Give a friend an instruction. Following it, the friend wrote the output for each input below."):
        assert reject_reason(echo, echo, labels=LABELS, examples=[], request=wording) == "echoes_request", echo
    kept = "Decide whether the review is positive or negative."
    assert reject_reason(kept, kept, labels=LABELS, examples=[], request=wording) is None


def test_a_variation_that_repeats_a_run_of_the_request_is_dropped() -> None:
    """A reply that carries six words in a row of the variation request (seen on ag_news: the embedded Qwen appended
    the request's closing line to its instruction) echoes it; the sentence listing the label words may be repeated."""
    from qpo_middleware.training.induce import variation_prompt

    task = get_task("ag_news")
    wording = " ".join(m["content"] for m in variation_prompt(task, "", "terse"))
    echo = ("Classify the next article the same way as the given instruction, in other words. Use at most ten words. "
            "Reply with the instruction itself in one or two sentences.")
    assert reject_reason(echo, echo, labels=task.labels, examples=[], request=wording) == "echoes_request"
    for kept in ("Read the news article and name its topic. The answer is always one of these words: World, Sports, "
                 "Business, Technology.",
                 "Write a different instruction that makes a reader answer one of these words: Science, Politics.",
                 "Read the article and reply with its topic in one word."):  # short runs of the request only
        assert reject_reason(kept, kept, labels=task.labels, examples=[], request=wording) is None, kept


def test_duplicates_are_dropped_after_the_first_and_against_the_given_pool() -> None:
    texts = ["Classify the review.", "classify  the REVIEW", "Is it positive or negative?", "Rate the film."]
    candidates = [Candidate(f"induced:plain:{i}", "plain", t, t, []) for i, t in enumerate(texts)]
    filter_candidates(candidates, labels=LABELS, examples={}, existing=["Rate the film!"])
    assert [c.reason for c in candidates] == [None, "duplicate", None, "duplicate"]


# -- requests: styles and examples rotate, seeded ------------------------------------------------


def test_requests_rotate_styles_and_examples_deterministically() -> None:
    task = get_task("sst2_sample")
    train = task.splits(seed=0, n_train=20, n_collect=0, n_test=2).train
    first = requests(task, train, 12, shots=4, seed=0)
    assert [r.style for r in first] == [list(STYLES)[i % len(STYLES)] for i in range(12)]
    assert requests(task, train, 12, shots=4, seed=0) == first
    assert len({r.example_ids for r in first}) == 12  # different examples per request
    assert [r.example_ids for r in requests(task, train, 12, shots=4, seed=1)] != [r.example_ids for r in first]
    # More requests keep the first ones: request i depends on (seed, i) only.
    assert requests(task, train, 3, shots=4, seed=0) == first[:3]
    by_id = {e.id: e for e in train}
    for request in first:
        shown = [by_id[i] for i in request.example_ids]
        assert len(shown) == 4 and {e.label for e in shown} == {0, 1}  # every label shown
        user = request.messages[-1]["content"]
        assert all(e.query in user for e in shown) and "negative, positive" in user
        assert STYLES[request.style] in user


def test_induce_keeps_the_clean_candidates_and_counts_the_rest() -> None:
    task = get_task("sst2_sample")
    train = task.splits(seed=0, n_train=8, n_collect=0, n_test=2).train
    inducer = ScriptedInducer([*REPLIES, Reply("Decide if the review is", finished=False)])
    pool = induce(task, train, 8, inducer, inducer_id="scripted", seed=3, batch_size=3)
    assert [c.text for c in pool.kept] == [
        "Decide whether the review is positive or negative.",
        "Think step by step about the review, then answer positive or negative.",
        "Label the sentiment.",
    ]
    assert [s for s, _ in pool.prompts] == ["induced:plain:0", "induced:plain:5", "induced:role:6"]
    assert pool.drop_counts() == {"empty": 1, "markup": 1, "too_long": 1, "label_word": 1, "duplicate": 1}
    assert len(inducer.requests) == 8 and len(set(inducer.seeds)) == 3  # three batches, a seed each
    assert induce(task, train, 8, ScriptedInducer(REPLIES), inducer_id="scripted", seed=3, batch_size=1).kept[:2] \
        == pool.kept[:2]  # the batch size does not change which request gets which reply


def test_a_langchain_chat_model_induces() -> None:
    task = get_task("sst2_sample")
    train = task.splits(seed=0, n_train=8, n_collect=0, n_test=2).train
    pool = induce(task, train, 7, ChatInducer(make_fake_chat()), inducer_id="fake")
    assert len(pool.kept) == 3 and pool.drop_counts() == {"empty": 1, "markup": 1, "label_word": 1, "duplicate": 1}


# -- config --------------------------------------------------------------------------------------


def test_config_shorthand_and_validation() -> None:
    assert (config().prompts, config().induce) == ("none", 7)
    assert (config(prompts="all", induce=3).prompts, config(prompts="all", induce=3).induce) == ("all", 3)
    assert config(prompts="induce:7", induce=7).induce == 7
    with pytest.raises(ValueError, match="disagree"):
        config(prompts="induce:7", induce=3)
    with pytest.raises(ValueError, match="N >= 1"):
        config(prompts="induce:x")
    with pytest.raises(ValueError, match="induce must be positive or 0"):
        config(prompts="all", induce=-1)
    with pytest.raises(ValueError, match="nothing to score"):
        config(prompts="none", include_empty=False)


# -- collect: prompts.json, resume ---------------------------------------------------------------


def test_collect_induces_once_and_resume_reuses_prompts_json(tmp_path: Path, tiny_target_model: str) -> None:
    inducer = ScriptedInducer(REPLIES)
    summary = collect(config(target=tiny_target_model), tmp_path, inducer=inducer)
    assert len(inducer.requests) == 7
    saved = load_pool(RunPaths(tmp_path).induced_prompts)
    assert len(saved.kept) == 3 and saved.asked == 7
    sources = {r.prompt_source for r in OfflineDataset(tmp_path).records}
    assert sources == {"none", "induced:plain:0", "induced:plain:5", "induced:role:6"}
    assert summary.induction is not None and (summary.induction.asked, summary.induction.kept) == (7, 3)
    assert summary.induction.dropped == {"empty": 1, "markup": 1, "label_word": 1, "duplicate": 1}
    assert json.loads(RunPaths(tmp_path).collect_summary.read_text())["induction"]["kept"] == 3

    # Resumed: the pool comes back from prompts.json; nothing is induced or scored again.
    again = collect(config(target=tiny_target_model), tmp_path, inducer=Refuses())
    assert again.records_written == 0 and again.target_calls == 0 and again.induction == summary.induction

    # Other induce settings are another run.
    with pytest.raises(ValueError, match="induce: run has 7, asked 5"):
        collect(config(target=tiny_target_model, prompts="induce:5"), tmp_path, inducer=Refuses())
    with pytest.raises(ValueError, match="inducer: run has"):
        collect(config(target=tiny_target_model, inducer="other-model"), tmp_path, inducer=Refuses())


def test_induced_prompts_join_a_given_pool_without_duplicates(tmp_path: Path, tiny_target_model: str) -> None:
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(["Label the sentiment", "Rate the review."]))
    collect(config(target=tiny_target_model, prompts=str(pool), induce=7, include_empty=False), tmp_path / "run",
            inducer=ScriptedInducer(REPLIES))
    sources = sorted({r.prompt_source for r in OfflineDataset(tmp_path / "run").records})
    assert sources == ["file:0", "file:1", "induced:plain:0", "induced:plain:5"]  # "Label the sentiment." dropped
    assert load_pool(RunPaths(tmp_path / "run").induced_prompts).drop_counts()["duplicate"] == 2


def test_a_run_made_before_induction_still_opens(tmp_path: Path, tiny_target_model: str) -> None:
    plain = config(target=tiny_target_model, prompts="2")
    collect(plain, tmp_path)
    paths = RunPaths(tmp_path)
    data = json.loads(paths.run_file.read_text())
    for key in ("induce", "inducer", "induce_shots"):
        del data[key]
    paths.run_file.write_text(json.dumps(data))
    run = Run.open(tmp_path, plain)
    assert run.config.induce == 0 and run.induced() is None and not paths.induced_prompts.exists()
    assert len(run.prompts()) == 3  # the empty prompt and two pool prompts
    # A different inducer is not a different run while nothing is induced.
    Run.open(tmp_path, config(target=tiny_target_model, prompts="2", inducer="other-model"))


def test_cli_collect_with_a_chat_model_inducer(tmp_path: Path, tiny_target_model: str) -> None:
    from qpo_middleware.cli import app

    result = CliRunner().invoke(app, [
        "collect", "--task", "sst2_sample", "--target", tiny_target_model, "--queries", "6", "--collect-queries", "2",
        "--test-queries", "2", "--prompts", "induce:7", "--inducer", "test_induce:make_fake_chat",
        "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "asked 7, kept 3" in result.output and "label_word 1" in result.output
    assert len(load_pool(RunPaths(tmp_path).induced_prompts).kept) == 3


# -- real model ----------------------------------------------------------------------------------

INDUCER = "qwen2.5-coder-0.5b-instruct"


@pytest.mark.real
def test_a_local_model_induces_a_usable_pool_that_collect_scores(tmp_path: Path, smollm2_target) -> None:  # noqa: ANN001
    from qpo_middleware.training.induce import LocalInducer
    from qpo_middleware.training.models import ModelNotFoundError

    reviews = [
        ("The food was delicious and the staff were lovely.", "good"), ("Cold soup and a rude waiter.", "bad"),
        ("Best pizza I have had in years.", "good"), ("We waited an hour and left hungry.", "bad"),
        ("Fresh, tasty and fairly priced.", "good"), ("The fish smelled off and the bill was huge.", "bad"),
        ("A warm welcome and a perfect dessert.", "good"), ("Noisy, dirty and overpriced.", "bad"),
        ("I would come back tomorrow.", "good"), ("Never again: bland and greasy.", "bad"),
        ("Lovely terrace and friendly service.", "good"), ("My steak was burnt and cold.", "bad"),
    ]
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in reviews))
    spec = tmp_path / "task.json"
    spec.write_text(json.dumps({"name": "restaurants", "file": "reviews.jsonl", "query_fields": ["text"],
                                "labels": ["bad", "good"]}))
    try:
        inducer = LocalInducer(INDUCER)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))

    n = 6
    start = time.perf_counter()
    summary = collect(CollectConfig(task=str(spec), queries=8, collect_queries=2, test_queries=2, induce=n,
                                    prompts="none", inducer=INDUCER, induce_shots=4),
                      tmp_path / "run", target=smollm2_target, inducer=inducer)
    seconds = time.perf_counter() - start
    pool = load_pool(RunPaths(tmp_path / "run").induced_prompts)
    report = {"asked": pool.asked, "kept": len(pool.kept), "dropped": pool.drop_counts(), "seconds": round(seconds),
              "kept_texts": [c.text for c in pool.kept], "dropped_raw": [(c.reason, c.raw) for c in pool.dropped]}
    print(json.dumps(report, indent=1))
    assert len({c.text.casefold() for c in pool.kept}) >= n // 2, report
    assert all(c.text and "<|" not in c.text and c.text.casefold() not in ("bad", "good") for c in pool.kept)
    scored = {s.prompt_id for s in summary.prompts}
    assert {c.source for c in pool.kept} <= scored and all(s.n == 8 for s in summary.prompts)
    assert summary.induction is not None and summary.induction.kept == len(pool.kept)


# -- mutation (the loops' exploration step) ---------------------------------------------------------------------


def test_mutate_writes_one_filtered_variation_per_prompt() -> None:
    from qpo_middleware.training.induce import mutate, variation_prompt

    task = get_task("sst2_sample")
    originals = ["Label the sentiment.", "Is the review positive or negative?", "Label the sentiment."]
    inducer = ScriptedInducer(["Say how the reviewer feels about the film.", "label the sentiment",
                               "Say how the reviewer feels about the film."])
    candidates = mutate(task, originals, inducer, seed=1, existing=["Sentiment?"])
    assert [c.reason for c in candidates] == [None, "duplicate", "duplicate"]  # = an original; = the first variation
    assert [c.source for c in candidates] == ["mutation:role:0", "mutation:step_by_step:1", "mutation:format:2"]
    assert "Label the sentiment." in inducer.requests[0][-1]["content"]
    assert inducer.requests[1] == variation_prompt(task, originals[1], "step_by_step")


def make_variations_chat() -> GenericFakeChatModel:
    """A ``module:factory`` mutation model for the loop test: a new wording per request."""
    return GenericFakeChatModel(messages=iter([AIMessage(content=f"Rate the feeling of this review, variant {i}.")
                                              for i in range(100)]))


def test_loops_score_variations_of_each_querys_best_prompt(tmp_path: Path, tiny_target_model: str) -> None:
    from qpo_middleware.training.config import LoopConfig, TrainConfig
    from qpo_middleware.training.loops import run_loops

    collect(CollectConfig(task="sst2_sample", target=tiny_target_model, queries=6, collect_queries=4,
                          test_queries=2, prompts="3", chunk_size=8, batch_size=8), tmp_path)
    train = TrainConfig(epochs=1, batch_size=8, num_buckets=4, prompt_max_tokens=8, query_max_tokens=16,
                        conditioning="absolute")
    loops = LoopConfig(loops=2, base_model=tiny_target_model, samples_per_query=1, reward_floor_quantile=0.0,
                       d0_floor_quantile=0.0, preference="off", mutations=3, mutation_model="test_induce:make_variations_chat")
    metrics = run_loops(tmp_path, train, loops)
    assert metrics[1].mutation_pairs == 3 and metrics[1].mutation_accuracy is not None
    mutated = [r for r in OfflineDataset(tmp_path).records if r.prompt_source.startswith("mutation:")]
    # Variations pass the loop's reward floor like sampled prompts; those kept are tagged with loop 2.
    assert 1 <= len(mutated) <= 3 and all(r.loop == 2 and "variant" in r.prompt for r in mutated)
    assert len({r.query_id for r in mutated}) == len(mutated)  # one variation per collect query
    assert metrics[1].new_distinct_prompts >= 3  # the variations are new prompts


@pytest.mark.real
def test_a_local_model_writes_new_variations_of_real_prompts() -> None:
    from qpo_middleware.training.induce import LocalInducer, mutate
    from qpo_middleware.training.models import ModelNotFoundError

    task = get_task("sst2")
    originals = ["Is this movie review positive or negative?", "Sentiment?",
                 "You are a film critic. Read the review and say whether the critic liked the film.",
                 "Classify the sentiment of the sentence."]
    try:
        inducer = LocalInducer(INDUCER)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    candidates = mutate(task, originals, inducer, seed=0)
    print(json.dumps([(c.reason, c.text) for c in candidates], indent=1))
    kept = [c.text for c in candidates if c.reason is None]
    assert len(kept) >= 2, candidates
    assert all(t not in originals and "<|" not in t and len(t.split()) >= 2 for t in kept)


# -- pool growth by mutation (collect --mutate) -----------------------------------------------------------------


def written(grown: InducedPool) -> list[Candidate]:
    """The candidates of a mutated pool in the order they were asked for (``mutation:<style>:<i>``)."""
    return sorted([*grown.kept, *grown.dropped], key=lambda c: int(c.source.rsplit(":", 1)[1]))


def best_sources(run: Run, summary: CollectSummary) -> list[str]:
    """The given pool's non-empty prompts by D0 accuracy, best first (ties to the earlier)."""
    accuracy = {s.prompt: s.accuracy for s in summary.prompts}
    base = run.base_prompts()
    return [base[i][0] for i in sorted((i for i, (_, text) in enumerate(base) if text),
                                       key=lambda i: (-accuracy[base[i][1]], i))]


def test_collect_mutate_grows_the_pool_with_variations_of_the_best_d0_prompts(tmp_path: Path,
                                                                              tiny_target_model: str) -> None:
    variations = ["Rate the feeling of this review.", "Say whether the writer enjoyed it.", "Rate the feeling of this review."]
    inducer = ScriptedInducer(variations)
    asked = config(target=tiny_target_model, prompts="4", queries=10, prompts_per_query=2, mutate=3, mutate_from=2)
    summary = collect(asked, tmp_path, inducer=inducer)
    run = Run.open(tmp_path)
    base = run.base_prompts()
    grown = run.mutated()
    assert grown is not None and grown.asked == 3 and grown.from_top == 2
    # The two best D0 prompts (the empty one never; ties to the earlier), varied in turn: best, second, best.
    assert [c.of for c in written(grown)] == [best_sources(run, summary)[i] for i in (0, 1, 0)]
    assert [c.text for c in grown.kept] == variations[:2] and [c.reason for c in grown.dropped] == ["duplicate"]
    assert dict(base)[grown.kept[0].of] in inducer.requests[0][-1]["content"]
    # The kept variations join the pool and D0: round(2 * 2 / 5) = 1 of them per train query.
    assert run.prompts() == base + grown.prompts
    mutated = [r for r in OfflineDataset(tmp_path).loop(0) if r.prompt_source.startswith("mutation:")]
    assert len(mutated) == 10 and len({r.query_id for r in mutated}) == 10
    assert summary.mutation is not None and (summary.mutation.asked, summary.mutation.kept) == (3, 2)
    assert {s.prompt_id for s in summary.prompts} >= {c.source for c in grown.kept}
    records = len(OfflineDataset(tmp_path))

    # A resumed collect reads the variations back: no new request, no new record.
    again = collect(asked, tmp_path, inducer=Refuses())
    assert again.records_written == 0 and len(OfflineDataset(tmp_path)) == records and again.mutation == summary.mutation
    # Other mutation settings are another run.
    with pytest.raises(ValueError, match="mutate_from: run has 2, asked 3"):
        collect(config(target=tiny_target_model, prompts="4", queries=10, prompts_per_query=2, mutate=3,
                       mutate_from=3), tmp_path, inducer=Refuses())
    with pytest.raises(ValueError, match="mutate must be positive or 0"):
        config(mutate=-1)


class RuleTarget:
    """A plumbing fake: answers by the prompt's position in the pool: the first pool prompt always says positive, the
    second (and any variation) is always right, the third always says negative, the empty prompt always wrong
    (``qpo collect`` needs only the verdicts and predictions). The first and third steer; the second does not."""

    id = "fake:rules"

    def __init__(self, pool: list[str]) -> None:
        self.pool = pool

    def score(self, task, pairs, progress=None) -> list[Score]:  # noqa: ANN001
        scores = []
        for pair in pairs:
            gold = task.gold_text(pair.example)
            other = next(label for label in task.labels if label != gold)
            position = self.pool.index(pair.prompt) if pair.prompt in self.pool else 1  # a variation: right
            answer = {0: "positive", 1: gold, 2: "negative"}[position] if pair.prompt else other
            scores.append(Score(correct=answer == gold, prediction=answer, gold_nll=1.0, label_nll=0.5))
        if progress:
            progress(len(pairs))
        return scores


def test_collect_mutate_plain_varies_only_prompts_that_do_not_steer(tmp_path: Path) -> None:
    pool = [text for _, text in resolve_prompts(get_task("sst2_sample"), "3", include_empty=False)]
    asked = config(prompts="3", queries=10, mutate=2, mutate_from=2)
    # Without --mutate-plain the two most accurate prompts are varied, whatever they do.
    plain_off = collect(asked, tmp_path / "all", target=RuleTarget(pool), inducer=ScriptedInducer(["Rate it.", "Judge it."]))
    steering = steering_prompts(OfflineDataset(tmp_path / "all").loop(0))
    assert set(steering) - {""} == {pool[0], pool[2]} and plain_off.mutation is not None
    base = dict(Run.open(tmp_path / "all").base_prompts())
    assert base[written(Run.open(tmp_path / "all").mutated())[1].of] in steering  # type: ignore[arg-type]

    # With it, only the prompt that does not steer is varied (twice: it is the only one left).
    plain = replace(asked, mutate_plain=True)
    collect(plain, tmp_path / "plain", target=RuleTarget(pool), inducer=ScriptedInducer(["Rate it.", "Judge it."]))
    run = Run.open(tmp_path / "plain")
    grown = run.mutated()
    assert grown is not None and grown.plain and [dict(run.base_prompts())[c.of] for c in written(grown)] == [pool[1]] * 2
    assert load_pool(run.paths.mutated_prompts).plain  # the setting is kept in mutations.json
    with pytest.raises(ValueError, match="mutate_plain: run has True, asked False"):  # another pool: another run
        collect(asked, tmp_path / "plain", target=RuleTarget(pool), inducer=Refuses())

    # No prompt left to vary: the error names the fix, before any variation is asked for.
    with pytest.raises(TaskError, match="mutate without --mutate-plain"):
        collect(replace(plain, prompts="1"), tmp_path / "none", target=RuleTarget(pool), inducer=Refuses())
    with pytest.raises(ValueError, match="give --mutate N too"):
        config(mutate_plain=True)
    with pytest.raises(TaskError, match="gsm8k is a math task"):
        Run.open(tmp_path / "gsm8k", CollectConfig(task="gsm8k", mutate=2, mutate_plain=True, data_dir=str(tmp_path)))
    assert not (tmp_path / "gsm8k" / "run.json").exists()


def test_collect_mutate_from_the_cli(tmp_path: Path, tiny_target_model: str) -> None:
    from qpo_middleware.cli import app

    result = CliRunner().invoke(app, [
        "collect", "--task", "sst2_sample", "--target", tiny_target_model, "--queries", "4", "--collect-queries", "2",
        "--test-queries", "2", "--prompts", "3", "--mutate", "2", "--mutate-from", "1",
        "--inducer", "test_induce:make_variations_chat", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "variations (" in result.output and "asked 2, kept 2" in result.output
    assert len(Run.open(tmp_path).prompts()) == 3 + 1 + 2  # 3 given, the empty one, 2 variations


@pytest.mark.real
@pytest.mark.parametrize("plain", [False, True], ids=["best", "plain"])
def test_collect_mutate_on_real_sst2_with_the_local_models(tmp_path: Path, real_data: Path, smollm2_target,  # noqa: ANN001
                                                           plain: bool) -> None:
    """The embedded Qwen writes variations of the two best of 3 real pool prompts on 10 real SST-2 sentences (with
    ``plain``, of the two best that do not steer SmolLM2 there), and the embedded SmolLM2 scores them."""
    from qpo_middleware.training.induce import LocalInducer
    from qpo_middleware.training.models import ModelNotFoundError

    try:
        inducer = LocalInducer(INDUCER)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    summary = collect(CollectConfig(task="sst2", queries=10, collect_queries=2, test_queries=2, prompts="3",
                                    mutate=2, mutate_from=2, mutate_plain=plain, inducer=INDUCER), tmp_path,
                      target=smollm2_target, inducer=inducer)
    run = Run.open(tmp_path)
    grown = run.mutated()
    assert grown is not None and grown.plain == plain
    print(json.dumps([(c.of, c.reason, c.text) for c in [*grown.kept, *grown.dropped]], indent=1))
    accuracy = {s.prompt_id: s.accuracy for s in summary.prompts}
    text = dict(run.base_prompts())
    steering = steering_prompts(OfflineDataset(tmp_path).loop(0))
    print("steering on D0:", steering)
    eligible = [s for s in best_sources(run, summary) if not (plain and text[s] in steering)]
    assert [c.of for c in written(grown)] == [eligible[i % min(2, len(eligible))] for i in range(2)]  # in turn
    if plain:  # on these 10 sentences SmolLM2 is steered by 2 of the 3 prompts, one of them among the two best
        assert eligible[:2] != best_sources(run, summary)[:2]
    assert grown.kept, grown.dropped  # the real inducer writes at least one usable variation
    originals = {text for _, text in run.base_prompts()}
    for c in grown.kept:
        assert c.text not in originals and "<|" not in c.text and not names_one_label(c.text, ["negative", "positive"])
        assert c.source in accuracy and next(s.n for s in summary.prompts if s.prompt_id == c.source) == 10
    assert run.prompts()[-len(grown.kept):] == grown.prompts
