"""The QPO policy's training data: reward tokens, reward buckets, examples and the loss.

QPO trains the policy by return-conditioned supervised learning: it learns
``p(prompt | reward, query)`` with teacher forcing, and at inference it is
conditioned on the top reward. The reward is given as one special token per
reward bucket, so the policy stays a plain causal LM. The token layout of the
conditioning part is owned by :class:`~qpo_middleware.policy_format.PolicyFormat`;
this module adds the tokens to a model, turns :class:`Record` s into
``(input_ids, labels)`` examples with that layout, and defines the loss.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from qpo_middleware.choice import RouteTable
from qpo_middleware.library import prompt_target_ids
from qpo_middleware.policy_format import PolicyFormat, brief_repr, reward_token

from .config import CONDITIONING_KINDS
from .dataset import Record, require_labels, steering_prompts
from .tasks import LEAN_REACH, STEER_REACH

logger = logging.getLogger(__name__)

SEPARATOR_TOKEN = "<|qpo_prompt|>"
IGNORE_INDEX = -100
# Added embedding rows start at the mean of the existing rows plus noise of this
# size (relative to the existing rows' standard deviation), so the new tokens
# are distinguishable but start close to "an average token".
INIT_NOISE_SCALE = 0.01


class PolicyDataError(ValueError):
    """The records cannot be turned into policy examples; the message says why and what to do."""


def policy_token_strings(num_buckets: int) -> list[str]:
    """The special tokens a policy with ``num_buckets`` reward buckets needs: reward tokens, then separator."""
    if not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be an integer >= 1; got {num_buckets!r}.")
    return [reward_token(i) for i in range(num_buckets)] + [SEPARATOR_TOKEN]


def policy_token_ids(tokenizer: Any, num_buckets: int) -> list[int]:
    """Ids of the policy's special tokens in ``tokenizer``; raises if any is missing."""
    vocab = tokenizer.get_vocab()
    strings = policy_token_strings(num_buckets)
    missing = [s for s in strings if s not in vocab]
    if missing:
        raise PolicyDataError(
            f"The tokenizer lacks the policy token(s) {missing[:3]}{'...' if len(missing) > 3 else ''}. "
            f"Call add_policy_tokens(model, tokenizer, num_buckets={num_buckets}) first, or pass the "
            "num_buckets the policy checkpoint was trained with."
        )
    return [int(vocab[s]) for s in strings]


def _register_special_tokens(tokenizer: Any, tokens: list[str]) -> None:
    """Add ``tokens`` as additional special tokens (never split, skipped by ``decode(skip_special_tokens=True)``)."""
    existing = getattr(tokenizer, "additional_special_tokens", None)
    if isinstance(existing, list):  # transformers 4.x; passing old + new keeps the old ones
        tokenizer.add_special_tokens({"additional_special_tokens": [*map(str, existing), *tokens]})
        return
    # transformers 5.x renamed the list; flagging the added tokens special works in both.
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)


@torch.no_grad()
def _init_rows(
    weight: torch.Tensor,
    rows: list[int],
    num_old: int,
    generator: torch.Generator,
    anchors: Sequence[Sequence[int]] | None = None,
) -> None:
    """Set ``weight[rows]`` to an anchor's embedding (or the mean of ``weight[:num_old]``) plus small noise.

    ``anchors[i]`` lists existing token ids whose mean embedding row ``rows[i]``
    starts from (an empty list: the mean of all old rows).
    """
    old = weight[:num_old].float()
    mean = old.mean(dim=0)  # (hidden,)
    std = old.std().item()
    noise = torch.randn((len(rows), weight.shape[1]), generator=generator) * (INIT_NOISE_SCALE * std)
    starts = torch.stack(
        [old[list(ids)].mean(dim=0) if ids and max(ids) < num_old else mean for ids in (anchors or [[]] * len(rows))]
    )  # (rows, hidden)
    weight[rows] = (starts.cpu() + noise).to(weight.dtype).to(weight.device)


