"""Read and verify a QPO bundle: a directory holding ``qpo.json``, ``model.onnx`` and ``tokenizer.json``.

A bundle is data, never code: the manifest is JSON (no pickle, no remote code),
every file it names is checked against its SHA-256, and no name may point
outside the bundle directory. The manifest carries everything the runtime
needs (ONNX input/output names, KV-cache dims, the policy's token layout, the
template and generation defaults), so the runtime never branches on model type.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from .policy_format import PolicyFormat, PolicyFormatError, brief_repr
from .template import Template, TemplateError, format_fields

logger = logging.getLogger(__name__)

MANIFEST_NAME = "qpo.json"
FORMAT = "qpo-bundle"
FORMAT_VERSION = 1
_MAX_MANIFEST_BYTES = 16 << 20
# Upper bounds on the model dims in qpo.json: generous for any real decoder, and small enough that
# a tampered manifest cannot make the runtime build millions of input names or huge empty pasts.
_MAX_DIMS = {"num_layers": 1024, "num_kv_heads": 1024, "head_dim": 65536, "vocab_size": (1 << 31) - 1}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_NAME_CHARS = 255
# The decoder input (int64 [1]; 0 = all) that limits the logits to the last positions (bundles since its export).
LOGITS_TO_KEEP = "logits_to_keep"


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with or from an incompatible version; the message says which."""


def is_sha256(value: Any) -> bool:
    """True for a SHA-256 written as 64 lowercase hex digits (the one form bundles and checkpoints use)."""
    return isinstance(value, str) and _SHA256.match(value) is not None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_member(root: Path, name: Any, what: str) -> Path:
    """``root / name`` after checking that ``name`` is a plain relative path that stays inside ``root``.

    Absolute paths, ``..`` parts, backslashes and symlinks that resolve outside
    ``root`` are refused with a :class:`BundleError` naming the manifest field.
    """
    if not isinstance(name, str) or not name or "\x00" in name or len(name) > _MAX_NAME_CHARS:
        raise BundleError(
            f"qpo.json: {what} must be a non-empty file name of at most {_MAX_NAME_CHARS} characters without NUL; "
            f"got {brief_repr(name)}."
        )
    pure = PurePosixPath(name)
    if "\\" in name or pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", name):
        raise BundleError(
            f"qpo.json: {what} = {brief_repr(name)} points outside the bundle; bundle files must be plain relative "
            "names inside the bundle directory. Re-export the bundle with `qpo export`."
        )
    try:
        root = root.resolve()
        path = root.joinpath(*pure.parts)
        inside = path.resolve().is_relative_to(root)
    except (
        OSError,
        ValueError,
        RuntimeError,
    ) as exc:  # a name the OS refuses, a lone surrogate, a symlink loop
        raise BundleError(f"qpo.json: {what} = {brief_repr(name)} is not a usable file name: {exc}") from exc
    if not inside:
        raise BundleError(
            f"qpo.json: {what} = {brief_repr(name)} resolves outside the bundle directory (a symlink?); refusing to read it."
        )
    return path


def _is_file(path: Path, name: str) -> bool:
    """``path.is_file()``, with the OS errors it does not swallow (no permission, name too long) as a BundleError."""
    try:
        return path.is_file()
    except OSError as exc:
        raise BundleError(f"Bundle file {brief_repr(name)} cannot be read: {exc}") from exc


# ---------------------------------------------------------------------------- schema helpers


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise BundleError(f"qpo.json: required field '{where}{key}' is missing.")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass: accept it only where bool is asked for.
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BundleError(f"qpo.json: field '{where}{key}' must be of type {names}; got {brief_repr(value)}.")
    return value


