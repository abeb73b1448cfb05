"""The QPO quality benchmark harness (``benchmarks/quality.py`` and friends; not part of the installed library).

* :mod:`.config`      — :class:`BenchmarkConfig`, what a benchmark measures and how;
* :mod:`.harness`     — :func:`benchmark`: every method scored on a run's held-out queries;
  ``qpo eval``'s methods (:mod:`qpo_middleware.training.evaluate`) plus the benchmark's own;
* :mod:`.policies`    — each loop's policy: its bundle through the runtime, or its checkpoint with torch;
* :mod:`.report`      — ``report.md`` from a results payload (rebuildable from ``results.json``);
* :mod:`.plots`       — PNG figures of a task's results (matplotlib);
* :mod:`.environment` — the hardware and package versions a run had.

Statistics come from :mod:`qpo_middleware.stats`.
"""

from __future__ import annotations

from .config import POLICY_BACKENDS, BenchmarkConfig
from .environment import environment
from .harness import VOLATILE_KEYS, BenchMethod, TaskBenchmark, benchmark, stable_view, training_calls
from .plots import write_plots
from .policies import loop_bundle
from .report import TARGET_GAIN, final_qpo, render_report, target_check, write_report

__all__ = [
    "POLICY_BACKENDS", "TARGET_GAIN", "VOLATILE_KEYS", "BenchMethod", "BenchmarkConfig", "TaskBenchmark", "benchmark",
    "environment", "final_qpo", "loop_bundle", "render_report", "stable_view", "target_check", "training_calls",
    "write_plots", "write_report",
]
