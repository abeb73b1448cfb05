"""Configuration dataclasses of training, with help texts the CLI reuses. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .models import DEFAULT_MODEL

LR_SCHEDULES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")


class TrainConfigError(ValueError):
    """A training setting is invalid; the message names the field and what is allowed."""


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

    loops: int = field(default=2, metadata={"help": "Number of loops T (loop 1 trains on D0 only)."})
    base_model: str = field(default=DEFAULT_MODEL, metadata={"help": "Policy base model: name, path or hub id."})
    samples_per_query: int = field(default=2, metadata={"help": "Prompts sampled per collect query in loops >= 2."})
    collect_queries: int | None = field(default=None, metadata={"help": "Collect queries used per loop (default: all)."})
    top_k: int = field(default=10, metadata={"help": "Top-k of policy sampling (0 = off)."})
    top_p: float = field(default=0.9, metadata={"help": "Top-p of policy sampling."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    reward_floor_quantile: float = field(
        default=0.5, metadata={"help": "Keep new pairs whose reward is at least this quantile of D0's rewards."})
    d0_floor_quantile: float = field(
        default=0.5,
        metadata={"help": "Train on the D0 records whose reward is at least this quantile of D0's rewards (the "
                          "paper's D0 keeps only pairs that did well, 'expert' data); 0 = all of D0."})
    prompt_accuracy_prior: float = field(
        default=4.0,
        metadata={"help": "Pseudo-queries of D0's mean accuracy mixed into a new prompt's accuracy estimate "
                          "(a sampled prompt is scored on one query; this keeps its reward on D0's scale)."})
    later_epochs: int = field(default=1, metadata={"help": "Epochs of the fine-tune in loops >= 2."})
    later_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate in loops >= 2 (default: the train learning rate)."})
    generation_batch_size: int = field(default=16, metadata={"help": "Queries per policy generate() call."})
    eval_greedy: bool = field(default=True, metadata={"help": "Score greedy policy prompts on the collect split."})
    seed: int = field(default=0, metadata={"help": "Seed of the policy sampling."})

    def __post_init__(self) -> None:
        if self.loops < 1:
            raise ValueError(f"loops must be >= 1; got {self.loops}.")
        if self.samples_per_query < 1:
            raise ValueError(f"samples_per_query must be >= 1; got {self.samples_per_query}.")
        if not 0.0 <= self.reward_floor_quantile <= 1.0:
            raise ValueError(f"reward_floor_quantile must be in [0, 1]; got {self.reward_floor_quantile}.")
        if not 0.0 <= self.d0_floor_quantile < 1.0:
            raise ValueError(f"d0_floor_quantile must be in [0, 1); got {self.d0_floor_quantile}.")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise ValueError("top_p must be in (0, 1] and temperature > 0.")




def help_of(config: type, name: str) -> str:
    """The help text of a config field, for the CLI option that sets it."""
    for item in fields(config):
        if item.name == name:
            return str(item.metadata.get("help", ""))
    raise KeyError(f"{config.__name__} has no field {name!r}")
