"""Export a trained policy checkpoint into a QPO bundle (``model.onnx`` + ``tokenizer.json`` + ``qpo.json``).

The decoder is exported with Optimum (task ``text-generation-with-past``: one
merged ``model.onnx`` that takes an empty past to start), optionally quantized
to dynamic int8 (``ORTQuantizer``, avx2 config) or exported in fp16. Names and
KV-cache dims written to the manifest are read from the exported graph, never
from the model type. The bundle is built in a temporary directory beside
``out_dir`` and renamed into place, so a crash never leaves half a bundle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpo_middleware.bundle import (
    FORMAT_VERSION,
    LOGITS_TO_KEEP,
    MANIFEST_NAME,
    BundleError,
    GenerationConfig,
    Manifest,
    ModelSpec,
    check_model_io,
    is_sha256,
    load_manifest,
    sha256_file,
)
from qpo_middleware.choice import RouteTable
from qpo_middleware.library import LIBRARY_FILE, build_library, write_library
from qpo_middleware.policy_format import PolicyFormat
from qpo_middleware.template import Template

from .io import atomic_write_json, fsync_dir

logger = logging.getLogger(__name__)

POLICY_META_NAME = "qpo_policy.json"
POLICY_META_FORMAT = "qpo-policy-meta"
CHOICE_OFFSETS_NAME = "qpo_choice_offsets.json"
CHOICE_OFFSETS_FORMAT = "qpo-choice-offsets"
ROUTE_TABLE_NAME = "qpo_route_table.json"
ROUTE_TABLE_FORMAT = "qpo-route-table"
EXPORT_TASK = "text-generation-with-past"
# "int8": weight-only int8 (MatMulNBits, blocks of 32 along the input dimension, symmetric,
# int8 compute). Each row's activations are quantized on their own, so a row's prompt does not
# depend on its batch mates, and greedy prompts stay close to fp32. "int8-dynamic": ONNX Runtime's
# dynamic quantization (MatMulInteger with one activation scale per tensor): measured on SmolLM2
# it changes most greedy prompts, and a row's result depends on the rest of its batch. "int4": the
# same block-wise scheme with 4-bit weights (half int8's weight bytes, further from fp32).
QUANTIZE_CHOICES = ("int8", "int4", "int8-dynamic")
INT8_BLOCK_SIZE = 32
# MatMulNBits' compute type: 4 = int8 (activations quantized per block of each row), 1 = fp32.
INT8_ACCURACY_LEVEL = 4
WEIGHT_ONLY_BITS = {"int8": 8, "int4": 4}
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


class ExportError(ValueError):
    """The export cannot proceed; the message says why and what to do."""


# ---------------------------------------------------------------------------- policy metadata in a checkpoint


@dataclass(frozen=True)
class PolicyMeta:
    """What ``qpo train`` records in a checkpoint (``qpo_policy.json``) so that export knows how the policy was
    trained: its token layout, the template its prompts were scored with, the task, the base model and the
    SHA-256 of the training data. The one definition of that file."""

    policy: PolicyFormat
    template: Template
    task: str
    base_model: str
    training_data_sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.policy, PolicyFormat) or not isinstance(self.template, Template):
            raise ExportError("policy must be a PolicyFormat and template a Template.")
        for key in ("task", "base_model"):
            if not isinstance(getattr(self, key), str):
                raise ExportError(f"{key} must be a string; got {getattr(self, key)!r}.")
        if not is_sha256(self.training_data_sha256):
            raise ExportError(
                "training_data_sha256 must be 64 lowercase hex digits (a SHA-256); "
                f"got {self.training_data_sha256!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_META_FORMAT,
            "format_version": 1,
            "policy": self.policy.to_dict(),
            "template": self.template.to_dict(),
            "task": self.task,
            "base_model": self.base_model,
            "training_data_sha256": self.training_data_sha256,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = POLICY_META_NAME) -> PolicyMeta:
        if not isinstance(data, dict) or data.get("format") != POLICY_META_FORMAT:
            raise ExportError(
                f"{where}: field 'format' must be {POLICY_META_FORMAT!r}; the file is not qpo policy metadata."
            )
        if data.get("format_version") != 1:
            raise ExportError(
                f"{where}: format_version {data.get('format_version')!r} is not supported; "
                "re-save the checkpoint with a matching qpo-middleware."
            )
        for key in ("task", "base_model", "training_data_sha256"):
            if not isinstance(data.get(key), str):
                raise ExportError(f"{where}: field {key!r} must be a string; got {data.get(key)!r}.")
        return cls(
            policy=PolicyFormat.from_dict(data.get("policy")),
            template=Template.from_dict(data.get("template")),
            task=data["task"],
            base_model=data["base_model"],
            training_data_sha256=data["training_data_sha256"],
        )


def write_policy_meta(checkpoint_dir: str | os.PathLike[str], meta: PolicyMeta) -> Path:
    """Write ``qpo_policy.json`` into a checkpoint so ``qpo export`` knows how the policy was trained."""
    path = Path(checkpoint_dir) / POLICY_META_NAME
    atomic_write_json(path, meta.to_dict())
    return path


def read_policy_meta(checkpoint_dir: str | os.PathLike[str]) -> PolicyMeta:
    """Read a checkpoint's ``qpo_policy.json``; a clear error when it is missing or not policy metadata."""
    path = Path(checkpoint_dir) / POLICY_META_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {checkpoint_dir} is not a checkpoint saved by `qpo train` (it writes the policy "
            "format there). Point at a checkpoint directory from `qpo train`, or write the file with "
            "qpo_middleware.training.export.write_policy_meta()."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc
    return PolicyMeta.from_dict(data, str(path))


# ---------------------------------------------------------------------------- the export


@dataclass(frozen=True)
class ChoiceOffsets:
    """What training records in a checkpoint (``qpo_choice_offsets.json``) for strategy 'choose': each library
    prompt's mean log-probability under the preference step's reference over ``queries`` training queries.
    The one definition of that file; export copies the offsets into the bundle's ``library.json``."""

    offsets: dict[str, float]
    queries: int

    def __post_init__(self) -> None:
        if not all(isinstance(k, str) and isinstance(v, float) and math.isfinite(v) for k, v in self.offsets.items()):
            raise ExportError("choice offsets must map prompt texts to finite numbers.")
        if isinstance(self.queries, bool) or not isinstance(self.queries, int) or self.queries < 1:
            raise ExportError(f"choice offsets need queries >= 1; got {self.queries!r}.")


def write_choice_offsets(checkpoint_dir: str | os.PathLike[str], offsets: ChoiceOffsets) -> Path:
    """Write ``qpo_choice_offsets.json`` into a checkpoint."""
    path = Path(checkpoint_dir) / CHOICE_OFFSETS_NAME
    atomic_write_json(path, {"format": CHOICE_OFFSETS_FORMAT, "format_version": 1, "queries": offsets.queries,
                             "offsets": offsets.offsets})
    return path


def read_choice_offsets(checkpoint_dir: str | os.PathLike[str]) -> ChoiceOffsets | None:
    """A checkpoint's choice offsets, or None when training wrote none (no preference step)."""
    path = Path(checkpoint_dir) / CHOICE_OFFSETS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"Cannot read {path}: {exc}; delete it to export without offsets, or retrain.") from exc
    if not isinstance(data, dict) or data.get("format") != CHOICE_OFFSETS_FORMAT or data.get("format_version") != 1:
        raise ExportError(f"{path} is not a version-1 {CHOICE_OFFSETS_FORMAT!r} file; retrain the loop to rewrite it.")
    offsets = data.get("offsets")
    if not isinstance(offsets, dict):
        raise ExportError(f"{path}: 'offsets' must be an object (prompt -> number).")
    return ChoiceOffsets(offsets={k: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                                  for k, v in offsets.items()}, queries=data.get("queries"))


