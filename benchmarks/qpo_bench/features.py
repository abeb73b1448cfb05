"""Query features read from the untrained policy base: each query's hidden state at a few layers, averaged over its
tokens (padding masked out) and standardised on the train queries. Shared by ``benchmarks/label_router.py`` (a
linear probe of the label) and ``benchmarks/choice_head.py`` (a per-prompt success head).

With the recipes' ``trainable: top:4`` the layers below the top four are frozen, so at those layers the trained
policy's hidden states are the base's: a head on them can be served from the shipped policy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

POLICY_LAYER_FRACTIONS = (1 / 3, 1 / 2, 2 / 3, 1.0)  # of the base's depth; callers choose the layer on dev


def hidden_features(texts: list[str], model: Any, tokenizer: Any, layers: tuple[int, ...], max_tokens: int = 64,
                    batch_size: int = 16) -> dict[int, np.ndarray]:
    """Per layer, each text's hidden state averaged over its tokens (padding masked out): ``layer -> (n, d)``."""
    import torch

    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_tokens)
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).to(states[0].dtype)
        for layer in layers:
            out[layer].append(((states[layer] * mask).sum(1) / mask.sum(1)).float().numpy())
    return {layer: np.concatenate(chunks) for layer, chunks in out.items()}


def policy_feature_sets(*splits: list[str], fractions: tuple[float, ...] = POLICY_LAYER_FRACTIONS,
                        ) -> dict[str, tuple[np.ndarray, ...]]:
    """``"layer L" -> (features of each split)`` from the default policy base; standardised on the first split."""
    from qpo_middleware.training.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer()
    model.eval()
    depth = model.config.num_hidden_layers
    layers = tuple(sorted({max(1, round(f * depth)) for f in fractions}))
    states = [hidden_features(texts, model, tokenizer, layers) for texts in splits]
    sets = {}
    for layer in layers:
        mean, std = states[0][layer].mean(0), states[0][layer].std(0) + 1e-6
        sets[f"layer {layer}"] = tuple((split[layer] - mean) / std for split in states)
    return sets