def bucket_anchor_ids(tokenizer: Any, num_buckets: int) -> list[list[int]]:
    """Existing tokens each reward token starts from: the number of its bucket ("0", "1", ...).

    Distinct starting points make the reward tokens distinguishable before any
    training, so a policy whose embedding rows stay frozen (``trainable="top:N"``)
    still sees which bucket it is conditioned on.
    """
    return [list(tokenizer(str(i), add_special_tokens=False)["input_ids"]) for i in range(num_buckets)]


def add_policy_tokens(
    model: Any,
    tokenizer: Any,
    num_buckets: int = 10,
    query_max_tokens: int = 40,
    prompt_max_tokens: int = 40,
    *,
    seed: int = 0,
) -> PolicyFormat:
    """Give ``model`` and ``tokenizer`` the policy's reward and separator tokens; return the policy format.

    New embedding rows start from existing ones plus tiny seeded noise (input
    and, if untied, output embeddings): reward token i from the embedding of the
    number i (see :func:`bucket_anchor_ids`), the separator from the mean row. Idempotent: tokens already
    in the tokenizer (a policy checkpoint being trained further) are reused and
    their rows left as they are.
    """
    if tokenizer.eos_token_id is None:
        raise PolicyDataError(
            "The tokenizer has no eos_token: set tokenizer.eos_token before adding policy tokens."
        )
    strings = policy_token_strings(num_buckets)
    vocab = tokenizer.get_vocab()
    missing = [s for s in strings if s not in vocab]
    if missing:
        _register_special_tokens(tokenizer, missing)

    embeddings = model.get_input_embeddings()
    num_old_rows = embeddings.weight.shape[0]
    ids = policy_token_ids(tokenizer, num_buckets)
    if len(tokenizer) > num_old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # Rows to initialise: tokens added now, and tokens the tokenizer already had
    # but the model lacked rows for (a tokenizer from a policy, a base model).
    id_of = dict(zip(strings, ids, strict=True))
    new_ids = sorted({i for i in ids if i >= num_old_rows} | {id_of[s] for s in missing})
    if new_ids:
        # Rows before the first new id are "existing" tokens; an embedding
        # matrix padded beyond the vocabulary may hold untrained rows there too.
        num_ref = min(min(new_ids), num_old_rows)
        generator = torch.Generator().manual_seed(seed)
        # Reward token i starts from the embedding of the number i; the separator from the mean.
        anchor_of = dict(zip(ids, [*bucket_anchor_ids(tokenizer, num_buckets), []], strict=True))
        anchors = [anchor_of.get(i, []) for i in new_ids]
        _init_rows(model.get_input_embeddings().weight, new_ids, num_ref, generator, anchors)
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            _init_rows(output.weight, new_ids, num_ref, generator, anchors)
        logger.info("Added %d policy token(s) to the tokenizer and the model's embeddings", len(new_ids))

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PolicyFormat(
        reward_token_ids=tuple(ids[:num_buckets]),
        separator_ids=(ids[num_buckets],),
        eos_token_ids=(int(tokenizer.eos_token_id),),
        query_max_tokens=query_max_tokens,
        prompt_max_tokens=prompt_max_tokens,
        pad_token_id=int(pad),
    )


LABEL_PRIOR = 4.0  # pseudo-records of a prompt's overall accuracy in its per-label accuracy


def label_accuracy(records: Sequence[Record]) -> dict[tuple[str | None, str], float]:
    """Each prompt's accuracy on the queries of each gold label, ``(label, prompt) -> accuracy``, shrunk towards
    the prompt's accuracy over all labels by :data:`LABEL_PRIOR` pseudo-records. A prompt scored twice on a
    query counts once."""
    first: dict[tuple[str, str], Record] = {}
    for record in records:
        first.setdefault((record.query_id, record.prompt), record)
    hits: dict[tuple[str | None, str], list[int]] = {}
    for record in first.values():
        tally = hits.setdefault((record.label, record.prompt), [0, 0])
        tally[0] += int(record.correct)
        tally[1] += 1
    overall = mean_prompt_accuracy(records)
    return {(label, prompt): (right + LABEL_PRIOR * overall[prompt]) / (n + LABEL_PRIOR)
            for (label, prompt), (right, n) in hits.items()}


