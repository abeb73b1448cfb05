"""What the quality benchmark measures and how: :class:`BenchmarkConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qpo_middleware.training.selector import SelectorConfig

POLICY_BACKENDS = ("onnx", "torch")


@dataclass
class BenchmarkConfig:
    """What :func:`qpo_bench.benchmark` measures and how."""

    split: str = "test"
    limit: int | None = None  # first N queries of the split (default: all)
    seed: int = 0  # bootstrap, random_pool and best-of-n sampling
    oracle: bool = True  # score every pool prompt on every test query (P x N target calls)
    best_of_n: int = 0  # 0 = off; else n sampled prompts per query from the final policy
    sample_top_k: int = 10
    sample_top_p: float = 0.9
    sample_temperature: float = 1.0
    quantize: str | None = "int8"  # bundle export: "int8" (CPU serving) or None (fp32)
    provider: str = "auto"  # runtime provider: auto, cpu or cuda
    # "onnx": each loop's checkpoint is exported and run through the torch-free runtime, one query at
    # a time (the product path, with latency). "torch": the checkpoint is run with transformers in
    # batches on the training device (a GPU), with no export and no latency: for full-size runs on a
    # machine whose ONNX Runtime has no GPU provider.
    policy_backend: str = "onnx"
    policy_batch_size: int = 64  # queries per decode call with the torch backend
    loops: tuple[int, ...] | None = None  # which loops to evaluate (default: every completed loop)
    examples_per_label: int = 3
    bootstrap_samples: int = 2000
    selector: SelectorConfig = field(default_factory=SelectorConfig)

    def __post_init__(self) -> None:
        if self.best_of_n < 0:
            raise ValueError(f"best_of_n must be >= 0; got {self.best_of_n}.")
        if self.quantize not in (None, "int8"):
            raise ValueError(f"quantize must be 'int8' or None; got {self.quantize!r}.")
        if self.policy_backend not in POLICY_BACKENDS:
            raise ValueError(f"policy_backend must be one of {', '.join(POLICY_BACKENDS)}; got {self.policy_backend!r}.")
        if self.policy_batch_size < 1:
            raise ValueError(f"policy_batch_size must be >= 1; got {self.policy_batch_size}.")
        if isinstance(self.selector, dict):
            self.selector = SelectorConfig(**self.selector)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
