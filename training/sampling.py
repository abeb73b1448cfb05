"""Policy decoding on the torch side: the one function that turns queries into policy prompts with ``generate``.

:func:`generate_prompts` is what the training loops sample with, what they score greedily, and what
the benchmarks' torch backend writes. It reads a query exactly as the runtime does
(:meth:`~qpo_middleware.policy_format.PolicyFormat.encode`), decodes with the one settings type
(:class:`~qpo_middleware.bundle.GenerationConfig`), and finishes the text with the runtime's rules
(:func:`~qpo_middleware.text.finish_prompt`): the prompt scored in training is the prompt served.

With ``guidance`` w > 0 it decodes with classifier-free guidance between the top reward bucket and
a lower one (:class:`RewardGuidance`)::

    scores = log p(. | top, query) + w * (log p(. | top, query) - log p(. | bucket, query))

:func:`left_pad` is the one left-padding helper of the torch side (the targets use it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qpo_middleware.bundle import GenerationConfig
from qpo_middleware.policy_format import PolicyFormat
from qpo_middleware.text import finish_prompt, special_token_strings


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows into ``(input_ids, attention_mask)``, both (rows, longest row), on the CPU."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, W)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, W), 1 on real tokens
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[index, width - len(row) :] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: 0 at each row's first real token (padding gets 0 too)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class RewardGuidance(LogitsProcessor):
    """Classifier-free guidance against a lower reward bucket, one decode step at a time.

    ``generate`` decodes the rows conditioned on the top bucket; this processor runs the same
    model on the same queries conditioned on ``negative_ids`` (another bucket), feeding it the
    tokens ``generate`` chose, and returns ``(1 + w) * log p(.|top) - w * log p(.|bucket)``.

    Written here rather than taken from transformers' ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
    (4.57), which does not repeat the negative rows for ``num_return_sequences`` > 1 and does not give
    left-padded negative rows their positions. The negative rows must be left-padded like the
    conditional ones and already repeated ``num_return_sequences`` times (``repeat_interleave``).
    """

    def __init__(self, model: Any, negative_ids: torch.Tensor, negative_mask: torch.Tensor, weight: float) -> None:
        self.model = model
        self.weight = float(weight)
        self._ids = negative_ids  # (N, W) on the model's device
        self._mask = negative_mask  # (N, W), grows by one column per step
        self._cache: Any = None
        self._last_position: torch.Tensor | None = None  # (N, 1)

    def _unconditional_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._last_position is None:  # first step: the whole negative context
            ids, positions = self._ids, position_ids(self._mask)
        else:  # later steps: the token generate just chose, one position on
            ids = input_ids[:, -1:]  # (N, 1)
            self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
            positions = self._last_position + 1
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True)
        self._cache, self._last_position = out.past_key_values, positions[:, -1:]
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (N, V)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        conditional = torch.log_softmax(scores.float(), dim=-1)  # (N, V); suppressed tokens stay -inf
        unconditional = self._unconditional_logprobs(input_ids)
        guided = conditional + self.weight * (conditional - unconditional)
        return guided.to(scores.dtype)


def generate_prompts(
    model: Any,
    tokenizer: Any,
    fmt: PolicyFormat,
    queries: Sequence[str],
    generation: GenerationConfig,
    *,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    guidance: float = 0.0,
    guidance_bucket: int = 0,
) -> list[list[str]]:
    """``num_samples`` prompts per query (in query order) from the policy conditioned on the top reward bucket.

    ``generation`` is usually ``GenerationConfig.for_policy(fmt)`` (greedy) or that ``.with_(do_sample=True,
    ...)``. ``guidance`` w > 0 guides the top bucket away from ``guidance_bucket`` (see :class:`RewardGuidance`);
    w = 0 is plain decoding. ``seed`` seeds torch's RNG once, before the first batch.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1; got {num_samples} and {batch_size}.")
    if num_samples > 1 and not generation.do_sample:
        raise ValueError(f"num_samples={num_samples} needs sampling: greedy decoding writes one prompt per query; "
                         "pass generation.with_(do_sample=True).")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0 (0 = no guidance); got {guidance}.")
    if guidance > 0 and not 0 <= guidance_bucket < fmt.top_bucket:
        raise ValueError(f"guidance_bucket must be a reward bucket below the top one (0..{fmt.top_bucket - 1}); "
                         f"got {guidance_bucket}.")

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    special = special_token_strings(tokenizer)  # the same strings the runtime strips
    device = next(model.parameters()).device
    sampling: dict[str, Any] = {}
    warpers: list[LogitsProcessor] = []
    if generation.do_sample:
        sampling = {"temperature": generation.temperature, "top_k": generation.top_k or None,
                    "top_p": generation.top_p}
        if guidance > 0:
            # generate() runs its own warpers before any processor passed in; guidance must come
            # first, so the warpers follow it here (in generate's order) and generate's are off.
            warpers = [TemperatureLogitsWarper(generation.temperature)]
            warpers += [TopKLogitsWarper(generation.top_k)] if generation.top_k else []
            warpers += [TopPLogitsWarper(generation.top_p)] if generation.top_p < 1 else []
            sampling = {"temperature": 1.0, "top_k": None, "top_p": 1.0}

    torch.manual_seed(seed)
    out: list[list[str]] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        query_ids = [fmt.query_ids(q, tokenize) for q in chunk]
        ids, mask = left_pad([fmt.input_ids(q) for q in query_ids], fmt.pad_token_id)  # (B, W)
        processors: list[LogitsProcessor] = []
        if guidance > 0:
            negative, negative_mask = left_pad([fmt.input_ids(q, guidance_bucket) for q in query_ids], fmt.pad_token_id)
            processors.append(RewardGuidance(
                model, negative.repeat_interleave(num_samples, dim=0).to(device),
                negative_mask.repeat_interleave(num_samples, dim=0).to(device), guidance))
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=generation.max_new_tokens,
                num_return_sequences=num_samples, eos_token_id=list(fmt.eos_token_ids), pad_token_id=fmt.pad_token_id,
                suppress_tokens=list(generation.suppress_token_ids) or None, do_sample=generation.do_sample,
                logits_processor=LogitsProcessorList(processors + warpers), **sampling,
            )  # (B * num_samples, W + new)
        # Decode exactly as the runtime does (no "clean-up" of spaces before punctuation): the text
        # scored in training is the text production sends.
        width = ids.shape[1]
        texts = [finish_prompt(tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                               special, generation.max_new_tokens) for row in generated[:, width:]]
        out.extend(texts[i * num_samples : (i + 1) * num_samples] for i in range(len(chunk)))
    return out
