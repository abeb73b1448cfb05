"""Policy tokens, reward buckets, examples, collation and the loss."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from _tiny_policy import load_tokenizer, make_records, tiny_model

from qpo_middleware.policy_format import reward_token
from qpo_middleware.training.policy import (
    IGNORE_INDEX,
    SEPARATOR_TOKEN,
    Example,
    PolicyDataError,
    RewardBuckets,
    add_policy_tokens,
    build_examples,
    collate,
    conditioning_values,
    policy_token_ids,
    qpo_loss,
    top_bucket_coverage,
)


@pytest.fixture
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def policy(tokenizer):
    """(model, tokenizer, fmt) with 4 reward buckets and small caps."""
    model = tiny_model(len(tokenizer))
    fmt = add_policy_tokens(model, tokenizer, num_buckets=4, query_max_tokens=5, prompt_max_tokens=6)
    return model, tokenizer, fmt


# --- loss ---------------------------------------------------------------------


def test_qpo_loss_matches_hand_worked_value_on_two_token_vocabulary():
    # Vocabulary {0, 1}. Position 0 gives p(1) = 3/4, position 1 gives p(0) = 1/2;
    # position 2's prediction has no next label and is never scored.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])  # (1, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])  # predicted from positions 0 and 1
    expected = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    assert qpo_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)

    # Masking the first target leaves only -log(1/2).
    masked = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])
    assert qpo_loss(logits, masked).item() == pytest.approx(math.log(2), rel=1e-6)

    # The mean is over supervised tokens of the whole batch, not per row.
    batch_logits = torch.cat([logits, logits])  # (2, 3, 2)
    batch_labels = torch.cat([labels, masked])
    assert qpo_loss(batch_logits, batch_labels).item() == pytest.approx(
        (-math.log(3 / 4) - 2 * math.log(1 / 2)) / 3, rel=1e-6
    )


def test_qpo_loss_without_supervised_tokens_is_zero_and_differentiable():
    logits = torch.zeros((1, 3, 2), requires_grad=True)
    loss = qpo_loss(logits, torch.full((1, 3), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None


# --- tokens -------------------------------------------------------------------


def test_add_policy_tokens_adds_special_tokens_and_anchor_initialised_rows(tokenizer):
    model = tiny_model(len(tokenizer))
    num_old = len(tokenizer)
    old_mean = model.get_input_embeddings().weight.detach().mean(dim=0).clone()

    fmt = add_policy_tokens(model, tokenizer, num_buckets=3)

    assert len(tokenizer) == num_old + 4
    assert model.get_input_embeddings().weight.shape[0] == num_old + 4
    assert model.config.vocab_size == num_old + 4
    assert fmt.reward_token_ids == tuple(tokenizer.convert_tokens_to_ids([reward_token(i) for i in range(3)]))
    assert fmt.separator_ids == (tokenizer.convert_tokens_to_ids(SEPARATOR_TOKEN),)
    assert fmt.eos_token_ids == (tokenizer.eos_token_id,)
    assert fmt.pad_token_id == tokenizer.pad_token_id
    # Special tokens: one id each, never split, dropped when decoding without specials.
    text = reward_token(2) + "hello" + SEPARATOR_TOKEN
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == fmt.reward_token_ids[2] and ids[-1] == fmt.separator_ids[0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello"
    # Reward token i starts at the embedding of the number i, the separator at the mean row,
    # each with tiny noise: the buckets are distinct before any training.
    weight = model.get_input_embeddings().weight.detach()
    for bucket, token in enumerate(fmt.reward_token_ids):
        anchor = weight[tokenizer(str(bucket), add_special_tokens=False)["input_ids"]].mean(dim=0)
        assert torch.allclose(weight[token], anchor, atol=0.05)
    assert torch.allclose(weight[fmt.separator_ids[0]], old_mean, atol=0.05)
    rewards = weight[list(fmt.reward_token_ids)]
    assert torch.cdist(rewards, rewards).fill_diagonal_(1e9).min() > 0.1
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def test_add_policy_tokens_is_idempotent(policy):
    model, tokenizer, fmt = policy
    size = len(tokenizer)
    weights = model.get_input_embeddings().weight.detach().clone()

    again = add_policy_tokens(model, tokenizer, num_buckets=4, query_max_tokens=5, prompt_max_tokens=6)

    assert again == fmt
    assert len(tokenizer) == size
    assert torch.equal(model.get_input_embeddings().weight.detach(), weights)


def test_add_policy_tokens_initialises_rows_when_only_the_tokenizer_has_them(policy):
    _, tokenizer, fmt = policy  # tokenizer of a policy, model of the base vocabulary
    base = tiny_model(fmt.reward_token_ids[0])
    again = add_policy_tokens(base, tokenizer, num_buckets=4, query_max_tokens=5, prompt_max_tokens=6)
    weight = base.get_input_embeddings().weight.detach()
    assert again == fmt
    assert weight.shape[0] == len(tokenizer)
    separator = weight[fmt.separator_ids[0]]
    assert torch.allclose(separator, weight[: fmt.reward_token_ids[0]].mean(dim=0), atol=0.05)
    assert not torch.allclose(weight[fmt.reward_token_ids[0]], weight[fmt.reward_token_ids[1]], atol=0.05)


def test_policy_token_ids_names_the_fix_when_tokens_are_missing(tokenizer):
    with pytest.raises(PolicyDataError, match="add_policy_tokens"):
        policy_token_ids(tokenizer, 10)


# --- buckets ------------------------------------------------------------------


def test_buckets_are_monotone_and_the_best_reward_is_in_the_top_bucket():
    rng = random.Random(0)
    rewards = [rng.gauss(0, 5) for _ in range(500)]
    buckets = RewardBuckets.from_rewards(rewards, 10)
    assert buckets.num_buckets == 10 and buckets.top == 9
    assert buckets.edges == sorted(buckets.edges)
    indices = [buckets.bucket(r) for r in sorted(rewards)]
    assert indices == sorted(indices)
    assert indices[0] == 0 and indices[-1] == 9
    counts = [indices.count(b) for b in range(10)]
    assert min(counts) >= 45 and max(counts) <= 55  # quantiles: about equal shares
    assert buckets.bucket(-1e9) == 0 and buckets.bucket(1e9) == 9
    assert RewardBuckets.from_dict(buckets.to_dict()) == buckets


def test_buckets_with_tied_rewards_keep_the_best_on_top():
    buckets = RewardBuckets.from_rewards([0.0] * 3 + [1.0] * 7, 10)
    assert buckets.bucket(1.0) == 9
    assert buckets.bucket(0.0) < buckets.bucket(1.0)
    assert RewardBuckets.from_rewards([1.0, 2.0], 1).bucket(5.0) == 0


def test_buckets_reject_bad_input():
    with pytest.raises(PolicyDataError, match="empty"):
        RewardBuckets.from_rewards([], 10)
    with pytest.raises(PolicyDataError, match="finite"):
        RewardBuckets.from_rewards([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="ascending"):
        RewardBuckets(edges=[2.0, 1.0])
    with pytest.raises(ValueError, match=">= 1"):
        RewardBuckets.from_rewards([1.0], 0)


def _scored(query_id: str, prompt: str, correct: bool, reward: float):
    from qpo_middleware.training.dataset import Record

    return Record(task="t", query_id=query_id, query=f"query {query_id}", prompt=prompt, prompt_source="pool:x",
                  loop=0, target="hf:x", correct=correct, reward=reward, prompt_mean_accuracy=0.5)


def test_query_rank_puts_each_querys_best_correct_prompt_on_top_and_wrong_ones_below_half():
    records = [
        # q1: the best-on-average prompt A (high reward) is wrong; B is right for this query.
        _scored("q1", "A", False, 9.0), _scored("q1", "B", True, 11.0), _scored("q1", "C", False, 2.0),
        # q2: three correct prompts, ordered by reward; one wrong.
        _scored("q2", "A", True, 19.0), _scored("q2", "B", True, 15.0), _scored("q2", "C", True, 12.0),
        _scored("q2", "D", False, 3.0),
        # q3: nothing correct: the best wrong prompt must stay below the top half.
        _scored("q3", "A", False, 8.0), _scored("q3", "B", False, 7.0),
    ]
    values = conditioning_values(records, "query_rank")
    assert values == pytest.approx([0.25, 1.0, 0.0, 1.0, 0.5 + 0.5 * 2 / 3, 0.5 + 0.5 / 3, 0.0, 0.25, 0.0])
    assert conditioning_values(records, "absolute") == [r.reward for r in records]
    ranks = RewardBuckets.for_records(records, 10, "query_rank")
    assert ranks.edges == pytest.approx([i / 10 for i in range(1, 10)]) and ranks.conditioning == "query_rank"
    assert [ranks.bucket(v) == ranks.top for v in values] == [False, True, False, True, False, False, False,
                                                              False, False]
    assert top_bucket_coverage(records, ranks) == 1.0  # q1 and q2 (q3 has no correct prompt)
    # Absolute rewards: the top bucket is q2's A alone, so q1's right prompt B is not on top.
    absolute = RewardBuckets.for_records(records, 10)
    assert absolute.conditioning == "absolute" and top_bucket_coverage(records, absolute) == 0.5
    assert RewardBuckets.from_dict(ranks.to_dict()) == ranks
    assert RewardBuckets.from_dict({"edges": [0.0]}).conditioning == "absolute"  # buckets.json before the field
    with pytest.raises(ValueError, match="query_rank"):
        conditioning_values(records, "relative")
    with pytest.raises(ValueError, match="conditioning"):
        RewardBuckets(edges=[], conditioning="rank")


def test_label_rank_puts_the_prompt_that_suits_the_querys_label_on_top_whatever_its_own_verdict():
    from dataclasses import replace

    verdicts = {"q1": ("pos", True, True), "q2": ("pos", True, False), "q5": ("pos", True, False),
                "q3": ("neg", False, True), "q4": ("neg", False, True), "q6": ("neg", True, False)}
    records = [replace(_scored(q, prompt, ok, 10.0 * ok), label=label)
               for q, (label, a, b) in verdicts.items() for prompt, ok in (("A", a), ("B", b))]
    # A: right on 4 of 6 (all 3 pos, 1 of 3 neg); B: 3 of 6 (1 pos, 2 neg). Shrunk by 4 pseudo-records:
    # neg A = (1 + 4 * 4/6) / 7 = 0.524, neg B = (2 + 4 * 3/6) / 7 = 0.571, so B suits neg, A suits pos.
    values = conditioning_values(records, "label_rank")
    # q6 is negative: B is on top though it was wrong there and A right; q1 (both right) puts A on top.
    assert values == pytest.approx([1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0])
    ranks = RewardBuckets.for_records(records, 10, "label_rank")
    assert ranks == RewardBuckets.even(10, "label_rank")
    assert top_bucket_coverage(records, ranks) == pytest.approx(5 / 6)  # q6's right prompt is not on top
    unlabelled = [replace(r, label=None) for r in records]
    with pytest.raises(ValueError, match="--conditioning query_rank"):
        conditioning_values(unlabelled, "label_rank")


def test_label_route_trains_each_query_on_its_labels_best_prompt_in_the_whole_pool():
    from dataclasses import replace

    from qpo_middleware.training.config import TrainConfig, TrainConfigError
    from qpo_middleware.training.dataset import steering_prompts
    from qpo_middleware.training.policy import label_route_data

    # Each query scored on two of three prompts. By label: C is right on every pos query it was scored on (q2, q3),
    # A on pos only half the time; on neg B is right on q4 and q5, C never, A on q6 only.
    scored = {"q1": ("pos", {"A": True, "B": False}), "q2": ("pos", {"A": False, "C": True}),
              "q3": ("pos", {"B": False, "C": True}), "q4": ("neg", {"A": False, "B": True}),
              "q5": ("neg", {"B": True, "C": False}), "q6": ("neg", {"A": True, "C": False})}
    records = [replace(_scored(q, prompt, ok, 10.0 * ok), label=label)
               for q, (label, verdicts) in scored.items() for prompt, ok in verdicts.items()]
    values = conditioning_values(records, "label_route")
    standing = {(r.label, r.prompt): v for r, v in zip(records, values, strict=True)}
    assert standing == {("pos", "C"): 1.0, ("pos", "A"): 0.5, ("pos", "B"): 0.0,
                        ("neg", "B"): 1.0, ("neg", "A"): 0.5, ("neg", "C"): 0.0}
    out, values = label_route_data(records)
    # q1 never saw C: it still trains on C under the top token (imputed from q2 and q3), and on B under the bottom.
    assert [(r.query_id, r.prompt, v) for r, v in zip(out, values, strict=True)] == [
        ("q1", "C", 1.0), ("q1", "B", 0.0), ("q2", "C", 1.0), ("q2", "B", 0.0), ("q3", "C", 1.0), ("q3", "B", 0.0),
        ("q4", "B", 1.0), ("q4", "C", 0.0), ("q5", "B", 1.0), ("q5", "C", 0.0), ("q6", "B", 1.0), ("q6", "C", 0.0)]
    assert {r.prompt_source for r in out} == {"label_route:best", "label_route:worst"}
    assert all(r.extra["imputed"] and r.query == f"query {r.query_id}" for r in out)
    buckets = RewardBuckets.for_records(records, 10, "label_route")
    assert buckets == RewardBuckets.even(10, "label_route")
    assert [buckets.bucket(v) for v in values[:2]] == [buckets.top, 0]
    with pytest.raises(ValueError, match="--conditioning query_rank"):
        label_route_data([replace(r, label=None) for r in records])

    # The target's answers behind those verdicts (two labels: a wrong answer is the other one). C answers pos on all
    # its 4 queries (2 of them pos) and B neg on all 4 (2 neg): both steer; A answers each label twice.
    answered = [replace(r, prediction=r.label if r.correct else {"pos": "neg", "neg": "pos"}[r.label]) for r in records]
    assert steering_prompts(answered) == {"B": "neg", "C": "pos"}
    out, values = label_route_data(answered, without_steering=True)
    # Only A is left to route: every query trains on it under the top token (a label with one prompt has no worst).
    assert [(r.query_id, r.prompt, v) for r, v in zip(out, values, strict=True)] == [
        (q, "A", 1.0) for q in ("q1", "q2", "q3", "q4", "q5", "q6")]
    with pytest.raises(ValueError, match="grow the pool"):
        label_route_data([r for r in answered if r.prompt != "A"], without_steering=True)
    with pytest.raises(TrainConfigError, match="only applies to --conditioning label_route"):
        TrainConfig(route_without_steering=True)
    assert TrainConfig(conditioning="label_route", route_without_steering=True).route_without_steering


def test_route_without_leaning_leaves_out_prompts_that_lean_but_do_not_steer(caplog):
    import logging
    from dataclasses import replace

    from qpo_middleware.training.config import TrainConfig, TrainConfigError
    from qpo_middleware.training.dataset import steering_prompts
    from qpo_middleware.training.policy import label_route_data
    from qpo_middleware.training.tasks import LEAN_REACH

    # 5 pos and 5 neg queries, three prompts scored on each (a wrong answer is the other label). A: right on 4 of 5
    # pos and every neg (answers pos 4/10); D: right on every pos and 3 of 5 neg (pos 7/10: leans, 75% would steer);
    # E: right on 3 of 5 pos and 2 of 5 neg (pos 6/10).
    right = {"A": ([1, 1, 1, 1, 0], [1, 1, 1, 1, 1]), "D": ([1, 1, 1, 1, 1], [1, 1, 1, 0, 0]),
             "E": ([1, 1, 1, 0, 0], [1, 1, 0, 0, 0])}
    other = {"pos": "neg", "neg": "pos"}
    records = [replace(_scored(f"{label}{i}", prompt, bool(ok), 10.0 * ok), label=label,
                       prediction=label if ok else other[label])
               for prompt, by_label in right.items() for label, oks in zip(("pos", "neg"), by_label, strict=True)
               for i, ok in enumerate(oks)]
    assert steering_prompts(records) == {}
    assert steering_prompts(records, LEAN_REACH) == {"D": "pos"}

    def routes(**left_out: bool) -> dict[tuple[str, float], str]:
        out, values = label_route_data(records, **left_out)
        assert len(out) == 20  # every query keeps its two examples
        return {(r.label, v): r.prompt for r, v in zip(out, values, strict=True)}

    # D is pos's best prompt (5 of 5) and neither check that steering passes leaves it out; the lean check does.
    assert routes() == routes(without_steering=True) == {("pos", 1.0): "D", ("pos", 0.0): "E",
                                                          ("neg", 1.0): "A", ("neg", 0.0): "E"}
    with caplog.at_level(logging.INFO, logger="qpo_middleware.training.policy"):
        assert routes(without_leaning=True) == {("pos", 1.0): "A", ("pos", 0.0): "E", ("neg", 1.0): "A",
                                                ("neg", 0.0): "E"}
    assert "1 of 3 prompts lean the target" in caplog.text
    assert "label_route: routes neg -> 'A'; pos -> 'A'" in caplog.text  # the user sees where each label goes
    # A labelled query with no verdict (route_queries) gets its label's two routes and changes no route: a pos
    # query with a verdict that would make D pos's worst prompt is not counted.
    more = [replace(records[0], query_id="x1", query="more", label="neg", prompt="D", correct=False),
            replace(records[0], query_id="x2", query="more", label="pos", prompt="D", correct=False)]
    out, values = label_route_data(records, without_leaning=True, route_queries=more)
    plain, _ = label_route_data(records, without_leaning=True)
    assert out[:20] == plain and [(r.query_id, r.prompt, v) for r, v in zip(out[20:], values[20:], strict=True)] == [
        ("x1", "A", 1.0), ("x1", "E", 0.0), ("x2", "A", 1.0), ("x2", "E", 0.0)]
    leaning_only = [replace(r, prompt="D") for r in records if r.prompt == "D"]
    with pytest.raises(ValueError, match="leans the target to one label.*route_without_leaning"):
        label_route_data(leaning_only, without_leaning=True)
    with pytest.raises(TrainConfigError, match="route_without_leaning only applies to --conditioning label_route"):
        TrainConfig(route_without_leaning=True)
    assert TrainConfig(conditioning="label_route", route_without_leaning=True).route_without_leaning


def test_best_assignment_is_the_best_one_to_one_assignment():
    import itertools

    from qpo_middleware.training.policy import best_assignment

    rng = random.Random(0)
    for rows, cols in ((1, 5), (3, 3), (4, 6), (5, 7)):
        for _ in range(20):
            gain = [[rng.choice([rng.random(), round(rng.random(), 1)]) for _ in range(cols)] for _ in range(rows)]
            got = best_assignment(gain)
            assert len(set(got)) == rows and all(0 <= j < cols for j in got)
            best = max(sum(gain[i][j] for i, j in enumerate(p)) for p in itertools.permutations(range(cols), rows))
            assert sum(gain[i][j] for i, j in enumerate(got)) == pytest.approx(best)
    # A column best for both rows goes to the row that loses more without it.
    assert best_assignment([[0.9, 0.8], [1.0, 0.2]]) == [1, 0]
    with pytest.raises(ValueError, match="rows <= columns"):
        best_assignment([[1.0], [2.0]])


def test_route_distinct_gives_each_label_its_own_top_route(caplog):
    import logging
    from dataclasses import replace

    from qpo_middleware.training.config import TrainConfig, TrainConfigError
    from qpo_middleware.training.policy import label_route_data, label_routes

    # 5 pos and 5 neg queries, three prompts on each. A is the best prompt for both labels (pos 5/5, neg 4/5, and
    # the best overall, so it wins neg's tie with B); B is as good on neg (4/5) but poor on pos (2/5); C is 3/5 on each.
    right = {"A": ([1, 1, 1, 1, 1], [1, 1, 1, 1, 0]), "B": ([1, 1, 0, 0, 0], [1, 1, 1, 1, 0]),
             "C": ([1, 1, 1, 0, 0], [1, 1, 1, 0, 0])}
    records = [replace(_scored(f"{label}{i}", prompt, bool(ok), 10.0 * ok), label=label)
               for prompt, by_label in right.items() for label, oks in zip(("pos", "neg"), by_label, strict=True)
               for i, ok in enumerate(oks)]
    assert label_routes(records) == {("pos", 1.0): "A", ("pos", 0.0): "B", ("neg", 1.0): "A", ("neg", 0.0): "C"}
    with caplog.at_level(logging.INFO, logger="qpo_middleware.training.policy"):
        routes = label_routes(records, distinct=True)
    # Distinct: pos keeps A (it loses most without it), neg gets B at no cost on D0; the worst routes stay.
    assert routes == {("pos", 1.0): "A", ("pos", 0.0): "B", ("neg", 1.0): "B", ("neg", 0.0): "C"}
    assert "distinct routes send neg to 'B'" in caplog.text and "instead of 'A'" in caplog.text
    out, values = label_route_data(records, distinct=True)
    assert {(r.label, r.prompt, v) for r, v in zip(out, values, strict=True)} == {
        ("pos", "A", 1.0), ("pos", "B", 0.0), ("neg", "B", 1.0), ("neg", "C", 0.0)}

    # Two prompts, A best for both labels: one label is forced onto its own worst prompt, so it trains on no worst.
    two = [r for r in records if r.prompt != "C"]
    assert label_routes(two, distinct=True) == {("pos", 1.0): "A", ("pos", 0.0): "B", ("neg", 1.0): "B"}
    # More labels than prompts to route among: refused, with the fix named.
    with pytest.raises(ValueError, match="there are none yet: run `qpo collect`"):
        label_routes([], without_leaning=True)
    with pytest.raises(ValueError, match="needs a prompt per label.*Grow the pool"):
        label_routes([r for r in records if r.prompt == "A"], distinct=True)
    with pytest.raises(TrainConfigError, match="route_distinct only applies to --conditioning label_route"):
        TrainConfig(route_distinct=True)
    assert TrainConfig(conditioning="label_route", route_distinct=True).route_distinct


def test_route_remap_weighs_what_a_misread_costs(caplog):
    import logging
    from dataclasses import replace

    from qpo_middleware.training.policy import label_routes, route_remap, route_table

    # 100 pos and 100 neg queries. P is right on 90 pos and 0 neg, N the mirror image, G on 70 of each; label
    # accuracies shrink a little towards each prompt's mean (P on pos: 0.883, on neg: 0.017). Routes: pos -> P,
    # neg -> N. With the policy reading the label a share r of the time (a misread sends the other label's route),
    # the routes score 0.883 r + 0.017 (1 - r) against G's 0.70 everywhere: they win above r = 0.789.
    right = {"P": (90, 0), "N": (0, 90), "G": (70, 70)}
    records = [replace(_scored(f"{label}{i}", prompt, i < ok, 10.0 * (i < ok)), label=label)
               for prompt, oks in right.items() for label, ok in zip(("pos", "neg"), oks, strict=True)
               for i in range(100)]
    assert {k: v for k, v in label_routes(records).items() if k[1] == 1.0} == {("pos", 1.0): "P", ("neg", 1.0): "N"}
    assert route_remap(records, 1.0) == {"P": "P", "N": "N"}
    assert route_remap(records, 0.8) == {"P": "P", "N": "N"}  # 0.710 > 0.700
    with caplog.at_level(logging.INFO, logger="qpo_middleware.training.policy"):
        assert route_remap(records, 0.75) == {"P": "G", "N": "G"}  # 0.666 < 0.700: the best single prompt
    assert "at a route read of 75%, the route 'P' sends 'G' instead" in caplog.text
    # Per query: the table route_remap reads, with the same accuracies and shares.
    table = route_table(records)
    assert table.labels == ("neg", "pos") and table.shares == (0.5, 0.5) and table.routes == ("N", "P")
    assert table.route_labels == ((0,), (1,)) and table.prompts == ("G", "N", "P")
    assert table.accuracy[1][2] == pytest.approx(0.883, abs=1e-3) and table.accuracy[0][2] == pytest.approx(0.017, abs=1e-3)
    # With the read set, the table serves that map query by query (a bundle carries it): only the top route counts,
    # however sure the scores (columns: N, P).
    scores = np.array([[0.0, 0.1], [0.0, 50.0], [3.0, 0.0]])
    for read, sent in ((0.8, ["P", "P", "N"]), (0.75, ["G", "G", "G"])):
        remapped = replace(table, read=read)
        assert [table.prompts[i] for i in remapped.pick(scores)] == sent
        # p(pos | top route P) = read: each label is half the queries, and a misread sends the other's route
        assert remapped.label_posterior(scores)[1] == pytest.approx([1 - read, read])
        assert type(table).from_dict(json.loads(json.dumps(remapped.to_dict()))) == remapped
    assert "read" not in table.to_dict()  # a posterior table's bundle file stays as it was
    with pytest.raises(ValueError, match=r"read must be None or a share in \[0, 1\]"):
        replace(table, read=1.2)
    # A share, so a number in [0, 1]; the error says what it is.
    with pytest.raises(ValueError, match=r"share of queries the policy sends their label's route.*got 1.5"):
        route_remap(records, 1.5)


@pytest.mark.real
def test_route_distinct_on_smollm2_verdicts_of_real_ag_news(real_data, smollm2_target):
    """Routes from SmolLM2's own verdicts on 24 real ag_news queries x 4 pool prompts: the distinct routes are a
    different prompt per topic, and no other one-to-one choice gets more of D0's queries right."""
    import itertools

    from qpo_middleware.training.dataset import Record
    from qpo_middleware.training.policy import label_accuracy, label_routes, route_remap, route_table
    from qpo_middleware.training.targets import Pair
    from qpo_middleware.training.tasks import get_task

    task = get_task("ag_news")
    queries = task.splits(real_data, seed=0, n_train=24, n_collect=0, n_test=0).train
    prompts = [p["text"] for p in task.prompt_pool()[:4]]
    pairs = [Pair(e, p) for e in queries for p in prompts]
    records = [Record(task="ag_news", query_id=pair.example.id, query=pair.example.query, prompt=pair.prompt,
                      prompt_source="pool", loop=0, target="hf:smollm2-135m-instruct", correct=score.correct,
                      reward=float(score.correct), prompt_mean_accuracy=0.0, label=task.gold_text(pair.example),
                      prediction=score.prediction)
               for pair, score in zip(pairs, smollm2_target.score(task, pairs), strict=True)]
    labels = sorted({r.label for r in records})
    assert len(labels) == 4
    top = {label: prompt for (label, value), prompt in label_routes(records, distinct=True).items() if value == 1.0}
    assert sorted(top) == labels and len(set(top.values())) == 4
    accuracy = label_accuracy(records)
    weight = {label: len({r.query_id for r in records if r.label == label}) for label in labels}

    def right(route: dict[str, str]) -> float:
        return sum(weight[label] * accuracy[(label, prompt)] for label, prompt in route.items())

    assert right(top) == pytest.approx(max(right(dict(zip(labels, p, strict=True)))
                                           for p in itertools.permutations(prompts)))

    # Served at the policy's read rate: the map from routes to prompts with the most expected right answers on D0
    # when a misread sends another topic's route in proportion to the topics' shares (checked against every map).
    share = {label: weight[label] / sum(weight.values()) for label in labels}

    def expected(serve: dict[str, str], read: float) -> float:
        return sum(share[label] * (read * accuracy[(label, serve[top[label]])] + (1 - read) * sum(
            share[other] / (1 - share[label]) * accuracy[(label, serve[top[other]])] for other in labels
            if other != label)) for label in labels)

    # The same table per query: a sure read of a topic sends the prompt most often right on that topic.
    table = route_table(records, distinct=True)
    assert sorted(table.routes) == sorted(top.values()) and set(table.prompts) == set(prompts)
    for label in labels:
        sure = np.array([[50.0 if route == top[label] else 0.0 for route in table.routes]])
        assert table.prompts[table.pick(sure)[0]] == max(prompts, key=lambda p: accuracy[(label, p)])

    for read in (1.0, 0.6, 0.25):
        served = route_remap(records, read, distinct=True)
        assert sorted(served) == sorted(top.values()) and set(served.values()) <= set(prompts)
        assert expected(served, read) == pytest.approx(max(
            expected(dict(zip(sorted(served), combo, strict=True)), read)
            for combo in itertools.product(prompts, repeat=len(served))))


