"""The within-query preference lever: DPO loss, pairs, sequence log-probs, and the loops' preference step."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _tiny_policy import load_tokenizer, tiny_model

from qpo_middleware.training.dataset import Record
from qpo_middleware.training.policy import add_policy_tokens, collate
from qpo_middleware.training.preference import (
    PreferenceObjective,
    dpo_loss,
    label_accuracy,
    preference_examples,
    preference_pairs,
    sequence_logps,
    with_reference_logps,
)


def test_dpo_loss_matches_a_hand_worked_value() -> None:
    # logits = (-1 - -3) - (-2 - -2) = 2; loss = -log sigmoid(0.1 * 2) = log(1 + e^-0.2)
    losses, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                        torch.tensor([-2.0]), beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-7)
    assert losses.item() == pytest.approx(0.5981389, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)
    # Policy == reference: log 2 whatever the log-probs.
    same = torch.tensor([-5.0, -0.5])
    assert dpo_loss(same, same - 1, same, same - 1)[0].tolist() == pytest.approx([math.log(2)] * 2)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_loss_equals_trls_on_the_same_tensors(label_smoothing: float) -> None:
    from trl import DPOTrainer
    from trl.trainer.dpo_config import FDivergenceType

    generator = torch.Generator().manual_seed(0)
    tensors = [-10 * torch.rand(32, generator=generator) for _ in range(4)]
    trainer = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), reference_free=False,
                              f_divergence_type=FDivergenceType.REVERSE_KL, f_divergence_params=None, beta=0.3,
                              label_smoothing=label_smoothing, loss_type="sigmoid")
    expected = DPOTrainer.dpo_loss(trainer, *tensors, loss_type="sigmoid")
    ours = dpo_loss(*tensors, beta=0.3, label_smoothing=label_smoothing)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sequence_logps_sums_only_the_supervised_tokens() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    logprobs = torch.log_softmax(logits, -1)
    expected = [logprobs[0, 1, 3] + logprobs[0, 2, 4], logprobs[1, 0, 1] + logprobs[1, 1, 2] + logprobs[1, 2, 6]
                + logprobs[1, 3, 0]]
    torch.testing.assert_close(sequence_logps(logits, labels), torch.stack(expected))


def _record(query_id: str, prompt: str, correct: bool, loop: int = 0) -> Record:
    return Record(task="sst2", query_id=query_id, query=f"the movie {query_id} was fine .", prompt=prompt,
                  prompt_source="pool:x", loop=loop, target="t", correct=correct, reward=10.0 * correct,
                  prompt_mean_accuracy=0.5)


def test_preference_pairs_are_right_vs_wrong_on_the_same_query() -> None:
    records = [_record("q1", "A", True), _record("q1", "B", False), _record("q1", "C", False),
               _record("q1", "D", True), _record("q2", "A", True), _record("q2", "B", True),  # no contrast
               _record("q3", "A", False), _record("q3", "E", True, loop=2), _record("q3", "E", True, loop=3)]
    pairs = preference_pairs(records, pairs_per_query=3, seed=0)
    assert all(p.chosen.correct and not p.rejected.correct and p.chosen.query_id == p.rejected.query_id
               for p in pairs)
    per_query = {q: [p for p in pairs if p.chosen.query_id == q] for q in ("q1", "q2", "q3")}
    assert len(per_query["q1"]) == 3 and len({(p.chosen.prompt, p.rejected.prompt) for p in per_query["q1"]}) == 3
    assert per_query["q2"] == [] and len(per_query["q3"]) == 1  # E scored in two loops counts once
    assert preference_pairs(records, 3, seed=0) == pairs  # seeded
    assert len(preference_pairs(records, 100)) == 2 * 2 + 1
    with pytest.raises(ValueError, match="pairs_per_query"):
        preference_pairs(records, 0)
    # A prompt left out of the chosen side still serves as a rejected one: q1 keeps D over B and C.
    kept = preference_pairs(records, 100, exclude_chosen={"A"})
    assert sorted((p.chosen.query_id, p.chosen.prompt, p.rejected.prompt) for p in kept) == [
        ("q1", "D", "B"), ("q1", "D", "C"), ("q3", "E", "A")]


def test_label_smoothed_pairs_rank_prompts_by_their_accuracy_on_the_querys_label() -> None:
    def rec(query_id: str, label: str, prompt: str, correct: bool) -> Record:
        return Record(**{**_record(query_id, prompt, correct).to_dict(), "label": label})

    verdicts = {"q1": ("pos", True, True), "q2": ("pos", True, False), "q5": ("pos", True, False),
                "q3": ("neg", False, True), "q4": ("neg", False, True)}
    records = [rec(q, label, prompt, ok) for q, (label, a, b) in verdicts.items()
               for prompt, ok in (("A", a), ("B", b))]
    # A: 3 of 5 right overall, all 3 on pos; B: 3 of 5, 2 of them on neg. Shrunk by 4 pseudo-records of 0.6:
    accuracy = label_accuracy(records + [records[0]])  # a record repeated counts once
    assert accuracy[("pos", "A")] == pytest.approx((3 + 2.4) / 7) and accuracy[("pos", "B")] == pytest.approx(3.4 / 7)
    assert accuracy[("neg", "A")] == pytest.approx(2.4 / 6) and accuracy[("neg", "B")] == pytest.approx(4.4 / 6)

    plain = preference_pairs(records, 5)
    assert {p.chosen.query_id for p in plain} == {"q2", "q5", "q3", "q4"}  # q1: both right, no pair
    smoothed = preference_pairs(records, 5, label_smoothing=0.5)
    by_query = {p.chosen.query_id: (p.chosen.prompt, p.rejected.prompt) for p in smoothed}
    # q1: both right, but A suits pos better (0.5 + 0.5 * 0.771 vs 0.5 + 0.5 * 0.486: a gap of 0.14 >= 0.1).
    assert len(smoothed) == 5 and by_query == {"q1": ("A", "B"), "q2": ("A", "B"), "q5": ("A", "B"),
                                               "q3": ("B", "A"), "q4": ("B", "A")}
    # Two right prompts equally suited to the label make no pair.
    assert preference_pairs([rec("q9", "pos", "A", True), rec("q9", "pos", "C", True)], 5, label_smoothing=1.0) == []
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_pairs(records, 1, label_smoothing=1.5)


def test_dpo_steps_raise_the_chosen_prompts_margin_on_a_tiny_policy(tmp_path: Path) -> None:
    from qpo_middleware.training.config import TrainConfig
    from qpo_middleware.training.trainer import train_policy

    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer))
    fmt = add_policy_tokens(model, tokenizer, num_buckets=4, query_max_tokens=8, prompt_max_tokens=8)
    records = []
    for i in range(6):
        records += [_record(f"q{i}", "Answer with one word.", i % 2 == 0),
                    _record(f"q{i}", "Think about the tone first.", i % 2 == 1)]
    pairs = preference_pairs(records, 1)
    examples = with_reference_logps(model, preference_examples(pairs, tokenizer, fmt),
                                    tokenizer.pad_token_id)
    objective = PreferenceObjective(beta=0.5)
    batch = objective.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        assert objective.loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch).item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    # Both prompts follow the same context: the query after the top reward token.
    first = examples[0]
    context = first.chosen.labels.index(next(t for t in first.chosen.labels if t != -100))
    assert first.chosen.input_ids[0] == fmt.reward_token_ids[-1]
    assert first.chosen.input_ids[:context] == first.rejected.input_ids[:context]

    config = TrainConfig(epochs=30, batch_size=6, learning_rate=5e-3, warmup_ratio=0.0, save_checkpoints=False,
                         num_buckets=4)
    result = train_policy(model, tokenizer, examples, config, tmp_path, objective=objective)
    assert result.last_loss < result.first_loss
    with torch.no_grad():
        both = collate([e.chosen for e in examples] + [e.rejected for e in examples], tokenizer.pad_token_id)
        logps = sequence_logps(model(input_ids=both["input_ids"], attention_mask=both["attention_mask"]).logits,
                               both["labels"])
    n = len(examples)
    margins = (logps[:n] - batch["ref_chosen"]) - (logps[n:] - batch["ref_rejected"])
    assert (margins > 0).all(), margins  # every pair: the right prompt gained on the wrong one


def test_implicit_reward_is_the_top_vs_bottom_token_log_ratio() -> None:
    from qpo_middleware.training.preference import implicit_rewards

    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer)).eval()
    fmt = add_policy_tokens(model, tokenizer, num_buckets=4, query_max_tokens=8, prompt_max_tokens=6)
    query, prompts = "a gorgeous , witty movie .", ["Classify the review.", "", "Answer positive or negative now."]
    scores = implicit_rewards(model, tokenizer, fmt, query, prompts)

    def logp(bucket: int, prompt: str) -> float:  # one sequence at a time, no padding
        context = fmt.encode(query, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], bucket)
        target = tokenizer(prompt, add_special_tokens=False)["input_ids"][:6] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([context + target])).logits[0], -1)
        return sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(target))

    expected = [logp(3, p) - logp(0, p) for p in prompts]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert implicit_rewards(model, tokenizer, fmt, query, []) == []


def test_candidate_logps_score_every_query_prompt_and_bucket_in_place() -> None:
    """One shared context per (query, bucket), prompts of different lengths: each score equals the one-sequence value."""
    from qpo_middleware.training.preference import candidate_logps

    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer)).eval()
    fmt = add_policy_tokens(model, tokenizer, num_buckets=4, query_max_tokens=8, prompt_max_tokens=6)
    tokenize = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    queries = ["a gorgeous , witty movie .", "dull"]
    prompts = ["Classify the review in one word please.", "", "Sentiment?"]
    scores = candidate_logps(model, tokenizer, fmt, queries, prompts, (3, 1))
    assert scores.shape == (2, 2, 3)
    for b, bucket in enumerate((3, 1)):
        for q, query in enumerate(queries):
            for p, prompt in enumerate(prompts):
                context = fmt.encode(query, tokenize, bucket)
                target = tokenize(prompt)[:6] + [tokenizer.eos_token_id]
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(torch.tensor([context + target])).logits[0], -1)
                expected = sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(target))
                assert scores[b, q, p].item() == pytest.approx(expected, abs=1e-4), (bucket, query, prompt)