def write_route_table(checkpoint_dir: str | os.PathLike[str], table: RouteTable) -> Path:
    """Write ``qpo_route_table.json`` into a checkpoint: what a ``label_route`` policy's 'choose' sends by
    (:class:`~qpo_middleware.choice.RouteTable`); export copies it into the bundle's ``library.json``."""
    path = Path(checkpoint_dir) / ROUTE_TABLE_NAME
    atomic_write_json(path, {"format": ROUTE_TABLE_FORMAT, "format_version": 1, "table": table.to_dict()})
    return path


def read_route_table(checkpoint_dir: str | os.PathLike[str]) -> RouteTable | None:
    """A checkpoint's route table, or None when training wrote none (not a ``label_route`` policy)."""
    path = Path(checkpoint_dir) / ROUTE_TABLE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != ROUTE_TABLE_FORMAT or data.get("format_version") != 1:
            raise ValueError(f"not a version-1 {ROUTE_TABLE_FORMAT!r} file")
        return RouteTable.from_dict(data.get("table"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"Cannot read {path}: {exc}; retrain the loop to rewrite it, or delete it to export "
                          "a bundle that chooses by likelihood alone.") from exc


def export_bundle(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    meta: PolicyMeta | None = None,
    quantize: str | None = None,
    fp16: bool = False,
    generation: GenerationConfig | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    on_step: Callable[[str], None] | None = None,
    library: Mapping[str, int] | None = None,
    offsets: Mapping[str, float] | None = None,
    routes: RouteTable | None = None,
) -> Path:
    """Export ``checkpoint_dir`` (a Hugging Face causal LM + tokenizer) as a bundle at ``out_dir``.

    ``quantize="int8"`` stores MatMul weights as block-wise int8 (CPU serving; see
    :data:`QUANTIZE_CHOICES`), ``"int4"`` as block-wise 4-bit, ``"int8-dynamic"`` applies ORT's dynamic quantization;
    ``fp16=True`` exports half precision (GPU serving). ``meta`` defaults to the checkpoint's own
    ``qpo_policy.json`` (:func:`read_policy_meta`). ``generation`` (a :class:`GenerationConfig`, or
    a mapping of fields) overrides the decoding defaults of :meth:`GenerationConfig.for_policy`.

    ``library`` (prompt text -> training record count) becomes the bundle's prompt library
    (``library.json``, drafts for speculative decoding); by default it is read from the run the
    checkpoint belongs to (:func:`run_prompt_library`), and ``{}`` writes none. ``offsets`` (prompt text ->
    choice offset, see :mod:`qpo_middleware.choice`) go into the library beside them; by default they are
    the checkpoint's own (:func:`read_choice_offsets`) when they cover the library. With
    ``generation={"strategy": "choose"}`` the bundle picks a library prompt per query by default; without a
    strategy in ``generation`` it does so when there are offsets (a preference-trained policy, the default
    recipe, ranks the library's prompts: its own greedy text is not a prompt) and writes one otherwise.
    ``routes`` (a ``label_route`` policy's :class:`~qpo_middleware.choice.RouteTable`; by default the checkpoint's
    own, :func:`read_route_table`, when the library holds its prompts) go into the library too, and make 'choose'
    the default strategy: the bundle scores the routes and sends by the table.
    Returns ``out_dir``.
    """
    checkpoint = Path(checkpoint_dir).expanduser()
    out = Path(out_dir).expanduser().absolute()
    step = on_step or (lambda message: logger.info("%s", message))

    # -- validate everything cheap before the slow part ----------------------------------
    meta = meta if meta is not None else read_policy_meta(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a Hugging Face checkpoint (no config.json); pass the directory written by "
            "`qpo train` (model.save_pretrained + tokenizer.save_pretrained)."
        )
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} or None; got {quantize!r}.")
    if quantize and fp16:
        raise ExportError(
            f"Choose one of quantize={quantize!r} (CPU serving) and fp16=True (GPU serving), not both."
        )
    policy = meta.policy
    if isinstance(generation, GenerationConfig):
        generation = generation.to_dict()
    asked = dict(generation or {})
    gen = GenerationConfig.from_dict({**GenerationConfig.for_policy(policy).to_dict(), **asked})
    _check_out_dir(out, overwrite)
    dtype = quantize if quantize else "fp16" if fp16 else "fp32"
    if library is None:
        library = run_prompt_library(checkpoint) or {}
    if offsets is None and library and (recorded := read_choice_offsets(checkpoint)) is not None:
        missing = [text for text in library if text not in recorded.offsets]
        if missing:
            logger.warning("%s has choice offsets for another library (%d of %d prompts missing): exporting without "
                           "them, so strategy 'choose' scores by log-probability alone", checkpoint, len(missing),
                           len(library))
        else:
            offsets = recorded.offsets
    if routes is None and library and (routes := read_route_table(checkpoint)) is not None and \
            (missing := [t for t in (*routes.routes, *routes.prompts) if t not in library]):
        logger.warning("%s has a route table naming %d prompt(s) outside the library: exporting without it, so "
                       "strategy 'choose' scores by log-probability alone", checkpoint, len(missing))
        routes = None
    if routes is not None and not library:
        raise ExportError("routes= sends library prompts, and this export writes no library: pass library= too.")
    if "strategy" not in asked and routes is not None and not gen.do_sample:
        gen = dataclasses.replace(gen, strategy="choose")
        step(f"{checkpoint} carries a route table (a label_route policy): the bundle scores its "
             f"{len(routes.routes)} routes per query and sends by the table by default")
    if "strategy" not in asked and offsets is not None and not gen.do_sample:
        gen = dataclasses.replace(gen, strategy="choose")
        step(f"{checkpoint} carries choice offsets (a preference-trained policy): the bundle chooses one of its "
             f"{len(library)} library prompts per query by default")
    if gen.strategy == "choose" and not library:
        raise ExportError(f"strategy 'choose' picks one of the bundle's library prompts, and {checkpoint} has none: "
                          "export a checkpoint of a run directory (RUN/policy/loop_<t>/checkpoint), or pass library=.")

    out.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        work, staging = root / "work", root / "bundle"
        staging.mkdir(parents=True)

        step(f"Exporting {checkpoint} to ONNX ({EXPORT_TASK}, {'fp16' if fp16 else 'fp32'})")
        onnx_dir = _optimum_export(checkpoint, work / "onnx", fp16=fp16)
        if quantize in WEIGHT_ONLY_BITS:
            step(f"Quantizing MatMul weights to block-wise {quantize} (blocks of {INT8_BLOCK_SIZE})")
            onnx_dir = _quantize_weight_only(onnx_dir, work / quantize, WEIGHT_ONLY_BITS[quantize])
        elif quantize == "int8-dynamic":
            step("Quantizing to dynamic int8 (avx2)")
            onnx_dir = _quantize_int8(onnx_dir, work / "int8")

        step("Letting prefill compute the last position's logits only")
        _add_logits_to_keep(onnx_dir / MODEL_FILE)
        step("Writing the bundle")
        model_files = _model_files(onnx_dir / MODEL_FILE)
        for name in model_files:
            os.replace(onnx_dir / name, staging / name)
        _write_tokenizer(checkpoint, staging / TOKENIZER_FILE)

        step("Checking the exported model")
        spec = _inspect_model(staging / MODEL_FILE, dtype)
        vocab_size = _smoke_test(staging, spec, policy)
        spec = dataclasses.replace(spec, vocab_size=vocab_size)
        _check_tokenizer(staging / TOKENIZER_FILE, policy, gen, vocab_size)
        files = [*model_files, TOKENIZER_FILE]
        if library:
            files.append(_write_library(staging, library, policy, offsets, routes))

        from qpo_middleware import __version__

        manifest = Manifest(
            root=staging,
            format_version=FORMAT_VERSION,
            created_by=f"qpo-middleware {__version__}",
            base_model=meta.base_model,
            task=meta.task,
            training_data_sha256=meta.training_data_sha256,
            model=spec,
            tokenizer_file=TOKENIZER_FILE,
            policy=policy,
            template=meta.template,
            generation=gen,
            files={name: sha256_file(staging / name) for name in sorted(files)},
            library_file=LIBRARY_FILE if library else None,
        )
        atomic_write_json(staging / MANIFEST_NAME, manifest.to_dict())
        load_manifest(staging, verify=False)  # the runtime's own validator must accept what we wrote
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)

        _publish(staging, out, root, overwrite)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.iterdir())
    logger.info("Bundle written to %s (%s, %.1f MB)", out, dtype, size / 1e6)
    return out