def test_build_examples_uses_the_conditioning_values(policy):
    _, tokenizer, fmt = policy
    records = [_scored("q1", "Be brief.", True, 1.0), _scored("q1", "Say it.", False, 30.0)]
    ranks = RewardBuckets.even(4)
    first, second = build_examples(records, tokenizer, fmt, ranks)
    assert first.input_ids[0] == fmt.reward_token_ids[3]  # correct: rank 1.0 although its reward is lower
    assert second.input_ids[0] == fmt.reward_token_ids[0]
    given = build_examples(records, tokenizer, fmt, ranks, values=[0.3, 0.6])
    assert [e.input_ids[0] for e in given] == [fmt.reward_token_ids[1], fmt.reward_token_ids[2]]
    with pytest.raises(ValueError, match="conditioning values"):
        build_examples(records, tokenizer, fmt, ranks, values=[0.3])


# --- examples -----------------------------------------------------------------


def test_build_examples_supervises_only_the_prompt_and_eos(policy):
    _, tokenizer, fmt = policy
    records = make_records(16)
    buckets = RewardBuckets.from_rewards([r.reward for r in records], 4)
    examples = build_examples(records, tokenizer, fmt, buckets)
    assert len(examples) == len(records)

    truncated = 0
    for record, example in zip(records, examples, strict=True):
        query = tokenizer(record.query, add_special_tokens=False)["input_ids"]
        truncated += len(query) > 5
        prompt = tokenizer(record.prompt, add_special_tokens=False)["input_ids"] if record.prompt else []
        context = [fmt.reward_token_ids[buckets.bucket(record.reward)], *query[:5], fmt.separator_ids[0]]
        target = [*prompt[:6], tokenizer.eos_token_id]
        assert example.input_ids == context + target
        assert example.labels == [IGNORE_INDEX] * len(context) + target
        # The reward token opens the sequence and is the record's bucket's token.
        assert example.input_ids[0] == fmt.reward_token_ids[buckets.bucket(record.reward)]
        assert len(example.input_ids) - len(target) == 1 + min(len(query), 5) + 1
    assert truncated > 0  # most made-up queries are longer than the cap of 5 tokens
    assert any(len(e.labels) - e.labels.count(IGNORE_INDEX) == 7 for e in examples)  # 6-token cap + eos


def test_build_examples_empty_prompt_targets_eos_or_is_dropped(policy):
    _, tokenizer, fmt = policy
    records = [r for r in make_records(16) if not r.prompt][:2] + [r for r in make_records(16) if r.prompt][
        :1
    ]
    buckets = RewardBuckets.from_rewards([r.reward for r in records], 4)

    kept = build_examples(records, tokenizer, fmt, buckets)
    supervised = [[t for t in e.labels if t != IGNORE_INDEX] for e in kept]
    assert supervised[0] == [tokenizer.eos_token_id] and supervised[1] == [tokenizer.eos_token_id]
    assert len(build_examples(records, tokenizer, fmt, buckets, include_empty=False)) == 1


def test_build_examples_rejects_a_bucket_count_mismatch(policy):
    _, tokenizer, fmt = policy
    with pytest.raises(PolicyDataError, match="num_buckets"):
        build_examples(make_records(4), tokenizer, fmt, RewardBuckets(edges=[0.0]))


def test_collate_right_pads():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
