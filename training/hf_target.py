"""A local Hugging Face causal LM as the target (default: the embedded SmolLM2).

Classification: each label is scored by the target's log-likelihood right after the rendered
input (chat template applied); the prediction is the most likely label. Math: greedy generation
with a token cap, final number parsed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .targets import Pair, Progress, Score, ScoreCache, cached_score
from .tasks import Task

logger = logging.getLogger(__name__)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def shared_prefix_length(contexts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``contexts`` share, leaving each at least one token of its own (the position
    its answer is read from)."""
    limit = min(map(len, contexts)) - 1
    length = 0
    while length < limit and all(context[length] == contexts[0][length] for context in contexts[1:]):
        length += 1
    return length


@dataclass
class HFTarget:
    """A local causal LM as target. ``model`` is a name for :func:`resolve_model` (default: SmolLM2).

    ``sort_by_length``: each call's pairs are batched shortest context first, so left padding only fills a
    batch up to contexts of like length (on ag_news D0 chunks of 64 pairs on Qwen, 1.43x the real tokens in
    call order, 1.15x sorted); results come back in call order either way.

    ``share_prefix``: the tokens every context of a batch starts with (at least the chat template's system turn,
    24 of Qwen's ~65 tokens on tweet_emotion) run once and their cache serves the whole batch.
    """

    model: str = "smollm2-135m-instruct"
    batch_size: int = 16
    sort_by_length: bool = True
    share_prefix: bool = True
    max_new_tokens: int | None = None
    cache: ScoreCache | None = None
    device: str = "auto"
    id: str = ""
    _lm: Any = field(default=None, init=False, repr=False)
    _tok: Any = field(default=None, init=False, repr=False)
    _label_ids: dict[tuple[str, ...], list[list[int]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"hf:{self.model}"

    def _load(self) -> None:
        if self._lm is not None:
            return
        import torch

        from .models import load_model_and_tokenizer

        self._lm, self._tok = load_model_and_tokenizer(self.model)
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._lm.to(device)
        if self._tok.chat_template is None:
            logger.warning("Target %s has no chat template: rendering the user text as a plain prompt.", self.model)

    @property
    def tokenizer(self) -> Any:
        self._load()
        return self._tok

    def context_text(self, task: Task, pair: Pair) -> str:
        """The exact text the target reads before its answer."""
        self._load()
        rendered = task.template.render(pair.prompt, pair.example.query, pair.demos)
        if self._tok.chat_template is None:
            return "\n\n".join(m["content"] for m in rendered.messages) + "\nAnswer:"
        return self._tok.apply_chat_template(rendered.messages, tokenize=False, add_generation_prompt=True)

    def score(self, task: Task, pairs: Sequence[Pair], progress: Progress | None = None) -> list[Score]:
        self._load()
        pairs = list(pairs)

        def compute(indices: list[int]) -> list[Score]:
            todo = [pairs[i] for i in indices]
            if task.kind == "classification":
                return self._score_labels(task, todo, progress)
            return self._score_generation(task, todo, progress)

        return cached_score(self.id, task, pairs, lambda p: self.context_text(task, p), compute, self.cache, progress)

    # Classification: label log-likelihood ----------------------------------------------------

    def label_token_ids(self, task: Task) -> list[list[int]]:
        """Token ids of each label word as the answer's first word (no leading space: see docs/architecture.md)."""
        self._load()
        if task.labels not in self._label_ids:
            ids = [self._tok(label, add_special_tokens=False).input_ids for label in task.labels]
            if any(not i for i in ids):
                raise ValueError(f"A label of task {task.name!r} tokenizes to nothing: {task.labels}")
            self._label_ids[task.labels] = ids
        return self._label_ids[task.labels]

    def _score_labels(self, task: Task, pairs: list[Pair], progress: Progress | None) -> list[Score]:

        label_ids = self.label_token_ids(task)
        extra_tokens = sum(len(ids) - 1 for ids in label_ids)  # label tokens read after the shared context
        out: list[Score | None] = [None] * len(pairs)
        for rows, contexts in self._batches(task, pairs):
            label_lp = self._label_logprobs(contexts, label_ids)  # (batch, labels)
            for row, lps, ctx in zip(rows, label_lp.tolist(), contexts, strict=True):
                best = max(range(len(lps)), key=lambda i: lps[i])
                label = pairs[row].example.label
                gold = int(label) if label is not None else None
                gold_nll = -lps[gold] if gold is not None else None
                label_nll = _logsumexp(lps) - lps[gold] if gold is not None else None
                out[row] = Score(correct=best == gold, prediction=task.labels[best], gold_nll=gold_nll,
                                 label_nll=label_nll, tokens=len(ctx) + extra_tokens)
            if progress:
                progress(len(rows))
        return [s for s in out if s is not None]

    def _batches(self, task: Task, pairs: Sequence[Pair]) -> Iterator[tuple[list[int], list[list[int]]]]:
        """(indices into ``pairs``, their context token ids) per forward batch of at most ``batch_size``,
        shortest context first when ``sort_by_length`` (a stable sort: the same pairs always batch alike)."""
        contexts = [self._tok(self.context_text(task, p), add_special_tokens=False).input_ids for p in pairs]
        order = sorted(range(len(pairs)), key=lambda i: len(contexts[i])) if self.sort_by_length \
            else list(range(len(pairs)))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield rows, [contexts[i] for i in rows]

    def _device(self) -> Any:
        return next(self._lm.parameters()).device

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Any, Any]:
        from .sampling import left_pad

        ids, mask = left_pad(seqs, self._tok.pad_token_id)
        return ids.to(self._device()), mask.to(self._device())

    def prefix_to_share(self, contexts: Sequence[Sequence[int]]) -> int:
        """How many leading tokens of a batch's ``contexts`` run once (0 without ``share_prefix`` or for one row)."""
        return shared_prefix_length(contexts) if self.share_prefix and len(contexts) > 1 else 0

    def _label_logprobs(self, contexts: list[list[int]], label_ids: list[list[int]]) -> Any:
        """log p(label | context) for every (context, label), summed over the label's tokens: (batch, labels).

        The contexts run once (left-padded, KV cache kept); the first label token is read from the last
        position's distribution. With ``share_prefix`` the tokens all contexts start with run first, once, and
        the rest of each context continues from their cache (its padding sits between the two, masked, and
        positions count on from the prefix). Labels of several tokens then continue from that cache in one
        batched step of ``batch x labels`` rows holding only the label tokens, and log-probabilities are taken
        only where a label token is read.
        """
        import torch

        from .sampling import position_ids

        longest = max(map(len, label_ids))
        shared = self.prefix_to_share(contexts)
        with torch.inference_mode():
            cache = None
            if shared:
                prefix = torch.tensor([contexts[0][:shared]], device=self._device())
                cache = self._lm(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
                cache.batch_repeat_interleave(len(contexts))
            ids, rest_mask = self._left_pad([context[shared:] for context in contexts])
            mask = torch.cat([rest_mask.new_ones((len(contexts), shared)), rest_mask], dim=1)
            out = self._lm(input_ids=ids, attention_mask=mask, position_ids=shared + position_ids(rest_mask),
                           past_key_values=cache, use_cache=longest > 1 or cache is not None, logits_to_keep=1)
            first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # (batch, vocab)
            total = first[:, [label[0] for label in label_ids]]  # (batch, labels)
            if longest == 1:
                return total.cpu()
            batch, n_labels, width = len(contexts), len(label_ids), longest - 1
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_labels)  # row b*n_labels + j: context b for label j
            # Inputs: each label's tokens but its last, right-padded (padding sits after every real token,
            # so causal attention keeps it out of what is read).
            pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
            steps = torch.tensor([label[:-1] + [pad] * (width - len(label) + 1) for label in label_ids])
            steps = steps.repeat(batch, 1).to(ids.device)  # (batch*labels, width)
            step_mask = torch.cat([mask.repeat_interleave(n_labels, dim=0),
                                   torch.ones_like(steps)], dim=1)
            context_len = mask.sum(dim=1, keepdim=True).repeat_interleave(n_labels, dim=0)
            positions = context_len + torch.arange(width, device=ids.device)
            logits = self._lm(input_ids=steps, attention_mask=step_mask, position_ids=positions,
                              past_key_values=cache).logits  # (batch*labels, width, vocab)
            targets = torch.tensor([label[1:] + [0] * (width - len(label) + 1) for label in label_ids])
            valid = torch.tensor([[t < len(label) - 1 for t in range(width)] for label in label_ids])
            targets, valid = targets.repeat(batch, 1).to(ids.device), valid.repeat(batch, 1).to(ids.device)
            read = logits.float()
            token_lp = read.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(read, dim=-1)
            rest = (token_lp * valid).sum(dim=1).view(batch, n_labels)
        return (total + rest.to(total.device)).cpu()

    # Math: greedy generation ------------------------------------------------------------------

    def _score_generation(self, task: Task, pairs: list[Pair], progress: Progress | None) -> list[Score]:
        import torch

        cap = self.max_new_tokens or task.max_new_tokens
        out: list[Score | None] = [None] * len(pairs)
        for rows, contexts in self._batches(task, pairs):
            ids, mask = self._left_pad(contexts)
            with torch.inference_mode():
                generated = self._lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cap, do_sample=False,
                                              pad_token_id=self._tok.pad_token_id,
                                              eos_token_id=self._tok.eos_token_id)
            for row, answer in zip(rows, generated[:, ids.shape[1] :], strict=True):
                response = self._tok.decode(answer, skip_special_tokens=True)
                prediction = task.parse(response)
                out[row] = Score(correct=task.is_correct(pairs[row].example, prediction), prediction=prediction,
                                 response=response, tokens=int(ids.shape[1] + len(answer)))
            if progress:
                progress(len(rows))
        return [s for s in out if s is not None]
