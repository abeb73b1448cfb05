"""The torch-side policy decode: left padding, plain and guided decoding on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from _tiny_policy import QUERIES, load_tokenizer, tiny_model

from qpo_middleware.bundle import GenerationConfig
from qpo_middleware.text import finish_prompt, special_token_strings
from qpo_middleware.training.policy import add_policy_tokens
from qpo_middleware.training.sampling import generate_prompts, left_pad


@pytest.fixture(scope="module")
def policy():
    """(model, tokenizer, fmt): a tiny random policy with 4 reward buckets."""
    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer), seed=3)
    fmt = add_policy_tokens(model, tokenizer, num_buckets=4, query_max_tokens=12, prompt_max_tokens=6)
    model.eval()
    return model, tokenizer, fmt


def tokenize_with(tokenizer):  # noqa: ANN001, ANN201
    return lambda text: tokenizer(text, add_special_tokens=False).input_ids


def finish(tokenizer, ids: list[int], generation: GenerationConfig) -> str:  # noqa: ANN001
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return finish_prompt(text, special_token_strings(tokenizer), generation.max_new_tokens)


@torch.no_grad()
def guided_greedy_reference(model, fmt, query_ids: list[int], generation: GenerationConfig,  # noqa: ANN001
                            weight: float, bucket: int) -> list[int]:
    """Guided greedy decoding by hand: one query, no padding, no cache, every step from the full context."""
    conditional, negative = fmt.input_ids(query_ids), fmt.input_ids(query_ids, bucket)
    out: list[int] = []
    for _ in range(generation.max_new_tokens):
        top = torch.log_softmax(model(torch.tensor([conditional + out])).logits[0, -1].float(), dim=-1)  # (V,)
        low = torch.log_softmax(model(torch.tensor([negative + out])).logits[0, -1].float(), dim=-1)  # (V,)
        scores = top + weight * (top - low)
        scores[list(generation.suppress_token_ids)] = float("-inf")
        token = int(scores.argmax())
        out.append(token)
        if token in fmt.eos_token_ids:
            break
    return out


def test_left_pad_puts_tokens_right_and_masks_the_padding() -> None:
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_plain_greedy_is_the_unbatched_greedy_and_guidance_zero_changes_nothing(policy) -> None:  # noqa: ANN001
    model, tokenizer, fmt = policy
    greedy = GenerationConfig.for_policy(fmt)
    batched = generate_prompts(model, tokenizer, fmt, QUERIES, greedy, batch_size=3)  # left padding inside batches
    assert [len(p) for p in batched] == [1] * len(QUERIES)
    for query, prompts in zip(QUERIES, batched, strict=True):
        ids = fmt.encode(query, tokenize_with(tokenizer))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=greedy.max_new_tokens, do_sample=False,
                                 eos_token_id=list(fmt.eos_token_ids), pad_token_id=fmt.pad_token_id,
                                 suppress_tokens=list(greedy.suppress_token_ids))
        assert prompts == [finish(tokenizer, out[0, len(ids):].tolist(), greedy)]
    assert generate_prompts(model, tokenizer, fmt, QUERIES, greedy, guidance=0.0, guidance_bucket=1) == batched


def test_guided_first_token_is_the_hand_computed_argmax(policy) -> None:  # noqa: ANN001
    model, tokenizer, fmt = policy
    one = GenerationConfig.for_policy(fmt, max_new_tokens=1)
    weight, bucket = 3.0, 0
    plain = generate_prompts(model, tokenizer, fmt, QUERIES, one)
    guided = generate_prompts(model, tokenizer, fmt, QUERIES, one, guidance=weight, guidance_bucket=bucket)
    changed = 0
    for query, got, unguided in zip(QUERIES, guided, plain, strict=True):
        query_ids = fmt.query_ids(query, tokenize_with(tokenizer))
        with torch.no_grad():
            top = model(torch.tensor([fmt.input_ids(query_ids)])).logits[0, -1].float()  # (V,)
            low = model(torch.tensor([fmt.input_ids(query_ids, bucket)])).logits[0, -1].float()  # (V,)
        scores = (1 + weight) * torch.log_softmax(top, -1) - weight * torch.log_softmax(low, -1)
        scores[list(one.suppress_token_ids)] = float("-inf")
        expected = int(scores.argmax())
        assert got == [finish(tokenizer, [expected], one)]
        changed += got != unguided
    assert changed, "guidance changed no first token: the test would not tell guided from plain decoding"


def test_guided_greedy_matches_a_step_by_step_reference_in_batches(policy) -> None:  # noqa: ANN001
    model, tokenizer, fmt = policy
    greedy = GenerationConfig.for_policy(fmt)
    weight, bucket = 1.5, 1
    # batches of 3 mix query lengths (left padding)
    got = generate_prompts(model, tokenizer, fmt, QUERIES, greedy, batch_size=3, guidance=weight, guidance_bucket=bucket)
    # sampling from the top-1 token is greedy: two samples per query check that the negative rows are repeated
    top1 = generate_prompts(model, tokenizer, fmt, QUERIES, greedy.with_(do_sample=True, top_k=1), num_samples=2,
                            batch_size=3, guidance=weight, guidance_bucket=bucket)
    for query, prompts, samples in zip(QUERIES, got, top1, strict=True):
        reference = guided_greedy_reference(model, fmt, fmt.query_ids(query, tokenize_with(tokenizer)), greedy,
                                            weight, bucket)
        assert prompts == [finish(tokenizer, reference, greedy)]
        assert samples == prompts * 2
    with pytest.raises(ValueError, match="needs sampling"):
        generate_prompts(model, tokenizer, fmt, QUERIES, greedy, num_samples=2)


def test_guided_sampling_is_seeded_and_checks_its_arguments(policy) -> None:  # noqa: ANN001
    model, tokenizer, fmt = policy
    sampling = GenerationConfig.for_policy(fmt, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    first = generate_prompts(model, tokenizer, fmt, QUERIES[:4], sampling, num_samples=3, seed=7, guidance=1.0)
    assert [len(p) for p in first] == [3] * 4
    assert generate_prompts(model, tokenizer, fmt, QUERIES[:4], sampling, num_samples=3, seed=7, guidance=1.0) == first
    with pytest.raises(ValueError, match="guidance_bucket"):
        generate_prompts(model, tokenizer, fmt, QUERIES[:1], sampling, guidance=1.0, guidance_bucket=fmt.top_bucket)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        generate_prompts(model, tokenizer, fmt, QUERIES[:1], sampling, guidance=-1.0)