def _no_unknown(data: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = set(data) - known
    if unknown:
        raise BundleError(
            f"qpo.json: unknown field(s) {brief_repr(sorted(map(str, unknown)))} in {where or 'the manifest'}; known: {sorted(known)}. "
            "Upgrade qpo-middleware if the bundle was made by a newer version."
        )


def _object(data: Mapping[str, Any], key: str, where: str = "") -> Mapping[str, Any]:
    return _field(data, key, dict, where)


# ---------------------------------------------------------------------------- manifest parts


STRATEGIES = ("generate", "choose")


@dataclass(frozen=True)
class GenerationConfig:
    """How the policy decodes: the one settings type of every decode loop (runtime and training).

    The bundle stores its defaults; a call overrides fields with :meth:`with_` (the way
    onnxruntime-genai's ``GeneratorParams`` are set per generator), e.g.
    ``optimizer.optimize(q, do_sample=True)`` or a training loop's sampling temperature.
    """

    max_new_tokens: int = 40
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    suppress_token_ids: tuple[int, ...] = ()
    # "generate": the policy writes a prompt; "choose": it picks one of the bundle's library prompts
    # (qpo_middleware.choice), which needs a bundle with a library and is deterministic.
    strategy: str = "generate"

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> BundleError:
            return BundleError(f"generation.{name} must be {rule}; got {brief_repr(getattr(self, name))}.")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise bad("max_new_tokens", "an integer in 1..4096")
        if not 1 <= self.max_new_tokens <= 4096:
            raise bad("max_new_tokens", "an integer in 1..4096")
        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "true or false")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise bad("temperature", "a number > 0")
        if not (math.isfinite(temperature) and temperature > 0):
            raise bad("temperature", "a number > 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 turns top-k off)")
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
            raise bad("top_p", "a number in (0, 1] (1 turns top-p off)")
        ids = self.suppress_token_ids
        if not isinstance(ids, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
        ):
            raise bad("suppress_token_ids", "a list of non-negative token ids")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", " or ".join(map(repr, STRATEGIES)))
        if self.strategy == "choose" and self.do_sample:
            raise BundleError("generation: do_sample applies to strategy 'generate'; strategy 'choose' picks the best "
                              "library prompt deterministically. Pass strategy='generate' to sample.")

    @classmethod
    def for_policy(cls, policy: PolicyFormat, **overrides: Any) -> GenerationConfig:
        """The defaults for ``policy``: greedy, capped at its prompt length, never emitting its reward or
        separator tokens (its EOS ids stay allowed); ``overrides`` change fields (``None`` is ignored)."""
        suppress = tuple(sorted({*policy.reward_token_ids, *policy.separator_ids} - set(policy.eos_token_ids)))
        return cls(max_new_tokens=policy.prompt_max_tokens, suppress_token_ids=suppress).with_(**overrides)

    def with_(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed; ``None`` values are ignored, so optional per-call overrides pass through."""
        known = set(self.__dataclass_fields__)
        unknown = sorted(set(changes) - known)
        if unknown:
            raise BundleError(f"GenerationConfig has no field(s) {unknown}; fields: {', '.join(sorted(known))}.")
        values = {k: v for k, v in changes.items() if v is not None}
        if not values:  # every call without overrides (the serving path) keeps the validated bundle settings
            return self
        if "suppress_token_ids" in values:
            values["suppress_token_ids"] = tuple(values["suppress_token_ids"])
        return replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["suppress_token_ids"] = list(self.suppress_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationConfig:
        if not isinstance(data, Mapping):
            raise BundleError(f"generation must be a JSON object; got {type(data).__name__}.")
        known = {f for f in cls.__dataclass_fields__}
        _no_unknown(data, known, "generation")
        values = dict(data)
        if "suppress_token_ids" in values:
            if not isinstance(values["suppress_token_ids"], list | tuple):
                raise BundleError(
                    f"generation.suppress_token_ids must be a list of token ids; got {brief_repr(values['suppress_token_ids'])}."
                )
            values["suppress_token_ids"] = tuple(values["suppress_token_ids"])
        return cls(**values)


@dataclass(frozen=True)
class ModelSpec:
    """The exported decoder's contract, read from the ONNX graph at export time."""

    file: str
    dtype: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    past_key_name: str
    past_value_name: str
    present_key_name: str
    present_value_name: str
    vocab_size: int
    has_position_ids: bool
    logits_to_keep: bool = False  # the graph takes LOGITS_TO_KEEP (bundles exported before it do not)

    def past_names(self) -> list[tuple[str, str]]:
        """(key, value) input names per layer."""
        return [
            (self.past_key_name.format(layer=i), self.past_value_name.format(layer=i))
            for i in range(self.num_layers)
        ]

    def present_names(self) -> list[tuple[str, str]]:
        """(key, value) output names per layer."""
        return [
            (self.present_key_name.format(layer=i), self.present_value_name.format(layer=i))
            for i in range(self.num_layers)
        ]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_names"] = list(self.input_names)
        data["output_names"] = list(self.output_names)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        if not isinstance(data, Mapping):
            raise BundleError(f"model must be a JSON object; got {type(data).__name__}.")
        where = "model."
        _no_unknown(data, set(cls.__dataclass_fields__), "model")
        values: dict[str, Any] = {}
        for key in (
            "file",
            "dtype",
            "past_key_name",
            "past_value_name",
            "present_key_name",
            "present_value_name",
        ):
            values[key] = _field(data, key, str, where)
        for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
            value = _field(data, key, int, where)
            if not 1 <= value <= _MAX_DIMS[key]:
                raise BundleError(
                    f"qpo.json: field model.{key} must be an integer in 1..{_MAX_DIMS[key]}; got {brief_repr(value)}."
                )
            values[key] = value
        values["has_position_ids"] = _field(data, "has_position_ids", bool, where)
        if "logits_to_keep" in data:
            values["logits_to_keep"] = _field(data, "logits_to_keep", bool, where)
        for key in ("input_names", "output_names"):
            names = _field(data, key, list, where)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise BundleError(
                    f"qpo.json: field model.{key} must be a non-empty list of names; got {brief_repr(names)}."
                )
            values[key] = tuple(names)
        if values["dtype"] not in ("fp32", "fp16", "int8", "int4", "int8-dynamic"):
            raise BundleError(
                "qpo.json: field model.dtype must be fp32, fp16, int8, int4 or int8-dynamic; "
                f"got {brief_repr(values['dtype'])}."
            )
        for key in ("past_key_name", "past_value_name", "present_key_name", "present_value_name"):
            template = values[key]
            try:  # only plain {layer} fields: a format spec like {layer:>1000000000} would allocate a gigabyte
                ok = set(format_fields(template)) == {"layer"}
            except ValueError:
                ok = False
            if not ok:
                raise BundleError(
                    f"qpo.json: field model.{key} must be a name pattern with one '{{layer}}' field, "
                    f"like 'past_key_values.{{layer}}.key'; got {brief_repr(template)}."
                )
        spec = cls(**values)
        check_model_io(spec, spec.input_names, spec.output_names, "qpo.json: model.input_names/output_names")
        return spec


def check_model_io(spec: ModelSpec, inputs: Iterable[str], outputs: Iterable[str], source: str) -> None:
    """The one set of input/output rules of the exported decoder, used by export, validation and the runtime.

    ``inputs``/``outputs`` are the names ``source`` offers (the manifest's lists, the ONNX graph or
    the session). It must take ``input_ids``, ``attention_mask``, ``position_ids`` when
    ``spec.has_position_ids``, ``logits_to_keep`` when ``spec.logits_to_keep``, and every layer's past
    key/value, and nothing else the runtime cannot feed; it must return ``logits`` and every layer's
    present key/value.
    """
    needed_in = {"input_ids", "attention_mask"} | {n for pair in spec.past_names() for n in pair}
    if spec.has_position_ids:
        needed_in.add("position_ids")
    if spec.logits_to_keep:
        needed_in.add(LOGITS_TO_KEEP)
    needed_out = {"logits"} | {n for pair in spec.present_names() for n in pair}
    inputs, outputs = set(inputs), set(outputs)
    missing = sorted(needed_in - inputs)
    if missing:
        raise BundleError(f"{source} lacks input(s) {brief_repr(missing)}; re-export the bundle with `qpo export`.")
    unknown = sorted(inputs - needed_in)
    if unknown:
        raise BundleError(
            f"{source} takes input(s) {brief_repr(unknown)} that the runtime does not feed; re-export it with "
            "`qpo export` (task text-generation-with-past)."
        )
    missing = sorted(needed_out - outputs)
    if missing:
        raise BundleError(f"{source} lacks output(s) {brief_repr(missing)}; re-export the bundle with `qpo export`.")


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``qpo.json``; ``root`` is the bundle directory."""

    root: Path
    format_version: int
    created_by: str
    base_model: str
    task: str
    training_data_sha256: str
    model: ModelSpec
    tokenizer_file: str
    policy: PolicyFormat
    template: Template
    generation: GenerationConfig
    files: dict[str, str] = field(default_factory=dict)
    library_file: str | None = None  # the prompt library (qpo_middleware.library); bundles before it have none

    @property
    def model_path(self) -> Path:
        return safe_member(self.root, self.model.file, "model.file")

    @property
    def library_path(self) -> Path | None:
        return None if self.library_file is None else safe_member(self.root, self.library_file, "library.file")

    @property
    def tokenizer_path(self) -> Path:
        return safe_member(self.root, self.tokenizer_file, "tokenizer.file")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written as ``qpo.json``."""
        data = {
            "format": FORMAT,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "base_model": self.base_model,
            "task": self.task,
            "training_data_sha256": self.training_data_sha256,
            "model": self.model.to_dict(),
            "tokenizer": {"file": self.tokenizer_file},
            "policy": self.policy.to_dict(),
            "template": self.template.to_dict(),
            "generation": self.generation.to_dict(),
            "files": dict(sorted(self.files.items())),
        }
        if self.library_file is not None:
            data["library"] = {"file": self.library_file}
        return data


def parse_manifest(data: Any, root: Path) -> Manifest:
    """Validate the JSON object of a ``qpo.json`` (no file access besides path checks)."""
    if not isinstance(data, dict):
        raise BundleError(f"qpo.json must hold a JSON object; got {type(data).__name__}.")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise BundleError(
            f"qpo.json: field 'format' must be {FORMAT!r}; got {brief_repr(fmt)}. This is not a QPO bundle."
        )
    version = _field(data, "format_version", int, "")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"qpo.json: bundle format_version {brief_repr(version)} is not supported by this qpo-middleware (it reads version "
            f"{FORMAT_VERSION}); re-export with a matching qpo-middleware, or install the version that made it "
            f"({brief_repr(data.get('created_by', 'unknown'))})."
        )
    _no_unknown(
        data,
        {
            "format",
            "format_version",
            "created_by",
            "base_model",
            "task",
            "training_data_sha256",
            "model",
            "tokenizer",
            "policy",
            "template",
            "generation",
            "files",
            "library",
        },
        "",
    )
    created_by = _field(data, "created_by", str, "")
    base_model = _field(data, "base_model", str, "")
    task = _field(data, "task", str, "")
    training_hash = _field(data, "training_data_sha256", str, "")
    if not is_sha256(training_hash):
        raise BundleError(
            f"qpo.json: field 'training_data_sha256' must be 64 lowercase hex digits; got {brief_repr(training_hash)}."
        )
    model = ModelSpec.from_dict(_object(data, "model"))
    tokenizer = _object(data, "tokenizer")
    _no_unknown(tokenizer, {"file"}, "tokenizer")
    tokenizer_file = _field(tokenizer, "file", str, "tokenizer.")
    try:
        policy = PolicyFormat.from_dict(_object(data, "policy"))
        template = Template.from_dict(_object(data, "template"))
    except (PolicyFormatError, TemplateError) as exc:
        raise BundleError(f"qpo.json: {exc}") from exc
    generation = GenerationConfig.from_dict(_object(data, "generation"))
    too_big = [
        i
        for i in (
            *policy.reward_token_ids,
            *policy.separator_ids,
            *policy.eos_token_ids,
            *policy.prefix_ids,
            *generation.suppress_token_ids,
        )
        if i >= model.vocab_size
    ]
    if policy.pad_token_id >= model.vocab_size:
        too_big.append(policy.pad_token_id)
    if too_big:
        raise BundleError(
            f"qpo.json: token id(s) {brief_repr(sorted(set(too_big)))} in policy/generation are outside the model's vocabulary "
            f"(model.vocab_size = {model.vocab_size})."
        )

    files = _object(data, "files")
    for name, digest in files.items():
        safe_member(root, name, f"files[{brief_repr(name)}]")
        if not is_sha256(digest):
            raise BundleError(
                f"qpo.json: files[{brief_repr(name)}] must be a SHA-256 of 64 lowercase hex digits; got {brief_repr(digest)}."
            )
    library_file = None
    if "library" in data:
        library = _object(data, "library")
        _no_unknown(library, {"file"}, "library")
        library_file = _field(library, "file", str, "library.")
    named = [("model.file", model.file), ("tokenizer.file", tokenizer_file)]
    if library_file is not None:
        named.append(("library.file", library_file))
    for what, name in named:
        safe_member(root, name, what)
        if name not in files:
            raise BundleError(
                f"qpo.json: {what} = {brief_repr(name)} has no checksum in 'files'; every bundle file must be listed. "
                "Re-export the bundle with `qpo export`."
            )
    if MANIFEST_NAME in files:
        raise BundleError("qpo.json: 'files' must not list qpo.json itself.")
    return Manifest(
        root=root,
        format_version=version,
        created_by=created_by,
        base_model=base_model,
        task=task,
        training_data_sha256=training_hash,
        model=model,
        tokenizer_file=tokenizer_file,
        policy=policy,
        template=template,
        generation=generation,
        files=dict(files),
        library_file=library_file,
    )


