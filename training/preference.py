"""Within-query preferences: DPO on (query, chosen prompt, rejected prompt) pairs from the scored records.

Return-conditioned supervised learning only imitates; it never tells the policy that prompt A fails on
this query while prompt B succeeds. D0 holds exactly such contrasts (several prompts scored per query),
so each query with at least one right and one wrong prompt gives preference pairs, and a DPO loss
(Rafailov et al., 2023) against a frozen reference (the policy the step starts from: this loop's supervised policy, or the
previous loop's when the step replaces the supervised one) trains on them:

    loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

Every sequence is the query conditioned on the top reward bucket (the state the policy is served in)
followed by the prompt, so the policy learns which prompt to write for this query when asked for the
best. :func:`dpo_loss` equals TRL's ``DPOTrainer.dpo_loss`` (``loss_type="sigmoid"``) on the same tensors.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from qpo_middleware.policy_format import PolicyFormat

from .dataset import Record
from .forward import FrozenLayerCache, supervised_logits
from .policy import IGNORE_INDEX, Example, collate, label_accuracy, prompt_example


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards ``beta * (log pi - log ref)`` of chosen and rejected.

    All inputs are (B,) sequence log-probabilities. ``label_smoothing`` > 0 is the conservative DPO
    variant (the preference label is wrong with that probability).
    """
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
              - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the supervised tokens' log-probabilities per row: (B, T, V) logits, (B, T) labels -> (B,).

    Position ``t`` predicts ``labels[:, t + 1]`` (labels aligned with the inputs, -100 where not supervised).
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    mask = shift_labels != IGNORE_INDEX
    picked = shift_labels.masked_fill(~mask, 0)
    token_logps = torch.log_softmax(shift_logits, dim=-1).gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=-1)


@dataclass(frozen=True)
class PreferencePair:
    """On ``chosen.query``, ``chosen`` scored above ``rejected`` (without label smoothing: right over wrong)."""

    chosen: Record
    rejected: Record


MIN_GAP = 0.1  # a smoothed pair needs its chosen prompt this much above the rejected one


def preference_pairs(records: Sequence[Record], pairs_per_query: int, seed: int = 0,
                     label_smoothing: float = 0.0, exclude_chosen: Collection[str] = ()) -> list[PreferencePair]:
    """(better, worse) prompt pairs on the same query, at most ``pairs_per_query`` per query (seeded draw).

    A prompt's score on a query is ``(1 - w) * right + w * label accuracy`` with ``w = label_smoothing``:
    the label accuracy (:func:`label_accuracy`) is how often the prompt is right on the scored queries that
    share this query's gold label, which denoises a small target's per-query verdicts (a prompt that leans
    towards the query's label is right on most such queries, not only on this one). A pair needs the chosen
    score at least :data:`MIN_GAP` above the rejected one. With ``w = 0`` (the default) that is every
    (right, wrong) combination, so only queries with a right and a wrong prompt give pairs; with ``w > 0``
    two right (or two wrong) prompts pair too, by how well they suit the label. Pairs are drawn without
    replacement, and a prompt scored twice on a query (in two loops) counts once. A prompt in ``exclude_chosen``
    is never the chosen side (it stays a rejected one): the policy is not taught to prefer it.
    """
    if pairs_per_query < 1:
        raise ValueError(f"pairs_per_query must be >= 1; got {pairs_per_query}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}.")
    by_query: dict[str, dict[str, Record]] = {}
    for record in records:
        by_query.setdefault(record.query_id, {}).setdefault(record.prompt, record)
    by_label = label_accuracy(records) if label_smoothing > 0 else {}

    def score(record: Record) -> float:
        label_part = by_label[(record.label, record.prompt)] if label_smoothing > 0 else 0.0
        return (1.0 - label_smoothing) * float(record.correct) + label_smoothing * label_part

    rng = random.Random(seed)
    out: list[PreferencePair] = []
    for query_id in sorted(by_query):
        scored = [(r, score(r)) for r in by_query[query_id].values()]
        combos = [(c, w) for c, sc in scored for w, sw in scored
                  if sc - sw >= MIN_GAP and c.prompt not in exclude_chosen]
        for chosen, rejected in rng.sample(combos, min(pairs_per_query, len(combos))):
            out.append(PreferencePair(chosen, rejected))
    return out


@dataclass
class PreferenceExample:
    """A pair as token sequences (same context: query + top reward token) with the reference's log-probs."""

    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def _tokenizer_fn(tokenizer: Any) -> Any:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def preference_examples(pairs: Sequence[PreferencePair], tokenizer: Any, fmt: PolicyFormat) -> list[PreferenceExample]:
    """Both prompts of each pair after the query conditioned on the top reward bucket."""
    tokenize, top = _tokenizer_fn(tokenizer), len(fmt.reward_token_ids) - 1
    return [PreferenceExample(prompt_example(fmt, tokenize, p.chosen.query, p.chosen.prompt, top),
                              prompt_example(fmt, tokenize, p.rejected.query, p.rejected.prompt, top))
            for p in pairs]


