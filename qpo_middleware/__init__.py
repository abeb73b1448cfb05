"""qpo-middleware: a learned policy that writes a prompt for every query, served torch-free.

The runtime classes load lazily, so ``import qpo_middleware`` stays light (no
onnxruntime import until :class:`PromptOptimizer` is used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .bundle import BundleError
from .policy_format import PolicyFormat
from .template import Template

if TYPE_CHECKING:
    from .config import RuntimeConfig
    from .runtime import LatencyBudgetExceeded, OptimizedPrompt, PromptOptimizer, Status

__version__ = "0.1.0"

__all__ = ["BundleError", "LatencyBudgetExceeded", "OptimizedPrompt", "PolicyFormat", "PromptOptimizer",
           "RuntimeConfig", "Status", "Template", "__version__"]

_LAZY = {"PromptOptimizer", "OptimizedPrompt", "LatencyBudgetExceeded", "RuntimeConfig", "Status"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'qpo_middleware' has no attribute {name!r}")