def verify_files(manifest: Manifest) -> None:
    """Check that every listed file exists inside the bundle and matches its SHA-256."""
    for name, expected in manifest.files.items():
        path = safe_member(manifest.root, name, f"files[{brief_repr(name)}]")
        if not _is_file(path, name):
            raise BundleError(
                f"Bundle {manifest.root}: file {brief_repr(name)} listed in qpo.json is missing."
            )
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise BundleError(f"Bundle {manifest.root}: cannot read {brief_repr(name)}: {exc}") from exc
        if actual != expected:
            raise BundleError(
                f"Bundle {manifest.root}: checksum mismatch for {brief_repr(name)} (expected {expected[:12]}…, got "
                f"{actual[:12]}…). The file is damaged or was modified; copy the bundle again or re-export it."
            )


def load_manifest(bundle_dir: str | os.PathLike[str], *, verify: bool = True) -> Manifest:
    """Read, validate and (with ``verify``) checksum a bundle directory.

    Raises :class:`BundleError` with a message naming the offending field or file.
    Without ``verify`` the checksums are skipped but files must still exist.
    """
    root = Path(bundle_dir).expanduser()
    if not root.is_dir():
        raise BundleError(f"{root} is not a directory; pass the bundle directory made by `qpo export`.")
    manifest_path = safe_member(root, MANIFEST_NAME, "the manifest")
    if not _is_file(manifest_path, MANIFEST_NAME):
        raise BundleError(
            f"{root} has no {MANIFEST_NAME}: it is not a QPO bundle (make one with `qpo export`)."
        )
    if manifest_path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{manifest_path} is larger than {_MAX_MANIFEST_BYTES >> 20} MiB; it is not a QPO manifest."
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an int over 4300 digits, deep nesting
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    manifest = parse_manifest(data, root)
    if verify:
        verify_files(manifest)
    else:
        for name in manifest.files:
            if not _is_file(safe_member(root, name, f"files[{brief_repr(name)}]"), name):
                raise BundleError(f"Bundle {root}: file {brief_repr(name)} listed in qpo.json is missing.")
    logger.debug("Loaded bundle %s (%s, %s)", root, manifest.model.dtype, manifest.created_by)
    return manifest
