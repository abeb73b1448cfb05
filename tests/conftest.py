"""Shared test setup: where the real data lives, and markers for the real-model tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def data_dir() -> Path | None:
    path = Path(os.environ.get("QPO_DATA", DEFAULT_DATA))
    return path if (path / "sst2").is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The public data collection (../shared/data); tests that need it skip with the fix when it is absent."""
    path = data_dir()
    if path is None:
        pytest.skip("real data not found: set QPO_DATA to the data collection (../shared/data in this repo)")
    os.environ.setdefault("QPO_DATA", str(path))
    return path


@pytest.fixture(scope="module")
def tiny_target_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with the SmolLM2 tokenizer and chat template, as a target model path."""
    from _tiny_policy import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def smollm2_target():
    """One shared SmolLM2 target for the real-model tests (loading it takes a few seconds)."""
    from qpo_middleware.training.hf_target import HFTarget

    return HFTarget(batch_size=20)


# -- the tiny random policy (tests/_tiny.py), one per test module ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """The tiny random Llama policy checkpoint of ``tests/_tiny.py`` (a ``TinyPolicy``)."""
    from _tiny import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` exported as an fp32 bundle (a module may override it with a shared bundle)."""
    from _tiny import export_tiny

    return export_tiny(tiny, tmp_path_factory.mktemp("export") / "bundle")


@pytest.fixture(scope="module")
def optimizer(bundle: Path):
    """A CPU ``PromptOptimizer`` over this module's ``bundle``."""
    from qpo_middleware import PromptOptimizer

    return PromptOptimizer.from_bundle(bundle, provider="cpu")
