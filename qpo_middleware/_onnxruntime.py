"""Import ONNX Runtime with the fix in the message when it is missing, and warn on a double install.

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` (CUDA) install the same ``onnxruntime``
module: with both present, whichever was installed last silently wins. qpo therefore takes
ONNX Runtime from an extra, one or the other: ``pip install 'qpo-middleware[cpu]'`` or
``pip install 'qpo-middleware[gpu]'``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from types import ModuleType

logger = logging.getLogger("qpo_middleware.runtime")

MISSING = (
    "qpo-middleware needs ONNX Runtime to serve a bundle, and it comes as a choice: "
    "pip install 'qpo-middleware[cpu]' (the onnxruntime package) or pip install 'qpo-middleware[gpu]' "
    "(onnxruntime-gpu, for CUDA). Install one, not both."
)
BOTH = (
    "Both onnxruntime and onnxruntime-gpu are installed; they provide the same `onnxruntime` module and the "
    "one installed last wins. Fix: pip uninstall -y onnxruntime onnxruntime-gpu, then install one of them "
    "(pip install 'qpo-middleware[cpu]' or '[gpu]')."
)


def installed_distributions() -> list[str]:
    """Which ONNX Runtime distributions pip installed here (``onnxruntime``, ``onnxruntime-gpu``)."""
    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def import_onnxruntime() -> ModuleType:
    try:
        module = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    if len(installed_distributions()) > 1:
        logger.warning(BOTH)
    return module
