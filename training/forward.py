"""The policy's forward pass for a loss: logits only where a token is supervised, frozen layers run once.

Both objectives (:func:`~.policy.qpo_loss`, :func:`~.preference.sequence_logps`) read the logits at the
positions that predict a supervised token (the prompt after the query), about a third of a row. Two savings
follow, and :func:`supervised_logits` applies both:

- **Logits at the supervised positions only.** The output projection and the float32 log-softmax over a
  49k-token vocabulary cost as much as several transformer layers per position; the causal LM is asked for
  the kept positions only (``logits_to_keep``), and the batch's labels are re-aligned to them.
- **Frozen layers once** (:class:`FrozenLayerCache`). With ``trainable="top:N"`` the embeddings and the
  layers below the top N never change during a fine-tune, so the hidden state entering the lowest trained
  layer is a fixed function of the tokens. The cache keeps it per token sequence; the reference pass of the
  preference step and every epoch after the first then run only the top N layers. Exact up to float
  rounding (the same operations on differently padded batches). Llama- and Qwen2-style models only, where
  the decoder stack can be re-entered at a layer through ``inputs_embeds``; other models run the full
  forward.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .policy import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Model types whose decoder re-enters at any layer from ``inputs_embeds`` with nothing applied on the way
# (no embedding scale, no per-position-in-stack state); tested in tests/test_forward.py.
CACHEABLE_MODEL_TYPES = ("llama", "qwen2")


def _supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that predict a supervised token (any row), and the labels re-aligned to them.

    Position ``t`` predicts ``labels[:, t + 1]``. The returned labels have one more column than there are
    kept positions, led by -100, so the objectives' usual shift (logits ``[:, :-1]`` against labels
    ``[:, 1:]``) pairs the k-th kept position with its target once a dummy last position is appended.
    """
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # (K,)
    lead = torch.full((labels.shape[0], 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    return keep, torch.cat([lead, labels[:, keep + 1]], dim=1)  # (K,), (B, K + 1)


@functools.cache
def _takes_logits_to_keep(model_class: type) -> bool:
    """Whether the class's forward takes ``logits_to_keep`` (read once per class, not per batch)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def supervised_logits(model: Any, batch: dict[str, torch.Tensor],
                      cache: FrozenLayerCache | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits for ``batch``'s supervised positions, and the batch with its labels re-aligned to them.

    Returns ``(logits, batch')``: ``logits`` is (B, K + 1, V), the K positions that predict a supervised
    token plus a zero column last; ``batch'`` is ``batch`` with ``labels`` (B, K + 1) such that the loss
    functions, which pair ``logits[:, t]`` with ``labels[:, t + 1]``, see exactly the supervised tokens.
    ``model`` may be a DDP wrapper (then without ``cache``).
    """
    keep, labels = _supervised_positions(batch["labels"])
    keep = keep.to(batch["input_ids"].device)
    if cache is not None:
        logits = cache.logits(batch["input_ids"], batch["attention_mask"], keep)
    elif _takes_logits_to_keep(type(getattr(model, "module", model))):  # (a DDP wrapper holds the model as .module)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=keep).logits  # (B, K, V)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, keep]
    logits = torch.cat([logits, logits.new_zeros(logits.shape[0], 1, logits.shape[2])], dim=1)
    return logits, {**batch, "labels": labels.to(logits.device)}


def _shell(module: torch.nn.Module, **children: torch.nn.Module) -> Any:
    """A shallow copy of ``module`` sharing every parameter, with some children replaced (the original untouched)."""
    shell = copy.copy(module)
    shell._modules = dict(module._modules)  # copy.copy shares the dict; setattr below must not reach the original
    for name, child in children.items():
        setattr(shell, name, child)
    return shell


class FrozenLayerCache:
    """The hidden states entering the lowest trained layer, per token sequence, for one fine-tune.

    Valid while the embeddings and the layers below ``split`` stay frozen: build one per
    :func:`~.trainer.train_policy` call (or per reference pass plus the fine-tune that follows it, on the
    same weights). ``max_bytes`` bounds the memory; sequences past it are recomputed each time.
    """

    def __init__(self, model: Any, top: int, max_bytes: int) -> None:
        base = model.base_model
        layers = base.layers
        self.split = len(layers) - top
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[tuple[int, ...], torch.Tensor] = {}
        # The stack below the split (its last hidden state, un-normalised) and the causal LM above it.
        self._lower = _shell(base, layers=torch.nn.ModuleList(layers[: self.split]), norm=torch.nn.Identity())
        upper = _shell(base, layers=torch.nn.ModuleList(layers[self.split :]))
        self._upper = _shell(model, **{model.base_model_prefix: upper})

    @torch.no_grad()
    def _entering(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Each row's hidden state entering layer ``split`` (real tokens only), from the store or computed."""
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [tuple(row[:n].tolist()) for row, n in zip(input_ids, lengths, strict=True)]
        missing = [i for i, key in enumerate(keys) if key not in self._store]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        computed: dict[int, torch.Tensor] = {}
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            hidden = self._lower(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                 use_cache=False).last_hidden_state  # (M, T, H)
            for j, i in enumerate(missing):
                computed[i] = hidden[j, : lengths[i]].detach().clone()
                size = computed[i].numel() * computed[i].element_size()
                if self.bytes + size <= self.max_bytes:
                    self._store[keys[i]] = computed[i]
                    self.bytes += size
        return [computed[i] if i in computed else self._store[key] for i, key in enumerate(keys)]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The causal LM's logits at positions ``keep`` (B, K, V), the frozen layers read from the store."""
        states = self._entering(input_ids, attention_mask)
        width = input_ids.shape[1]
        hidden = torch.stack([F.pad(s, (0, 0, 0, width - s.shape[0])) for s in states])  # (B, T, H), right-padded
        return self._upper(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=keep).logits


def frozen_layer_cache(model: Any, config: TrainConfig) -> FrozenLayerCache | None:
    """A :class:`FrozenLayerCache` for fine-tuning ``model`` under ``config``, or ``None`` where it would not be exact.

    It needs ``trainable="top:N"`` with the embeddings frozen (no ``train_policy_tokens``), a model type the
    cache is tested on and no attention dropout, and ``config.frozen_layer_cache_gib > 0``.
    """
    top, model_config = config.top_layers, model.config
    if (top is None or config.train_policy_tokens or config.frozen_layer_cache_gib <= 0
            or getattr(model_config, "model_type", None) not in CACHEABLE_MODEL_TYPES
            or top >= getattr(model_config, "num_hidden_layers", 0)
            or getattr(model_config, "attention_dropout", 0.0)):
        return None
    return FrozenLayerCache(model, top, int(config.frozen_layer_cache_gib * 2**30))