def run_prompt_library(checkpoint: str | os.PathLike[str]) -> dict[str, int] | None:
    """The distinct prompts (text -> record count) the policy at ``checkpoint`` was trained on: D0 and every
    loop's kept prompts up to its loop, read from the run it belongs to (``RUN/policy/loop_<t>/checkpoint``).

    ``None`` for a checkpoint outside a run directory (no library is written then).
    """
    from .dataset import OfflineDataset
    from .run import RunPaths

    path = Path(checkpoint).expanduser().absolute()
    loop = re.fullmatch(r"loop_(\d+)", path.parent.name)
    if path.name != "checkpoint" or loop is None or path.parent.parent.name != "policy":
        return None
    run = RunPaths(path.parent.parent.parent)
    if not run.dataset.is_file():
        return None
    last = int(loop.group(1))
    return dict(Counter(r.prompt for r in OfflineDataset(run.root).records if r.loop <= last))


def _write_library(staging: Path, prompts: Mapping[str, int], policy: PolicyFormat,
                   offsets: Mapping[str, float] | None = None, routes: RouteTable | None = None) -> str:
    """Tokenize the prompts with the bundle's own tokenizer file, as the policy was trained to write them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(staging / TOKENIZER_FILE))
    try:
        entries = build_library(prompts, policy, lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                                offsets)
        write_library(staging / LIBRARY_FILE, entries, routes)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    logger.info("Prompt library: %d distinct prompts", len(entries))
    return LIBRARY_FILE


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        if not overwrite:
            raise ExportError(f"{out} exists and is not a directory; pass --overwrite to replace it.")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"{out} already exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
            "or choose another output directory."
        )


def _publish(staging: Path, out: Path, root: Path, overwrite: bool) -> None:
    """Move the finished bundle into place; an existing one is moved aside first and deleted after."""
    _check_out_dir(out, overwrite)
    if out.is_symlink() or out.exists():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        else:
            os.replace(out, root / "previous")  # removed with the temp dir
    os.replace(staging, out)
    fsync_dir(out.parent)


def _optimum_export(checkpoint: Path, target: Path, *, fp16: bool) -> Path:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ImportError(
            "Exporting needs the training extras: pip install 'qpo-middleware[train]' (optimum-onnx, torch)."
        ) from exc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main_export(
            str(checkpoint),
            output=target,
            task=EXPORT_TASK,
            dtype="fp16" if fp16 else "fp32",
            device="cpu",
            framework="pt",
            library_name="transformers",
            local_files_only=True,
            do_validation=False,
        )
    for warning in caught:  # tracer warnings are expected; keep them out of the user's console
        logger.debug("export warning: %s", warning.message)
    if not (target / MODEL_FILE).is_file():
        made = sorted(p.name for p in target.glob("*.onnx"))
        raise ExportError(
            f"Optimum did not produce one merged {MODEL_FILE} (got {made}); this optimum-onnx version is not "
            "supported (use optimum-onnx 0.1.x)."
        )
    return target


def _quantize_weight_only(onnx_dir: Path, target: Path, bits: int) -> Path:
    """MatMul weights -> MatMulNBits (``bits`` bits, symmetric blocks of INT8_BLOCK_SIZE, int8 compute).

    The graph is constant-folded first (ORT's basic, provider-independent level), so a tied
    ``lm_head`` (a Transpose of the embedding table) becomes a constant and is quantized too.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    target.mkdir(parents=True, exist_ok=True)
    folded = target / "folded.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    external = len(_model_files(onnx_dir / MODEL_FILE)) > 1
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "folded.onnx_data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    ort.InferenceSession(str(onnx_dir / MODEL_FILE), options, providers=["CPUExecutionProvider"])
    config = DefaultWeightOnlyQuantConfig(block_size=INT8_BLOCK_SIZE, is_symmetric=True, accuracy_level=INT8_ACCURACY_LEVEL, bits=bits)
    root = logging.getLogger()  # the quantizer logs one INFO line per tensor on the root logger
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(folded)), bits=bits, block_size=INT8_BLOCK_SIZE,
                                         is_symmetric=True, accuracy_level=INT8_ACCURACY_LEVEL, algo_config=config)
        quantizer.process()
    finally:
        root.setLevel(level)
    out = target / "quantized"
    out.mkdir()
    quantizer.model.save_model_to_file(str(out / MODEL_FILE), use_external_data_format=external)
    if not (out / MODEL_FILE).is_file():
        raise ExportError(f"MatMulNBitsQuantizer did not write {out / MODEL_FILE}.")
    return out


