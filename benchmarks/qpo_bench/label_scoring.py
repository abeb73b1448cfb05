"""The reference for :class:`~qpo_middleware.training.hf_target.HFTarget`'s label scoring.

One full sequence per (context, label), a forward pass with no cache over all of it and the
label's token log-probabilities summed: the way targets scored labels before the shared-prefix
scoring, kept as the equality check for the tests and the "before" of ``benchmarks/label_scoring.py``.
"""

from __future__ import annotations

from typing import Any


def full_sequence_label_logprobs(target: Any, contexts: list[list[int]], label_ids: list[list[int]]) -> Any:
    """log p(label | context) for every (context, label) by full-sequence forward passes: (batch, labels)."""
    import torch

    from qpo_middleware.training.sampling import left_pad, position_ids

    seqs = [ctx + label for ctx in contexts for label in label_ids]
    starts = [len(ctx) for ctx in contexts for _ in label_ids]
    ids, mask = left_pad(seqs, target.tokenizer.pad_token_id)
    with torch.inference_mode():
        logits = target._lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (rows, seq-1, vocab)
        token_lp = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (rows, seq-1)
    width = ids.shape[1]
    totals = []
    for row, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        offset = width - len(seq)  # left padding
        # token t (absolute position offset + t) is predicted at position offset + t - 1
        totals.append(token_lp[row, offset + start - 1 : offset + len(seq) - 1].sum())
    return torch.stack(totals).view(len(contexts), len(label_ids))
