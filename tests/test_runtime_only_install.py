"""The runtime-only install serves: `pip install 'qpo-middleware[cpu]'` (no torch, no transformers) in a fresh
virtual environment runs `qpo --help`, `qpo rewrite` and `qpo bench` on a bundle, and a training command
stops with the line that installs the `train` extra. The CLI's import loads no training module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import build_checkpoint, export_tiny

REPO = Path(__file__).resolve().parents[1]


def test_cli_import_loads_no_training_module() -> None:
    code = ("import sys, qpo_middleware.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('qpo_middleware.training') "
            "or m.split('.')[0] in ('torch', 'transformers', 'optimum', 'onnxruntime')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_list_matches_each_command() -> None:
    """`qpo --help` lists each command with its own docstring's first line, without importing it."""
    from qpo_middleware.cli import COMMANDS, load_command

    for name, spec in COMMANDS.items():
        command = load_command(name)
        first = " ".join((command.help or "").split("\n\n")[0].split())
        assert first == spec.help, name


@pytest.fixture(scope="module")
def runtime_only_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install '<repo>[cpu]'` and nothing else (packages come from the registry or
    pip's cache, as for a user)."""
    root = tmp_path_factory.mktemp("runtime-only")
    # Build from a copy of the source: an in-tree build would leave build/ in the checkout.
    source = root / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", "results", "tests", "examples"))
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    proc = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", f"{source}[cpu]"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return env


def _run(env: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environ.update(COLUMNS="200", PATH=f"{env / 'bin'}{os.pathsep}{environ.get('PATH', '')}")
    return subprocess.run([str(env / "bin" / "qpo"), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=environ)


def test_runtime_only_install_serves(runtime_only_env: Path, tmp_path: Path) -> None:
    env = runtime_only_env
    python = str(env / "bin" / "python")
    missing = subprocess.run([python, "-c", "import importlib.util as u; "
                              "print([m for m in ('torch', 'transformers', 'optimum') if u.find_spec(m)])"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert missing.stdout.strip() == "[]", missing.stdout + missing.stderr  # really runtime-only

    bundle = export_tiny(build_checkpoint(tmp_path / "checkpoint"), tmp_path / "bundle")

    help_ = _run(env, "--help", cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    assert "rewrite" in help_.stdout and "train" in help_.stdout

    query = "An unexpectedly moving portrait of a family."
    rewrite = _run(env, "rewrite", query, "--bundle", str(bundle), "--json", cwd=tmp_path)
    assert rewrite.returncode == 0, rewrite.stderr
    result = json.loads(rewrite.stdout)
    assert query in result["text"] and result["status"] == "rewritten" and result["tokens"] >= 1

    bench = _run(env, "bench", str(bundle), "--new-tokens", "3", "--batch-sizes", "1,2", "--concurrency", "",
                 "--latency-queries", "2", "--json", str(tmp_path / "bench.json"), cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["latency_ms"]["n"] == 2

    train = _run(env, "train", "--run", str(tmp_path / "run"), cwd=tmp_path)
    assert train.returncode == 2, train.stdout + train.stderr
    message = " ".join((train.stdout + train.stderr).split())
    assert "pip install 'qpo-middleware[cpu,train]'" in message and "Traceback" not in message