def _quantize_int8(onnx_dir: Path, target: Path) -> Path:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    external = len(_model_files(onnx_dir / MODEL_FILE)) > 1
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name=MODEL_FILE)
    config = AutoQuantizationConfig.avx2(is_static=False, per_channel=False)
    # onnxruntime.quantization logs one INFO line per tensor on the root logger: hold those back.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantizer.quantize(config, save_dir=target, file_suffix=None, use_external_data_format=external)
    finally:
        root.setLevel(level)
    if not (target / MODEL_FILE).is_file():
        raise ExportError(f"ORTQuantizer did not write {target / MODEL_FILE}.")
    return target


def _add_logits_to_keep(model_path: Path) -> bool:
    """Add the input ``logits_to_keep`` (int64 [1]; 0 = every position): the output projection reads only
    the last ``logits_to_keep`` positions (as transformers' argument of that name does).

    The exported graph returns logits for every input position; the runtime needs the last one at
    prefill and ``1 + draft`` positions when it verifies a draft, so the rest was wasted work and
    memory (about 1 GB of logits for a batch of 64 prompts on SmolLM2). It is a required input (ONNX
    Runtime's IO binding cannot bind an input that has a default). The edit is a Slice on the
    projection's input; a graph whose ``logits`` do not come straight from a MatMul is left as it is
    (logged), and the runtime then takes the last position itself.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    producer = next((n for n in graph.node if "logits" in n.output), None)
    if producer is None or producer.op_type not in ("MatMul", "MatMulNBits"):
        logger.info("The graph's logits do not come from a MatMul (%s); prefill keeps every position's logits.",
                    producer.op_type if producer is not None else "none")
        return False
    hidden, kept = producer.input[0], "/qpo/logits_to_keep/hidden"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    graph.initializer.extend([
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "/qpo/logits_to_keep/end"),
        numpy_helper.from_array(np.ones(1, dtype=np.int64), "/qpo/logits_to_keep/axis"),
    ])
    position = list(graph.node).index(producer)
    graph.node.insert(position, helper.make_node("Neg", [LOGITS_TO_KEEP], ["/qpo/logits_to_keep/start"],
                                                 name="/qpo/logits_to_keep/Neg"))
    graph.node.insert(position + 1, helper.make_node(
        "Slice", [hidden, "/qpo/logits_to_keep/start", "/qpo/logits_to_keep/end", "/qpo/logits_to_keep/axis"],
        [kept], name="/qpo/logits_to_keep/Slice"))
    producer.input[0] = kept
    onnx.save(model, str(model_path))
    return True


def _model_files(model_path: Path) -> list[str]:
    """``model.onnx`` plus any external-data files it references (large models), all relative to its folder."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(str(model_path), load_external_data=False)
    names = {MODEL_FILE}
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if not location or Path(location).is_absolute() or ".." in Path(location).parts:
                raise ExportError(
                    f"The exported model references external data at {location!r}, outside its folder."
                )
            names.add(location)
    return sorted(names)


