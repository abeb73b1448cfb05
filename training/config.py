"""The settings types of training, with help texts the CLI reuses: one dataclass per stage. Imports no torch.

* :class:`CollectConfig` (and its :class:`RewardConfig`) — what ``qpo collect`` scores, stored as ``run.json``;
* :class:`TrainConfig` — one fine-tuning of the policy;
* :class:`LoopConfig` — the multi-loop procedure of ``qpo train``;
* :data:`RECIPES` — named sets of their fields (``qpo train --recipe``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .models import DEFAULT_MODEL, QWEN_MODEL

LR_SCHEDULES = ("cosine", "linear", "constant")
PREFERENCE_MODES = ("off", "after", "instead")
CONDITIONING_KINDS = ("absolute", "query_rank", "label_rank", "label_route")  # what a reward token encodes: training.policy.conditioning_values
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Recipe:
    """A named set of :class:`TrainConfig` (``train``) and :class:`LoopConfig` (``loops``) fields: what
    ``qpo train --recipe`` applies under the options given explicitly, and what the benchmarks train."""

    train: dict[str, Any]
    loops: dict[str, Any]
    summary: str


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        train={"conditioning": "query_rank"},
        loops={"d0_floor_quantile": 0.0, "preference": "instead", "preference_epochs": 2,
               "preference_pairs_per_query": 4, "preference_learning_rate": 1e-4},
        summary="DPO on each D0 query's right-vs-wrong prompt pairs, one loop; the bundle chooses among D0's "
                "prompts (benchmark row dpo_only)"),
    "paper": Recipe(
        train={"conditioning": "absolute"},
        loops={"d0_floor_quantile": 0.5, "preference": "off"},
        summary="arXiv 2408.10504: the absolute reward token, supervised on D0's better half; add --loops 2+"),
    "route": Recipe(
        train={"conditioning": "label_route", "trainable": "all", "learning_rate": 5e-5,
               "route_without_leaning": True, "route_distinct": True, "route_queries": 1000, "route_read_queries": 200,
               "epochs": 1},
        loops={"d0_floor_quantile": 0.0, "preference": "off"},
        # One prompt per label (the one D0 finds right most often on the label's queries, among the prompts that do
        # not lean the target to one label, a different one per label); the policy learns to read the label from
        # D0's queries and 1,000 more labelled train queries (no target call), and the bundle sends by its route
        # table at rule remap, the route read measured on 200 held-out labelled queries. Measured on Qwen2.5-Coder-0.5B
        # ag_news and tweet_emotion (benchmark row label_route_distinct_q1000, rule remap).
        summary="classification tasks: one prompt per label, read by the policy, sent by the bundle's route table; "
                "trains every weight (label_route_distinct_q1000)"),
}
"""The recipes ``qpo train --recipe`` knows. The dataclass defaults are the ``default`` recipe's values where it
sets none; docs/benchmarks.md has what each was measured to do."""


class TrainConfigError(ValueError):
    """A training setting is invalid; the message names the field and what is allowed."""


NLL_KINDS = ("label_set", "vocab")


@dataclass
class RewardConfig:
    """Reward = correct_weight*correct + prompt_accuracy_weight*prompt_mean_accuracy - nll_weight*NLL.

    NLL is, with ``nll="label_set"`` (the default), the gold label's NLL renormalised over the
    task's label words; with ``nll="vocab"``, the gold label word's NLL over the whole vocabulary
    (the paper's literal reading). With a small target the vocabulary NLL mostly measures whether
    the prompt makes *any* bare label word likely (prompts that list the labels win whether or not
    the answer is right: on SmolLM2 it filled the top reward bucket with below-average prompts), so
    the label-set NLL is the default. Math tasks and chat targets have no label set: their NLL is
    the answer's own (or none).
    """

    correct_weight: float = field(default=10.0, metadata={"help": "Weight of the pair's correctness (0/1)."})
    prompt_accuracy_weight: float = field(default=10.0, metadata={"help": "Weight of the prompt's mean accuracy."})
    nll_weight: float = field(default=1.0, metadata={"help": "Weight of the gold answer's NLL (subtracted)."})
    nll: str = field(default="label_set", metadata={
        "help": "'label_set': gold NLL renormalised over the label words; 'vocab': over the whole vocabulary."})

    def __post_init__(self) -> None:
        if self.nll not in NLL_KINDS:
            raise ValueError(f"rewards.nll must be one of {', '.join(NLL_KINDS)}; got {self.nll!r}.")

    def nll_of(self, gold_nll: float | None, label_nll: float | None) -> float | None:
        """The NLL this config's reward uses (``label_nll`` is None where there is no label set)."""
        if self.nll == "label_set" and label_nll is not None:
            return label_nll
        return gold_nll

    def reward(self, correct: bool, prompt_mean_accuracy: float, nll: float | None) -> float:
        value = self.correct_weight * float(correct) + self.prompt_accuracy_weight * prompt_mean_accuracy
        if nll is not None:
            value -= self.nll_weight * min(nll, 50.0)  # cap: one absurd NLL must not dominate
        return value


@dataclass
class CollectConfig:
    """What ``qpo collect`` does; the CLI exposes every field with this help."""

    task: str = field(default="sst2", metadata={"help": "Built-in task name or a task spec file (task.json)."})
    target: str = field(default="smollm2-135m-instruct",
                        metadata={"help": "Target LLM: a model name/path, or a LangChain chat model as module:factory."})
    queries: int = field(default=50, metadata={"help": "Train queries to score (the D0 query set)."})
    collect_queries: int = field(default=100, metadata={"help": "Held-out queries the training loops sample prompts for."})
    test_queries: int = field(default=100, metadata={"help": "Held-out test queries for evaluation."})
    dev_queries: int = field(default=0, metadata={
        "help": "Validation queries, never trained or sampled on: each loop's greedy prompts are scored on them, "
                "and the loop to keep is chosen there (0 = none)."})
    prompts: str = field(default="all", metadata={
        "help": "'all', a number N (N prompts spread over the pool), a JSON file of prompts, 'none' (no given "
                "prompts), or 'induce:N' (only N induced ones: 'none' with --induce N)."})
    induce: int = field(default=0, metadata={
        "help": "Also ask the inducer for this many candidate instructions (APE-style: shown labelled train examples "
                "and the label words, in rotating styles), filtered and added to the pool; 0 = none."})
    inducer: str = field(default=QWEN_MODEL, metadata={
        "help": "Model that writes the induced instructions: a local model name/path, or a LangChain chat model as "
                "module:factory."})
    induce_shots: int = field(default=4, metadata={"help": "Labelled train examples shown per induction request."})
    mutate: int = field(default=0, metadata={
        "help": "Grow the pool by mutation: after D0 is scored, the inducer writes this many variations of the pool's "
                "best prompts on D0 (the --mutate-from most accurate, in turn; none that names exactly one label "
                "word), filtered like induced ones; the kept ones are scored on D0's queries too (0 = none)."})
    mutate_from: int = field(default=4, metadata={"help": "How many of D0's best prompts --mutate varies."})
    mutate_plain: bool = field(default=False, metadata={
        "help": "With --mutate: vary only prompts that do not steer the target on D0 (its answers are one label on most "
                "queries whatever their gold; classification only). Variations of a steering prompt mostly steer too, "
                "and train --route-without-steering routes only among the prompts that do not."})
    include_empty: bool = field(default=True, metadata={"help": "Score the empty prompt (no instruction) too."})
    prompts_per_query: int = field(default=0, metadata={
        "help": "Score only this many pool prompts per train query, drawn per query (seeded); 0 = every prompt. "
                "D0 then covers more queries for the same target calls, which a query-dependent policy needs."})
    shots: int = field(default=0, metadata={"help": "Few-shot demonstrations per query (0 = zero-shot)."})
    seed: int = field(default=0, metadata={"help": "Seed of the splits and demonstrations."})
    data_dir: str | None = field(default=None, metadata={"help": "Data collection root (default: $QPO_DATA)."})
    batch_size: int = field(default=16, metadata={"help": "Pairs per forward pass on a local target."})
    chunk_size: int = field(default=64, metadata={"help": "Pairs scored between two progress saves."})
    target_concurrency: int = field(default=8, metadata={"help": "Chat-model target: calls in flight at once."})
    target_retries: int = field(default=3, metadata={
        "help": "Chat-model target: retries of a failed call (exponential backoff) before the pair is recorded as failed."})
    target_timeout: float | None = field(default=None, metadata={
        "help": "Chat-model target: seconds before a call without a reply fails (and is retried)."})
    rewards: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if isinstance(self.rewards, dict):
            self.rewards = RewardConfig(**self.rewards)
        if self.prompts.startswith("induce:"):  # shorthand: only induced prompts
            count = self.prompts.partition(":")[2]
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"--prompts induce:N needs a number N >= 1; got {self.prompts!r}.")
            if self.induce not in (0, int(count)):
                raise ValueError(f"--prompts {self.prompts} and --induce {self.induce} disagree; give one of them.")
            self.prompts, self.induce = "none", int(count)
        if not self.inducer:
            raise ValueError("inducer must name a local model or a LangChain chat model as module:factory.")
        may_be_zero = ("collect_queries", "test_queries", "dev_queries", "target_retries", "prompts_per_query",
                       "induce", "mutate")
        for name in ("queries", "batch_size", "chunk_size", "target_concurrency", "induce_shots", "mutate_from",
                     *may_be_zero):
            if getattr(self, name) < (0 if name in may_be_zero else 1):
                allowed = " or 0" if name in may_be_zero else ""
                raise ValueError(f"{name} must be positive{allowed}; got {getattr(self, name)}.")
        if self.mutate_plain and not self.mutate:
            raise ValueError("mutate_plain chooses which prompts --mutate varies; give --mutate N too, or drop it.")
        if self.target_timeout is not None and self.target_timeout <= 0:
            raise ValueError(f"target_timeout must be a number of seconds > 0; got {self.target_timeout}.")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0; got {self.shots}.")
        if self.prompts == "none" and not self.induce and not self.include_empty:
            raise ValueError("--prompts none with no induced prompts and no empty prompt leaves nothing to score; "
                             "add --induce N, or drop --no-empty.")

    def split_args(self) -> dict[str, Any]:
        return {"seed": self.seed, "n_train": self.queries, "n_collect": self.collect_queries,
                "n_test": self.test_queries, "n_dev": self.dev_queries}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainConfig:
    """Settings of one policy fine-tuning run; the ``help`` texts are the CLI's option help."""

    epochs: int = field(default=3, metadata={"help": "Passes over the training examples."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak AdamW learning rate (after warmup)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch, per process."})
    grad_accum_steps: int = field(
        default=1, metadata={"help": "Micro-batches whose gradients add up to one optimizer step."}
    )
    warmup_ratio: float = field(
        default=0.05,
        metadata={"help": "Share of the optimizer steps spent warming the learning rate up from 0."},
    )
    weight_decay: float = field(
        default=1e-4, metadata={"help": "AdamW weight decay (the QPO paper uses 1e-4)."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the gradient's global norm to this value; 0 turns clipping off."}
    )
    lr_schedule: str = field(
        default="cosine", metadata={"help": "Decay after warmup: 'cosine' or 'linear' (to 0), or 'constant'."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data order (and of torch's global RNG)."})
    trainable: str = field(
        default="all",
        metadata={
            "help": "'all' trains every weight; 'top:N' trains the top N transformer layers and the final norm "
            "(embeddings frozen; much faster on CPU)."
        },
    )
    train_policy_tokens: bool = field(
        default=False,
        metadata={
            "help": "With top:N, also train the input embeddings of the reward and separator tokens (the rest of "
            "the embedding matrix stays frozen). Lets the reward conditioning reach the lower layers; the backward "
            "pass then runs through every layer."
        },
    )
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA (ignored on CPU)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (default: run every epoch)."}
    )
    device: str = field(default="auto", metadata={"help": "'auto' (a GPU when present), 'cpu' or 'cuda'."})
    num_buckets: int = field(default=10, metadata={"help": "Reward buckets, one reward token each."})
    conditioning: str = field(default="query_rank", metadata={
        "help": "What the reward token encodes: 'query_rank' (the default: the prompt's rank among the prompts "
                "scored on the same query, correct ones above wrong ones: the top bucket asks for the best prompt "
                "for this query) or 'absolute' (the paper: the pair's reward, bucketed by D0's quantiles) or "
                "'label_rank' (classification: the same rank, by the prompt's accuracy on the queries of this "
                "query's gold label: the top bucket asks for the prompt that suits the query's label) or 'label_route' "
                "(classification: each query trains on its label's best prompt among the whole pool under the top "
                "token and its label's worst under the bottom one, whether or not D0 scored them on it)."})
    route_without_steering: bool = field(default=False, metadata={
        "help": "With --conditioning label_route: leave out of the routes every prompt that steers the target to "
                "one label on D0 (it answers that label on most of its D0 queries, whatever their gold: the "
                "behavioural leakage check), so each route suits its label without leaning the answer."})
    route_without_leaning: bool = field(default=False, metadata={
        "help": "With --conditioning label_route: leave out of the routes every prompt that leans the target to one "
                "label on D0 (the softer line: 50% of its answers one label on 4 balanced labels, 67% on 2), and so "
                "every steering prompt too. A route then gains only where its prompt suits the label, not where it "
                "answers that label more often."})
    route_distinct: bool = field(default=False, metadata={
        "help": "With --conditioning label_route: give each label a different top route (the assignment of prompts "
                "to labels with the most right answers on D0), so no prompt stands for two labels. A shared route "
                "draws the policy's reads of the other labels: on Qwen ag_news seed 2, Business and Sports shared "
                "one (Sports' second-best prompt was 0.2 points behind) and the policy sent it 69% of test queries."})
    route_queries: int = field(default=0, metadata={
        "help": "With --conditioning label_route: also train the routes on this many more labelled queries of the "
                "task's train pool, disjoint from every split of the run. Only their gold labels are read (no "
                "target call): the routes come from D0's verdicts, and more queries teach the policy to read the "
                "label (on Qwen ag_news it read 75% of test topics right from D0's 1,000 queries)."})
    route_read_queries: int = field(default=0, metadata={
        "help": "With --conditioning label_route: after training, measure on this many held-out collect queries "
                "(their gold labels only, no target call) how often the policy's top route is the query's own "
                "label's, and have the bundle send by rule remap: each route a fixed prompt, the one with the most "
                "expected right answers on D0 at that read rate (a route that fails off its label gives way to one "
                "that holds up). 0: send by the label posterior of the route scores instead."})
    query_max_tokens: int = field(
        default=40, metadata={"help": "Query tokens the policy sees (the rest is cut)."}
    )
    prompt_max_tokens: int = field(default=40, metadata={"help": "Prompt tokens the policy learns to write."})
    include_empty: bool = field(
        default=True, metadata={"help": "Keep records with an empty prompt (target: end of prompt at once)."}
    )
    save_checkpoints: bool = field(
        default=True, metadata={"help": "Write output_dir/checkpoint at the end of every epoch."}
    )
    frozen_layer_cache_gib: float = field(
        default=4.0,
        metadata={
            "help": "With top:N, memory (GiB) for the hidden states entering the lowest trained layer, kept per "
            "sequence so later epochs (and the preference step's reference pass) skip the frozen layers; "
            "0 turns it off. Llama- and Qwen2-style policies."
        },
    )

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainConfigError(f"{name} must be an integer >= 1; got {value!r}.")

        for name in (
            "epochs",
            "batch_size",
            "grad_accum_steps",
            "num_buckets",
            "query_max_tokens",
            "prompt_max_tokens",
        ):
            positive_int(name)
        if self.max_steps is not None:
            positive_int("max_steps")
        if not (isinstance(self.learning_rate, int | float) and 0 < self.learning_rate < 1):
            raise TrainConfigError(f"learning_rate must be a number in (0, 1); got {self.learning_rate!r}.")
        if not (isinstance(self.warmup_ratio, int | float) and 0 <= self.warmup_ratio < 1):
            raise TrainConfigError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio!r}.")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise TrainConfigError(f"weight_decay must be >= 0; got {self.weight_decay!r}.")
        if not (isinstance(self.frozen_layer_cache_gib, int | float) and self.frozen_layer_cache_gib >= 0):
            raise TrainConfigError(
                f"frozen_layer_cache_gib must be >= 0 (0 = off); got {self.frozen_layer_cache_gib!r}.")
        if not (isinstance(self.max_grad_norm, int | float) and self.max_grad_norm >= 0):
            raise TrainConfigError(
                f"max_grad_norm must be >= 0 (0 = no clipping); got {self.max_grad_norm!r}."
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainConfigError(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}."
            )
        if self.device not in DEVICES:
            raise TrainConfigError(
                f"device must be one of {', '.join(DEVICES)}; got {self.device!r}. "
                "To pick a GPU, set CUDA_VISIBLE_DEVICES; for several, use `accelerate launch`."
            )
        if self.conditioning not in CONDITIONING_KINDS:
            raise TrainConfigError(
                f"conditioning must be one of {', '.join(CONDITIONING_KINDS)}; got {self.conditioning!r}.")
        for name in ("route_queries", "route_read_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"{name} must be an integer >= 0; got {value!r}.")
        for name in ("route_without_steering", "route_without_leaning", "route_distinct", "route_queries",
                     "route_read_queries"):
            if getattr(self, name) and self.conditioning != "label_route":
                raise TrainConfigError(f"{name} only applies to --conditioning label_route; got "
                                       f"conditioning {self.conditioning!r}. Drop --{name.replace('_', '-')}, or "
                                       "train another recipe than 'route' (qpo train --recipe default).")
        _ = self.top_layers  # parses and validates `trainable`

    @property
    def top_layers(self) -> int | None:
        """N of ``trainable="top:N"``; ``None`` for ``"all"``."""
        if self.trainable == "all":
            return None
        prefix, _, count = self.trainable.partition(":")
        if prefix != "top" or not count.isdigit() or int(count) < 1:
            raise TrainConfigError(
                f"trainable must be 'all' or 'top:N' with N >= 1 (e.g. 'top:6'); got {self.trainable!r}."
            )
        return int(count)


@dataclass
class LoopConfig:
    """Settings of the multi-loop procedure; the ``help`` texts are the CLI's option help."""

    loops: int = field(default=1, metadata={
        "help": "Number of loops T (loop 1 trains on D0 only; each later one samples prompts from the policy for "
                "the collect queries, scores them and trains again). With --preference instead (the default) the "
                "policy ranks prompts rather than writing them, so later loops sample among the prompts scored so "
                "far by its 'choose' score (new prompts then come only from --mutations)."})
    base_model: str = field(default=DEFAULT_MODEL, metadata={"help": "Policy base model: name, path or hub id."})
    samples_per_query: int = field(default=2, metadata={
        "help": "Prompts sampled per collect query in loops >= 2 (distinct ones, with --preference instead)."})
    collect_queries: int | None = field(default=None, metadata={"help": "Collect queries used per loop (default: all)."})
    collect_skip: int = field(default=0, metadata={
        "help": "Collect queries the loops never sample on or train on, from the start of the collect split (a "
                "benchmark that validates on them keeps them unseen); the loops use the ones after them."})
    top_k: int = field(default=10, metadata={"help": "Top-k of policy sampling (0 = off)."})
    top_p: float = field(default=0.9, metadata={"help": "Top-p of policy sampling."})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature (of the policy's tokens, or with --preference instead of its 'choose' scores)."})
    reward_floor_quantile: float = field(
        default=0.5, metadata={"help": "Keep new pairs whose reward is at least this quantile of D0's rewards "
                                         "(with --preference instead every new pair is kept: its pairs need the "
                                         "wrong prompts)."})
    d0_floor_quantile: float = field(
        default=0.0,
        metadata={"help": "Train on the D0 records whose reward is at least this quantile of D0's rewards; 0 = all "
                          "of D0 (the default: the preference step needs the wrong prompts too); the paper keeps "
                          "only pairs that did well ('expert' data, 0.5)."})
    prompt_accuracy_prior: float = field(
        default=4.0,
        metadata={"help": "Pseudo-queries of D0's mean accuracy mixed into a new prompt's accuracy estimate "
                          "(a sampled prompt is scored on one query; this keeps its reward on D0's scale)."})
    later_epochs: int = field(default=1, metadata={"help": "Epochs of the fine-tune in loops >= 2."})
    later_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate in loops >= 2 (default: the train learning rate)."})
    preference: str = field(default="instead", metadata={
        "help": "Within-query preference training (DPO on right-vs-wrong prompt pairs of the same query, against the "
                "policy the step starts from as reference): 'instead' of the supervised step (the default; reference: "
                "the previous loop's policy), 'after' the supervised step of each loop (reference: that supervised "
                "policy), or 'off' (the paper: supervised only)."})
    preference_beta: float = field(default=0.1, metadata={"help": "DPO beta (strength of the pull to the reference)."})
    preference_pairs_per_query: int = field(default=4, metadata={
        "help": "Right-vs-wrong prompt pairs drawn per query (from every record up to the loop)."})
    preference_label_smoothing: float = field(default=0.0, metadata={
        "help": "Weight w in [0, 1] of label-level evidence in the preference pairs: a prompt's score on a query is "
                "(1 - w) * right + w * its accuracy on the scored queries with the same gold label, and pairs need a "
                "gap of 0.1 (0 = right-vs-wrong pairs only; for classification tasks)."})
    preference_without_steering: bool = field(default=False, metadata={
        "help": "Leave out of the preference pairs every pair whose chosen prompt steers the target to one label on "
                "D0 (it answers that label on most of its D0 queries, whatever their gold: the behavioural leakage "
                "check); such prompts stay on the rejected side, so the policy is never taught to prefer a prompt that "
                "answers for the query (classification tasks)."})
    preference_epochs: int = field(default=2, metadata={"help": "Epochs of the preference step."})
    preference_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the preference step (default: the loop's learning rate)."})
    choice_offset_queries: int = field(default=200, metadata={
        "help": "With a preference step: training queries over which each library prompt's mean log-probability under "
                "the DPO reference is taken, the offset that strategy 'choose' subtracts (qpo export --strategy "
                "choose); 0 = none (choose then scores by log-probability alone)."})
    mutations: int = field(default=0, metadata={
        "help": "Exploration beyond the policy's own samples: in loops >= 2, for this many collect queries, an "
                "instruct model writes a variation of the best prompt scored on the query so far, and the variation "
                "is scored on it too (0 = off)."})
    mutation_model: str | None = field(default=None, metadata={
        "help": "Model that writes the variations: a local model name/path or a LangChain chat model as "
                "module:factory (default: the run's inducer, the embedded Qwen)."})
    generation_batch_size: int = field(default=16, metadata={"help": "Queries per policy generate() call."})
    eval_greedy: bool = field(default=True, metadata={"help": "Score greedy policy prompts on the collect split."})
    seed: int = field(default=0, metadata={"help": "Seed of the policy sampling."})

    def __post_init__(self) -> None:
        if self.loops < 1:
            raise ValueError(f"loops must be >= 1; got {self.loops}.")
        if self.collect_skip < 0:
            raise ValueError(f"collect_skip must be >= 0; got {self.collect_skip}.")
        if self.samples_per_query < 1:
            raise ValueError(f"samples_per_query must be >= 1; got {self.samples_per_query}.")
        if not 0.0 <= self.reward_floor_quantile <= 1.0:
            raise ValueError(f"reward_floor_quantile must be in [0, 1]; got {self.reward_floor_quantile}.")
        if not 0.0 <= self.d0_floor_quantile < 1.0:
            raise ValueError(f"d0_floor_quantile must be in [0, 1); got {self.d0_floor_quantile}.")
        if self.mutations < 0:
            raise ValueError(f"mutations must be >= 0 (0 = off); got {self.mutations}.")
        if self.choice_offset_queries < 0:
            raise ValueError(f"choice_offset_queries must be >= 0 (0 = none); got {self.choice_offset_queries}.")
        if self.preference not in PREFERENCE_MODES:
            raise ValueError(f"preference must be one of {', '.join(PREFERENCE_MODES)}; got {self.preference!r}.")
        if self.preference_beta <= 0 or self.preference_pairs_per_query < 1 or self.preference_epochs < 1:
            raise ValueError("preference_beta must be > 0, preference_pairs_per_query and preference_epochs >= 1.")
        if not 0.0 <= self.preference_label_smoothing <= 1.0:
            raise ValueError(f"preference_label_smoothing must be in [0, 1]; got {self.preference_label_smoothing}.")
        if self.preference_without_steering and self.preference == "off":
            raise ValueError("preference_without_steering filters the preference pairs; with --preference off there "
                             "are none. Use --preference instead (or after), or drop it.")
        if self.preference_learning_rate is not None and not 0 < self.preference_learning_rate < 1:
            raise ValueError(f"preference_learning_rate must be in (0, 1); got {self.preference_learning_rate}.")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise ValueError("top_p must be in (0, 1] and temperature > 0.")


def help_of(config: type, name: str) -> str:
    """The help text of a config field, for the CLI option that sets it."""
    for item in fields(config):
        if item.name == name:
            return str(item.metadata.get("help", ""))
    raise KeyError(f"{config.__name__} has no field {name!r}")