@torch.no_grad()
def examples_logps(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int = 32,
                   cache: FrozenLayerCache | None = None) -> torch.Tensor:
    """Each example's supervised-token log-probability under ``model``, in eval mode, on the CPU: (N,).

    ``cache`` (built on ``model``) keeps the frozen layers' output for the fine-tune that follows.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Batches of similar lengths waste little on padding; the result is put back in the given order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = torch.zeros(len(examples))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in rows], pad_id).items()}
            logits, batch = supervised_logits(model, batch, cache)
            out[rows] = sequence_logps(logits, batch["labels"]).float().cpu()
    finally:
        model.train(was_training)
    return out


def with_reference_logps(model: Any, examples: Sequence[PreferenceExample], pad_id: int,
                         batch_size: int = 16, cache: FrozenLayerCache | None = None) -> list[PreferenceExample]:
    """``examples`` with ``ref_chosen`` / ``ref_rejected`` from ``model`` (the frozen reference)."""
    n = len(examples)
    logps = examples_logps(model, [e.chosen for e in examples] + [e.rejected for e in examples], pad_id,
                           batch_size=2 * batch_size, cache=cache)
    return [replace(e, ref_chosen=float(c), ref_rejected=float(r))
            for e, c, r in zip(examples, logps[:n], logps[n:], strict=True)]


@dataclass(frozen=True)
class PreferenceObjective:
    """DPO as a :func:`~.trainer.train_policy` objective: one batch holds the chosen rows, then the rejected."""

    beta: float = 0.1
    label_smoothing: float = 0.0

    def collate(self, items: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate([e.chosen for e in items] + [e.rejected for e in items], pad_id)
        batch["ref_chosen"] = torch.tensor([e.ref_chosen for e in items], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e.ref_rejected for e in items], dtype=torch.float32)
        return batch

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps = sequence_logps(logits, batch["labels"])
        n = batch["ref_chosen"].shape[0]
        losses, _, _ = dpo_loss(logps[:n], logps[n:], batch["ref_chosen"].to(logps.device),
                                batch["ref_rejected"].to(logps.device), self.beta, self.label_smoothing)
        return losses.mean()


@torch.no_grad()
def candidate_logps(model: Any, tokenizer: Any, fmt: PolicyFormat, queries: Sequence[str],
                    prompts: Sequence[str], buckets: Sequence[int]) -> torch.Tensor:
    """``log p(prompt | bucket, query)`` (prompt tokens and eos) of every candidate prompt for every query,
    under each reward bucket: shape ``(len(buckets), len(queries), len(prompts))``.

    Choosing among known prompts (a logged set, or the policy's own samples) by this score is decoding
    constrained to those prompts: the exact most likely one, not a greedy approximation. Per query, the
    contexts (one per bucket, all the same length) run once and their KV cache is shared by every prompt,
    so the query is not re-read for each candidate.
    """
    if not queries or not prompts or not buckets:
        return torch.zeros(len(buckets), len(queries), len(prompts))
    tokenize = _tokenizer_fn(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.eos_token_ids[0]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_buckets, n_prompts = len(buckets), len(prompts)
    out = torch.zeros(n_buckets, len(queries), n_prompts)
    try:
        for q, query in enumerate(queries):
            rows = [prompt_example(fmt, tokenize, query, prompt, bucket) for bucket in buckets for prompt in prompts]
            width = rows[0].labels.count(IGNORE_INDEX)  # the context: the same for every row of a bucket
            contexts = torch.tensor([rows[b * n_prompts].input_ids[:width] for b in range(n_buckets)], device=device)
            first = model(input_ids=contexts, use_cache=True)
            cache = first.past_key_values
            cache.batch_repeat_interleave(n_prompts)  # (buckets,) -> (buckets * prompts,), bucket-major like rows
            targets = [row.input_ids[width:] for row in rows]
            length = max(len(t) for t in targets)
            ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
            mask = torch.zeros(len(rows), length, dtype=torch.long)
            for i, target in enumerate(targets):
                ids[i, : len(target)], mask[i, : len(target)] = torch.tensor(target), 1
            attention = torch.cat([torch.ones(len(rows), width, dtype=torch.long), mask], dim=1)
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), past_key_values=cache).logits
            # Token 0 is predicted by the context's last position, token i by the prompt's position i - 1.
            logits = torch.cat([first.logits[:, -1:].repeat_interleave(n_prompts, dim=0), logits[:, :-1]], dim=1)
            logits = logits.float()
            picked = logits.gather(-1, ids.to(device).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            out[:, q] = (picked.cpu() * mask).sum(-1).reshape(n_buckets, n_prompts)
    finally:
        model.train(was_training)
    return out


def implicit_rewards(model: Any, tokenizer: Any, fmt: PolicyFormat, query: str, prompts: Sequence[str]) -> list[float]:
    """The policy's own score of each candidate prompt for ``query``: how much more likely the top reward
    token makes it than the bottom one, ``log p(prompt | top, query) - log p(prompt | bottom, query)``
    (prompt tokens and eos). Best-of-n with no extra model: sample n prompts, send the highest."""
    if not prompts:
        return []
    top, bottom = candidate_logps(model, tokenizer, fmt, [query], prompts, (len(fmt.reward_token_ids) - 1, 0))
    return (top[0] - bottom[0]).tolist()
