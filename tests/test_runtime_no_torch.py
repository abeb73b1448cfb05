"""The runtime must work with torch, transformers and optimum impossible to import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _tiny import QUERIES, TinyPolicy, build_checkpoint, export_tiny


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyPolicy, Path]:
    root = tmp_path_factory.mktemp("no-torch")
    tiny = build_checkpoint(root / "checkpoint")
    return tiny, export_tiny(tiny, root / "bundle")


BLOCKED_RUN = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("torch", "transformers", "optimum")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    import qpo_middleware
    from qpo_middleware import PromptOptimizer

    optimizer = PromptOptimizer.from_bundle(sys.argv[1], provider="auto")
    queries = json.loads(sys.argv[2])
    results = optimizer.optimize_batch(queries)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"prompts": [r.prompt for r in results], "tokens": [r.tokens for r in results],
                      "version": qpo_middleware.__version__, "loaded": loaded}))
    """
)


def test_runtime_runs_without_torch(tiny_bundle: tuple[TinyPolicy, Path]) -> None:
    tiny, bundle = tiny_bundle
    queries = QUERIES[:3]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(bundle), json.dumps(queries)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["version"] == "0.1.0"

    from qpo_middleware import PromptOptimizer

    expected = PromptOptimizer.from_bundle(bundle, provider="cpu").optimize_batch(queries)
    assert out["prompts"] == [r.prompt for r in expected]
    assert all(t >= 1 for t in out["tokens"])


def test_import_is_light() -> None:
    """``import qpo_middleware`` does not even load onnxruntime until the runtime is used."""
    code = "import sys, qpo_middleware; print(int('onnxruntime' in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