def conditioning_values(records: Sequence[Record], kind: str = "absolute") -> list[float]:
    """What each record's reward token encodes, for :class:`RewardBuckets` to cut into buckets.

    * ``absolute`` (the paper): the record's reward. Its ``prompt_mean_accuracy`` term ranks prompts
      that are good on average above prompts that are right for this query, so the top bucket asks
      for the best task-level prompt.
    * ``query_rank``: the record's standing among the prompts scored on its own query. Correct records
      take (0.5, 1] and wrong ones [0, 0.5), each half ordered by reward (its NLL and prompt-accuracy
      terms break ties among equally correct prompts): the query's best correct prompt is 1.0, so
      every query with a correct pair has one in the top bucket, and a wrong prompt never reaches it.
      Position ``i`` (0 = lowest) of ``m`` correct records is ``0.5 + 0.5 * (i + 1) / m``; of ``m``
      wrong ones, ``0.5 * i / m``.
    * ``label_rank``: the record's standing among the prompts scored on its own query by **label
      accuracy** (:func:`label_accuracy`: how often the prompt is right on all the records whose query
      shares this one's gold label), not by this query's own verdict. Position ``i`` of the query's ``m``
      prompts is ``(i + 1) / m``, so the top bucket holds, per query, the scored prompt that suits its
      label best. On a small target whose prompts mostly lean the answer one way, this denoises the
      per-query verdicts; a policy conditioned on the top bucket learns to route each query to the
      prompt of the label it reads. Classification only: every record needs its gold ``label``.
    * ``label_route``: the prompt's standing by label accuracy among **every** prompt scored on queries of the
      record's gold label (:func:`pool_label_standing`), not only those scored on its own query: 1.0 for the
      label's best prompt (its *route*), 0.0 for its worst. Training on it (:func:`label_route_data`) shows each
      query its label's route under the top token whether or not D0 scored the route on it, so the top token
      asks for one prompt per label, which ``label_rank`` spreads over the 5 prompts scored per query.
      Classification only.
    """
    if kind not in CONDITIONING_KINDS:
        raise ValueError(f"conditioning must be one of {', '.join(CONDITIONING_KINDS)}; got {kind!r}.")
    if kind == "absolute":
        return [float(r.reward) for r in records]
    if kind == "label_rank":
        return _label_ranks(records)
    if kind == "label_route":
        standing = pool_label_standing(records)
        return [standing[(r.label, r.prompt)] for r in records]
    groups: dict[tuple[str, bool], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault((record.query_id, record.correct), []).append(index)
    values = [0.0] * len(records)
    for (_, correct), indices in groups.items():
        indices.sort(key=lambda i: records[i].reward)
        m = len(indices)
        for position, index in enumerate(indices):
            values[index] = 0.5 + 0.5 * (position + 1) / m if correct else 0.5 * position / m
    return values


def _require_labels(records: Sequence[Record], kind: str) -> None:
    require_labels(records, f"conditioning {kind!r} ranks prompts by their accuracy per gold label",
                   "use --conditioning query_rank (with --recipe route: --recipe default)")


def pool_label_standing(records: Sequence[Record]) -> dict[tuple[str | None, str], float]:
    """``(label, prompt) -> standing`` in [0, 1]: the prompt's place among every prompt scored on queries of that
    gold label, ordered by :func:`label_accuracy` (ties by overall accuracy, then text): 1.0 = the label's best
    prompt, 0.0 = its worst (1.0 when the label has one prompt)."""
    _require_labels(records, "label_route")
    by_label = label_accuracy(records)
    overall = mean_prompt_accuracy(records)
    prompts: dict[str | None, list[str]] = {}
    for label, prompt in by_label:
        prompts.setdefault(label, []).append(prompt)
    standing: dict[tuple[str | None, str], float] = {}
    for label, texts in prompts.items():
        texts.sort(key=lambda prompt: (by_label[(label, prompt)], overall[prompt], prompt))
        for position, prompt in enumerate(texts):
            standing[(label, prompt)] = position / (len(texts) - 1) if len(texts) > 1 else 1.0
    return standing


def mean_prompt_accuracy(records: Sequence[Record]) -> dict[str, float]:
    """Each prompt's accuracy over all its records (a prompt scored twice on a query counts once)."""
    first: dict[tuple[str, str], bool] = {}
    for record in records:
        first.setdefault((record.query_id, record.prompt), record.correct)
    tally: dict[str, list[int]] = {}
    for (_, prompt), correct in first.items():
        counts = tally.setdefault(prompt, [0, 0])
        counts[0] += int(correct)
        counts[1] += 1
    return {prompt: right / n for prompt, (right, n) in tally.items()}


def best_assignment(gain: Sequence[Sequence[float]]) -> list[int]:
    """The column for each row that maximizes the summed ``gain``, no column taken twice (rows <= columns): the
    Hungarian algorithm, O(rows^2 x columns)."""
    rows, cols = len(gain), len(gain[0]) if gain else 0
    if rows > cols:
        raise ValueError(f"best_assignment needs rows <= columns; got {rows} rows and {cols} columns.")
    u, v = [0.0] * (rows + 1), [0.0] * (cols + 1)
    owner, way = [0] * (cols + 1), [0] * (cols + 1)  # owner[j]: the row holding column j (1-based, 0 = free)
    for row in range(1, rows + 1):
        owner[0], j0 = row, 0
        slack, used = [math.inf] * (cols + 1), [False] * (cols + 1)
        while owner[j0]:
            used[j0] = True
            i0, delta, j1 = owner[j0], math.inf, 0
            for j in range(1, cols + 1):
                if not used[j]:
                    cost = -gain[i0 - 1][j - 1] - u[i0] - v[j]
                    if cost < slack[j]:
                        slack[j], way[j] = cost, j0
                    if slack[j] < delta:
                        delta, j1 = slack[j], j
            for j in range(cols + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    slack[j] -= delta
            j0 = j1
        while j0:
            owner[j0] = owner[way[j0]]
            j0 = way[j0]
    out = [0] * rows
    for j in range(1, cols + 1):
        if owner[j]:
            out[owner[j] - 1] = j - 1
    return out


def _distinct_best(records: Sequence[Record], by_label: Mapping[tuple[str | None, str], float],
                   standing: Mapping[tuple[str | None, str], float]) -> dict[str, str]:
    """Each label's top route with no prompt serving two labels: the assignment of prompts to labels with the most
    right answers on D0 (``by_label``: :func:`label_accuracy`, weighted by the label's queries), ties to the
    higher-standing prompts."""
    queries: dict[str, set[str]] = {}
    for record in records:
        queries.setdefault(str(record.label), set()).add(record.query_id)
    labels = sorted(queries)
    prompts = sorted({prompt for _, prompt in by_label})
    if len(prompts) < len(labels):
        raise ValueError(f"route_distinct needs a prompt per label: {len(labels)} labels, {len(prompts)} prompts to "
                         "route among. Grow the pool (qpo collect --mutate N or --induce N) or train without it "
                         "(--no-route-distinct).")
    gain = [[len(queries[label]) * by_label.get((label, prompt), -1.0) + 1e-6 * standing.get((label, prompt), 0.0)
             for prompt in prompts] for label in labels]
    chosen = {label: prompts[j] for label, j in zip(labels, best_assignment(gain), strict=True)}
    for label, prompt in chosen.items():
        if (label, prompt) not in by_label:
            raise ValueError(f"route_distinct: no prompt left that D0 scored on label {label!r}; grow the pool or "
                             "train without it (--no-route-distinct).")
    return chosen


def _route_records(records: Sequence[Record], *, without_steering: bool, without_leaning: bool) -> list[Record]:
    """D0's records of the prompts ``label_route`` may route to: all of them, or those of the prompts that do not
    steer (``without_steering``) or do not even lean (``without_leaning``) the target to one label."""
    if not records:
        raise ValueError("label_route draws its routes from D0's scored records, and there are none yet: run "
                         "`qpo collect` (or let it finish) first.")
    if not (without_steering or without_leaning):
        return list(records)
    _require_labels(records, "label_route")
    line, verb = (LEAN_REACH, "leans") if without_leaning else (STEER_REACH, "steers")
    left_out = steering_prompts(records, line)
    ranked = [r for r in records if r.prompt not in left_out]
    if not ranked:
        raise ValueError(f"Every one of the {len(left_out)} prompts in D0 {verb} the target to one label, so "
                         f"route_without_{'leaning' if without_leaning else 'steering'} leaves no route; grow "
                         "the pool (qpo collect --mutate N or --induce N) or train without it (--no-route-without-"
                         f"{'leaning' if without_leaning else 'steering'}).")
    logger.info("label_route: %d of %d prompts %s the target to one label on D0 and are left out of the routes",
                len(left_out), len({r.prompt for r in records}), verb.removesuffix("s"))
    return ranked


def label_routes(records: Sequence[Record], *, without_steering: bool = False,
                 without_leaning: bool = False, distinct: bool = False) -> dict[tuple[str, float], str]:
    """``label_route``'s routes from D0: ``(label, 1.0)`` -> the label's best prompt and ``(label, 0.0)`` -> its
    worst, by :func:`pool_label_standing` (a label with one prompt has no worst). ``without_steering`` ranks only
    the prompts that do not steer the target (:func:`steering_prompts`), ``without_leaning`` only those that do not
    lean it either (:data:`~.tasks.LEAN_REACH`). ``distinct`` gives each label a different best prompt
    (:func:`_distinct_best`), so no top route stands for two labels."""
    return _routes_among(_route_records(records, without_steering=without_steering, without_leaning=without_leaning),
                         distinct)


def _routes_among(ranked: Sequence[Record], distinct: bool) -> dict[tuple[str, float], str]:
    """:func:`label_routes` on the records of the prompts it may route to (:func:`_route_records`)."""
    standing = pool_label_standing(ranked)
    ends = {(label, value): prompt for (label, prompt), value in standing.items() if value in (0.0, 1.0)}
    if distinct:
        by_label = label_accuracy(ranked)
        for label, prompt in _distinct_best(ranked, by_label, standing).items():
            best = ends[(label, 1.0)]
            if prompt != best:
                logger.info("label_route: distinct routes send %s to %s (%.1f%% on its D0 queries) instead of %s "
                            "(%.1f%%), which serves another label", label, brief_repr(prompt, 40),
                            100 * by_label[(label, prompt)], brief_repr(best, 40), 100 * by_label[(label, best)])
            ends[(label, 1.0)] = prompt
            if ends.get((label, 0.0)) == prompt:  # forced onto its own worst prompt: no worst to train against
                del ends[(label, 0.0)]
    logger.info("label_route: routes %s", "; ".join(
        f"{label} -> {brief_repr(prompt, 60)}" for (label, value), prompt in sorted(ends.items()) if value == 1.0))
    return ends


def route_table(records: Sequence[Record], *, without_steering: bool = False, without_leaning: bool = False,
                distinct: bool = False) -> RouteTable:
    """The :class:`~qpo_middleware.choice.RouteTable` of a ``label_route`` policy trained on ``records`` (D0) with
    these lines: its routes (:func:`label_routes`) and the labels each stands for, the labels' shares of D0's
    queries, and the target's accuracy with every prompt the routes may be drawn from on each label's D0 queries
    (:func:`label_accuracy`; a label never scored with a prompt counts at its mean accuracy). Temperature 1: fit it
    on labelled queries with :meth:`~qpo_middleware.choice.RouteTable.fit_temperature`."""
    ranked = _route_records(records, without_steering=without_steering, without_leaning=without_leaning)
    route_of = {label: prompt for (label, value), prompt in _routes_among(ranked, distinct).items() if value == 1.0}
    labels = sorted(route_of, key=str)
    counts = Counter(r.label for r in {r.query_id: r for r in ranked}.values())
    total = sum(counts[label] for label in labels)
    by_label = label_accuracy(ranked)
    label_mean = {label: statistics.fmean(r.correct for r in ranked if r.label == label) for label in labels}
    routes = sorted(set(route_of.values()))
    prompts = sorted({r.prompt for r in ranked})
    return RouteTable(
        labels=tuple(labels), shares=tuple(counts[label] / total for label in labels), routes=tuple(routes),
        route_labels=tuple(tuple(i for i, label in enumerate(labels) if route_of[label] == route) for route in routes),
        prompts=tuple(prompts),
        accuracy=tuple(tuple(by_label.get((label, prompt), label_mean[label]) for prompt in prompts)
                       for label in labels))


def route_remap(records: Sequence[Record], read: float, *, without_steering: bool = False,
                without_leaning: bool = False, distinct: bool = False) -> dict[str, str]:
    """The prompt to send for each ``label_route`` route when the trained policy picks the route of the query's
    gold label only a share ``read`` of the time (a label-only measure: the route read on a dev split), and
    otherwise another label's, in proportion to the labels' shares of D0: :func:`route_table` (same lines) with
    ``read`` set, which serves this map per query. ``route -> prompt`` over the routes of :func:`label_routes`,
    each the prompt with the most expected right answers on D0 for the queries the route receives at that read (a
    route keeps itself on ties). At ``read`` 1 each route sends the prompt best on D0 for the labels it stands for
    (a ``distinct`` route may go back to the prompt another route sends: distinct routes help the policy learn to
    read the label, not the target answer); as ``read`` falls, routes that fail off their own label give way to
    prompts that hold up on every label, down to the best single prompt."""
    if isinstance(read, bool) or not isinstance(read, int | float) or not 0.0 <= read <= 1.0:
        raise ValueError(f"read is the share of queries the policy sends their label's route: a number in [0, 1]; "
                         f"got {read!r}.")
    table = replace(route_table(records, without_steering=without_steering, without_leaning=without_leaning,
                                distinct=distinct), read=float(read))
    served = table.sent_by_route()
    for route, prompt in served.items():
        if prompt != route:
            logger.info("label_route: at a route read of %.0f%%, the route %s sends %s instead", 100 * read,
                        brief_repr(route, 40), brief_repr(prompt, 40))
    return served


def label_route_data(records: Sequence[Record], *, without_steering: bool = False, without_leaning: bool = False,
                     distinct: bool = False, route_queries: Sequence[Record] = ()) -> tuple[list[Record], list[float]]:
    """What ``label_route`` conditioning trains on: per query (first-seen order), its gold label's best prompt
    (:func:`label_routes`, with the same ``without_*`` lines and ``distinct``) under value 1.0 and the label's
    worst under 0.0, as copies of the query's first record with the prompt replaced (``prompt_source`` ``label_route:best`` /
    ``label_route:worst``). Their verdicts are not observed on the query: the standing is imputed from D0's
    verdicts on the other queries of the label. Two examples per query, whatever the number of prompts scored on
    it; every query gets its examples, whichever prompts rank. ``route_queries`` are more labelled queries (one
    record each, its prompt and verdict unused: :func:`~.loops.route_query_records`) that get the same two examples
    after D0's queries, and take no part in choosing the routes."""
    ends = label_routes(records, without_steering=without_steering, without_leaning=without_leaning,
                        distinct=distinct)
    first: dict[str, Record] = {}
    for record in [*records, *route_queries]:
        first.setdefault(record.query_id, record)
    out: list[Record] = []
    values: list[float] = []
    for record in first.values():
        for value, name in ((1.0, "best"), (0.0, "worst")):
            if (prompt := ends.get((record.label, value))) is not None:  # a label with one prompt has no worst
                out.append(replace(record, prompt=prompt, prompt_source=f"label_route:{name}",
                                   extra={**record.extra, "imputed": True}))
                values.append(value)
    return out, values


def _label_ranks(records: Sequence[Record]) -> list[float]:
    _require_labels(records, "label_rank")
    by_label = label_accuracy(records)
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(record.query_id, []).append(index)
    values = [0.0] * len(records)
    for indices in groups.values():
        # Ties (equal label accuracy) fall back to the reward, then to the prompt text: deterministic.
        indices.sort(key=lambda i: (by_label[(records[i].label, records[i].prompt)], records[i].reward,
                                    records[i].prompt))
        for position, index in enumerate(indices):
            values[index] = (position + 1) / len(indices)
    return values

@dataclass
class RewardBuckets:
    """Conditioning value -> bucket index by edges; bucket 0 = the lowest values, the top bucket = the best.

    ``edges`` are the ``n - 1`` ascending inner edges of ``n`` buckets; a value
    equal to an edge goes to the bucket above it, so the largest value seen
    always lands in the top bucket. ``conditioning`` names what the values are
    (:func:`conditioning_values`): the paper's reward, placed by D0's quantiles
    (:meth:`from_rewards`), or a query or label rank in [0, 1], cut evenly (:meth:`even`).
    """

    edges: list[float]
    conditioning: str = "absolute"

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONING_KINDS:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONING_KINDS)}; got {self.conditioning!r}.")
        self.edges = [float(e) for e in self.edges]
        if any(not math.isfinite(e) for e in self.edges):
            raise ValueError(f"Reward bucket edges must be finite numbers; got {self.edges}.")
        if any(b < a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"Reward bucket edges must be ascending; got {self.edges}.")

    @property
    def num_buckets(self) -> int:
        return len(self.edges) + 1

    @property
    def top(self) -> int:
        return len(self.edges)

    @classmethod
    def from_rewards(cls, rewards: Sequence[float], n: int) -> RewardBuckets:
        """``n`` buckets holding about equal shares of ``rewards`` (fewer distinct ones when rewards tie)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"The number of reward buckets must be an integer >= 1; got {n!r}.")
        values = torch.tensor([float(r) for r in rewards], dtype=torch.float64)
        if values.numel() == 0:
            raise PolicyDataError("Cannot place reward buckets without rewards: the dataset is empty.")
        if not torch.isfinite(values).all():
            raise PolicyDataError("Rewards must be finite numbers to place reward buckets; found NaN or inf.")
        if n == 1:
            return cls(edges=[])
        quantiles = torch.arange(1, n, dtype=torch.float64) / n
        return cls(edges=torch.quantile(values, quantiles).tolist())

    @classmethod
    def even(cls, n: int, conditioning: str = "query_rank") -> RewardBuckets:
        """``n`` equal-width buckets over [0, 1] (for query ranks): the top bucket holds values >= (n-1)/n."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"The number of reward buckets must be an integer >= 1; got {n!r}.")
        return cls(edges=[i / n for i in range(1, n)], conditioning=conditioning)

    @classmethod
    def for_records(cls, records: Sequence[Record], n: int, conditioning: str = "absolute") -> RewardBuckets:
        """The buckets of a run, placed once on its D0 ``records``."""
        if conditioning == "absolute":
            return cls.from_rewards(conditioning_values(records, conditioning), n)
        return cls.even(n, conditioning)

    def bucket(self, value: float) -> int:
        return bisect.bisect_right(self.edges, float(value))

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges), "conditioning": self.conditioning}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewardBuckets:
        if not isinstance(data, Mapping) or not isinstance(data.get("edges"), list):
            raise ValueError(f"Reward buckets must be an object with a list 'edges'; got {data!r}.")
        return cls(edges=list(data["edges"]), conditioning=str(data.get("conditioning", "absolute")))