def _write_tokenizer(checkpoint: Path, target: Path) -> None:
    source = checkpoint / TOKENIZER_FILE
    if source.is_file():
        shutil.copyfile(source, target)
        return
    from .models import load_tokenizer

    tokenizer = load_tokenizer(checkpoint, use_fast=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"{checkpoint} has no tokenizer.json and its tokenizer has no fast version; the runtime needs a fast "
            "(tokenizers) tokenizer. Save the checkpoint with a fast tokenizer."
        )
    backend.save(str(target))


def _inspect_model(model_path: Path, dtype: str) -> ModelSpec:
    """Read I/O names and KV-cache dims from the exported graph."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = {o.name: o for o in graph.output}

    def layers(names: list[str], pattern: re.Pattern[str], what: str) -> int:
        found: dict[str, set[int]] = {"key": set(), "value": set()}
        for name in names:
            match = pattern.match(name)
            if match:
                found[match.group(2)].add(int(match.group(1)))
        count = len(found["key"])
        if not count or found["key"] != found["value"] or found["key"] != set(range(count)):
            raise ExportError(
                f"The exported graph's {what} names {sorted(names)} do not follow the Optimum decoder layout "
                f"({pattern.pattern}); the runtime cannot decode this model."
            )
        return count

    num_layers = layers(list(inputs), _PAST, "past input")
    if layers(list(outputs), _PRESENT, "present output") != num_layers:
        raise ExportError("The exported graph has different numbers of past inputs and present outputs.")
    dims = inputs["past_key_values.0.key"].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value") or not dims[3].HasField("dim_value"):
        raise ExportError(
            "The past key input's KV-head and head-dim axes are not static; cannot size the KV cache."
        )
    logits = outputs.get("logits")
    logits_dims = logits.type.tensor_type.shape.dim if logits is not None else []
    vocab = logits_dims[-1].dim_value if logits_dims and logits_dims[-1].HasField("dim_value") else 1
    spec = ModelSpec(
        file=MODEL_FILE,
        dtype=dtype,
        input_names=tuple(inputs),
        output_names=tuple(outputs),
        num_layers=num_layers,
        num_kv_heads=int(dims[1].dim_value),
        head_dim=int(dims[3].dim_value),
        past_key_name="past_key_values.{layer}.key",
        past_value_name="past_key_values.{layer}.value",
        present_key_name="present.{layer}.key",
        present_value_name="present.{layer}.value",
        vocab_size=int(vocab),
        has_position_ids="position_ids" in inputs,
        logits_to_keep=LOGITS_TO_KEEP in inputs,
    )
    try:  # the runtime's own input/output rules
        check_model_io(spec, inputs, outputs, "The exported graph")
    except BundleError as exc:
        raise ExportError(str(exc)) from exc
    return spec


def _smoke_test(bundle: Path, spec: ModelSpec, policy: PolicyFormat) -> int:
    """Run one prefill with onnxruntime the way the runtime will; returns the vocabulary size from the logits."""
    import numpy as np
    import onnxruntime as ort

    from qpo_middleware.decoder import OnnxDecoder

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(bundle / spec.file), sess_options=options, providers=["CPUExecutionProvider"]
    )
    decoder = OnnxDecoder(session, spec)
    ids = np.array([policy.input_ids([])], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
    logits, presents = decoder.forward(ids, mask, positions, decoder.empty_past(1))
    if not np.isfinite(logits).all():
        raise ExportError(
            "The exported model returns non-finite logits; check the checkpoint (and try fp32)."
        )
    expected = (1, spec.num_kv_heads, ids.shape[1], spec.head_dim)
    if presents[0].shape != expected:
        raise ExportError(f"present KV shape {presents[0].shape} differs from the expected {expected}.")
    return int(logits.shape[-1])


def _check_tokenizer(path: Path, policy: PolicyFormat, gen: GenerationConfig, vocab_size: int) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ExportError(
            f"The tokenizer has {size} tokens but the model only {vocab_size} embeddings; resize the model's "
            "embeddings after adding the policy's special tokens (model.resize_token_embeddings(len(tokenizer)))."
        )
    ids = {
        *policy.reward_token_ids,
        *policy.separator_ids,
        *policy.eos_token_ids,
        *policy.prefix_ids,
        *gen.suppress_token_ids,
    }
    unknown = sorted(i for i in ids if tokenizer.id_to_token(i) is None)
    if unknown:
        raise ExportError(
            f"Token id(s) {unknown} of the policy format are not in the tokenizer (size {size})."
        )
