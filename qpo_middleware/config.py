"""How the runtime runs a bundle: ONNX Runtime session settings, batching, caching, budgets.

:class:`RuntimeConfig` is what :meth:`qpo_middleware.PromptOptimizer.from_bundle` takes. Its
defaults were chosen by measurement (``python benchmarks/latency.py``, the ``tuning`` section of
``benchmarks/results/latency-cpu/results.json``): on a 2-core CPU the full graph optimisation
level and one intra-op thread per core decode fastest; see ``docs/performance.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from ._onnxruntime import import_onnxruntime

ort = import_onnxruntime()


Provider = Literal["auto", "cpu", "cuda"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class RuntimeConfigError(ValueError):
    """A runtime setting is invalid; the message names the field and what is allowed."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings of a :class:`~qpo_middleware.PromptOptimizer`.

    Session: ``provider`` (``"auto"`` takes CUDA when onnxruntime-gpu provides it and logs
    the fallback to CPU otherwise), ``intra_op_threads`` (0 = one per physical core, ORT's
    default), ``inter_op_threads``, ``graph_optimization``, ``cpu_mem_arena``, ``io_binding``
    (``None``: on for CUDA, where the KV cache then stays on the device between steps).

    Serving: ``max_batch_size`` (rows per decode), ``batch_window_ms`` (``None`` = each call
    decodes on its own; a number turns on micro-batching: concurrent calls arriving within
    that window decode together, through a queue of at most ``max_queue`` waiting queries),
    ``cache_size`` (an LRU cache of greedy results per query; 0 = off), ``latency_budget_ms``
    (a call that would take longer stops decoding and, with ``fail_open``, returns the query
    with no prompt and ``status="timeout"``; without ``fail_open`` it raises
    :class:`~qpo_middleware.runtime.LatencyBudgetExceeded`). ``verify`` checks every bundle
    file's SHA-256 at load.

    Decoding: ``speculative`` (greedy decoding drafts from the bundle's prompt library and
    verifies each draft in one forward pass; the output is the same token for token, see
    :mod:`qpo_middleware.generator`; bundles without a library decode one token per step) and
    ``max_draft_tokens`` (the longest draft verified at once).
    """

    provider: Provider = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: GraphOptimization = "all"
    cpu_mem_arena: bool = True
    io_binding: bool | None = None
    max_batch_size: int = 16
    batch_window_ms: float | None = None
    max_queue: int = 1024
    cache_size: int = 0
    latency_budget_ms: float | None = None
    fail_open: bool = True
    verify: bool = True
    speculative: bool = True
    max_draft_tokens: int = 16

    def __post_init__(self) -> None:
        if self.provider not in ("auto", "cpu", "cuda"):
            raise RuntimeConfigError(f"provider must be 'auto', 'cpu' or 'cuda'; got {self.provider!r}.")
        for name in ("cpu_mem_arena", "fail_open", "verify", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise RuntimeConfigError(f"{name} must be true or false; got {getattr(self, name)!r}.")
        if self.graph_optimization not in _GRAPH_LEVELS:
            raise RuntimeConfigError(
                f"graph_optimization must be one of {', '.join(_GRAPH_LEVELS)}; got {self.graph_optimization!r}."
            )
        for name, low in (("intra_op_threads", 0), ("inter_op_threads", 0), ("max_batch_size", 1),
                          ("max_queue", 1), ("cache_size", 0), ("max_draft_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RuntimeConfigError(f"{name} must be an integer >= {low}; got {value!r}.")
        for name in ("batch_window_ms", "latency_budget_ms"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise RuntimeConfigError(f"{name} must be None or a number of milliseconds >= 0; got {value!r}.")

    def with_(self, **changes: Any) -> RuntimeConfig:
        """A copy with some fields changed (``None`` values are ignored, so optional overrides pass through)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise RuntimeConfigError(f"RuntimeConfig has no field(s) {unknown}; fields: {', '.join(sorted(known))}.")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = _GRAPH_LEVELS[self.graph_optimization]
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = self.cpu_mem_arena
        return options

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
