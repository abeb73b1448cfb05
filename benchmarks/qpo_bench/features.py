"""Query features read from the untrained policy base: each query's hidden state at a few layers, averaged over its
tokens (padding masked out) and standardised on the train queries. Shared by ``benchmarks/label_router.py`` (a
linear probe of the label) and ``benchmarks/choice_head.py`` (a per-prompt success head).

With the recipes' ``trainable: top:4`` the layers below the top four are frozen, so at those layers the trained
policy's hidden states are the base's: a head on them can be served from the shipped policy.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

POLICY_LAYER_FRACTIONS = (1 / 3, 1 / 2, 2 / 3, 1.0)  # of the base's depth; callers choose the layer on dev


def hidden_features(texts: list[str], model: Any, tokenizer: Any, layers: tuple[int, ...], max_tokens: int = 64,
                    batch_size: int = 16, kind: str = "hidden") -> dict[int, np.ndarray]:
    """Per layer, each text's vectors averaged over its tokens (padding masked out): ``layer -> (n, d)``.

    ``kind="hidden"``: the hidden state after decoder layer ``layer`` (``hidden_states[layer]``).
    ``kind="values"``: the attention *value* vectors decoder layer ``layer`` (1-based) computes, all KV heads
    concatenated (``n_kv_heads * head_dim``): a fixed linear map of the normalised hidden state entering that
    layer, without position encoding. They sit in the KV cache the runtime already fills for the query, so a head
    on them needs no other model output.
    """
    import torch

    if kind not in ("hidden", "values"):
        raise ValueError(f"kind must be 'hidden' or 'values', not {kind!r}.")
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    # Batches of similar length pad less: read the texts shortest first, then put the rows back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for number, start in enumerate(range(0, len(texts), batch_size), start=1):
        batch = tokenizer([texts[i] for i in order[start:start + batch_size]], return_tensors="pt", padding=True,
                          truncation=True, max_length=max_tokens)
        with torch.no_grad():
            result = model(**batch, output_hidden_states=kind == "hidden", use_cache=kind == "values")
        mask = batch["attention_mask"].to(torch.float32)
        for layer in layers:
            if kind == "hidden":
                vectors = result.hidden_states[layer]  # (B, T, d)
            else:
                values = result.past_key_values.to_legacy_cache()[layer - 1][1]  # (B, kv heads, T, head dim)
                vectors = values.transpose(1, 2).reshape(values.shape[0], values.shape[2], -1)
            weights = mask.unsqueeze(-1).to(vectors.dtype)
            out[layer].append(((vectors * weights).sum(1) / weights.sum(1)).float().numpy())
        if number % 50 == 0:
            logger.info("features: %d of %d texts read", min(start + batch_size, len(texts)), len(texts))
    restore = np.argsort(np.array(order, dtype=np.int64))
    return {layer: np.concatenate(chunks)[restore] if chunks else np.zeros((0, 0), dtype=np.float32)
            for layer, chunks in out.items()}


def policy_feature_sets(*splits: list[str], base: str | None = None, kinds: tuple[str, ...] = ("hidden",),
                        fractions: tuple[float, ...] = POLICY_LAYER_FRACTIONS,
                        max_tokens: int = 64) -> dict[str, tuple[np.ndarray, ...]]:
    """``"layer L"`` / ``"values L"`` -> (features of each split), for each of ``kinds`` (as in
    :func:`hidden_features`, each text cut to ``max_tokens``), from a local base model loaded once (default: the
    default policy base), standardised on the first split."""
    from qpo_middleware.training.models import DEFAULT_MODEL, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(base or DEFAULT_MODEL)
    model.eval()
    depth = model.config.num_hidden_layers
    layers = tuple(sorted({max(1, round(f * depth)) for f in fractions}))
    sets = {}
    for kind in kinds:
        states = [hidden_features(texts, model, tokenizer, layers, max_tokens, kind=kind) for texts in splits]
        for layer in layers:
            mean, std = states[0][layer].mean(0), states[0][layer].std(0) + 1e-6
            sets[f"{'layer' if kind == 'hidden' else 'values'} {layer}"] = tuple(
                (split[layer] - mean) / std for split in states)
    return sets