def top_bucket_coverage(records: Sequence[Record], buckets: RewardBuckets,
                        values: Sequence[float] | None = None) -> float | None:
    """The share of queries with a correct record whose correct records include one in the top bucket.

    What conditioning on the top bucket can teach: a query with no correct record there only ever
    shows the policy its other prompts as "best". None when no query has a correct record.
    """
    values = conditioning_values(records, buckets.conditioning) if values is None else values
    with_correct: set[str] = set()
    covered: set[str] = set()
    for record, value in zip(records, values, strict=True):
        if record.correct:
            with_correct.add(record.query_id)
            if buckets.bucket(value) == buckets.top:
                covered.add(record.query_id)
    return len(covered) / len(with_correct) if with_correct else None


@dataclass
class Example:
    """One teacher-forced sequence: conditioning + prompt + eos; ``labels`` is -100 where not supervised."""

    input_ids: list[int]
    labels: list[int]


def build_examples(
    records: Sequence[Record],
    tokenizer: Any,
    fmt: PolicyFormat,
    buckets: RewardBuckets,
    *,
    values: Sequence[float] | None = None,
    include_empty: bool = True,
) -> list[Example]:
    """One example per record: ``fmt.encode(query, tokenize, bucket(value))`` then the prompt (capped) and eos.

    ``values`` are the records' conditioning values (default: :func:`conditioning_values` of the
    records with the buckets' kind). Only the prompt tokens and eos are supervised. A record with an empty
    prompt (the "no instruction" baseline) teaches the policy to answer with
    eos alone; ``include_empty=False`` drops such records instead.
    """
    if buckets.num_buckets != len(fmt.reward_token_ids):
        raise PolicyDataError(
            f"The reward buckets ({buckets.num_buckets}) and the policy's reward tokens "
            f"({len(fmt.reward_token_ids)}) differ in number; build both with the same num_buckets."
        )
    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if values is None:
        values = conditioning_values(records, buckets.conditioning)
    if len(values) != len(records):
        raise ValueError(f"build_examples got {len(values)} conditioning values for {len(records)} records.")
    return [prompt_example(fmt, tokenize, record.query, record.prompt, buckets.bucket(value))
            for record, value in zip(records, values, strict=True)
            if include_empty or record.prompt.strip()]


def prompt_example(fmt: PolicyFormat, tokenize: Callable[[str], Sequence[int]], query: str, prompt: str,
                   bucket: int) -> Example:
    """``fmt.encode(query, tokenize, bucket)`` then the prompt's tokens (capped) and eos; only those supervised.

    The query is read as the runtime reads it (policy_text, a prefix of a long query): trained as served.
    A blank prompt targets eos alone. The policy's own control tokens are dropped from the prompt.
    """
    context = fmt.encode(query, tokenize, bucket)
    target = prompt_target_ids(fmt, tokenize, prompt)
    return Example(input_ids=context + target, labels=[IGNORE_INDEX] * len(context) + target)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100; ``attention_mask`` 1 on real tokens."""
    if not examples:
        raise ValueError("Cannot collate an empty batch.")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def qpo_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the supervised tokens (``labels != -100``).

    ``logits`` is (B, T, V) and ``labels`` (B, T), aligned with the inputs:
    position ``t`` predicts ``labels[:, t + 1]``. Computed in float32. A batch
    with no supervised token gives 0 (still connected to the graph).
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    count = (shift_labels != IGNORE_INDEX).sum()
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / count.clamp(min=1)


@dataclass(frozen=True)
class SupervisedObjective:
    """Return-conditioned supervised learning (the paper) as a :func:`~.trainer.train_policy` objective."""

    def collate(self, items: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(items, pad_id)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return qpo_loss(logits, batch["labels"])
