"""Bounded fuzzing of bundle manifests and template/policy parsing (issue 7).

A valid ``qpo.json`` is mutated (fields dropped, replaced by random JSON values of any type,
huge numbers, paths with ``..``, absolute paths, NUL bytes, format-spec patterns, unknown
fields) and read back with :func:`load_manifest`; random dicts go to ``Template.from_dict``,
``PolicyFormat.from_dict``, ``GenerationConfig.from_dict`` and ``ModelSpec.from_dict``. The
only exceptions allowed out are the documented ones (``BundleError``, ``TemplateError``,
``PolicyFormatError``: all ``ValueError``), each with a message; an accepted manifest never
names a file outside the bundle. No model is needed: the bundle files are small stand-ins.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qpo_middleware.bundle import BundleError, GenerationConfig, ModelSpec, load_manifest
from qpo_middleware.policy_format import PolicyFormat, PolicyFormatError
from qpo_middleware.template import Demo, Template, TemplateError

MODEL = b"not really onnx"
TOKENIZER = b'{"not": "really a tokenizer"}'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


VALID: dict[str, Any] = {
    "format": "qpo-bundle",
    "format_version": 1,
    "created_by": "qpo-middleware 0.1.0",
    "base_model": "tiny-llama",
    "task": "sst2",
    "training_data_sha256": "ab" * 32,
    "model": {
        "file": "model.onnx",
        "dtype": "fp32",
        "input_names": [
            "input_ids",
            "attention_mask",
            "position_ids",
            "past_key_values.0.key",
            "past_key_values.0.value",
        ],
        "output_names": ["logits", "present.0.key", "present.0.value"],
        "num_layers": 1,
        "num_kv_heads": 2,
        "head_dim": 16,
        "past_key_name": "past_key_values.{layer}.key",
        "past_value_name": "past_key_values.{layer}.value",
        "present_key_name": "present.{layer}.key",
        "present_value_name": "present.{layer}.value",
        "vocab_size": 100,
        "has_position_ids": True,
    },
    "tokenizer": {"file": "tokenizer.json"},
    "policy": {
        "reward_token_ids": [90, 91, 92, 93],
        "separator_ids": [94],
        "eos_token_ids": [2],
        "prefix_ids": [],
        "query_max_tokens": 40,
        "prompt_max_tokens": 12,
        "pad_token_id": 2,
    },
    "template": {
        "placement": "before",
        "separator": "\n\n",
        "demo_format": "{query}\nAnswer: {answer}",
        "demo_separator": "\n\n",
    },
    "generation": {
        "max_new_tokens": 12,
        "do_sample": False,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "suppress_token_ids": [90, 91, 92, 93, 94],
    },
    "files": {"model.onnx": _sha(MODEL), "tokenizer.json": _sha(TOKENIZER)},
}

ALLOWED = (BundleError, TemplateError, PolicyFormatError)

# -- strategies --------------------------------------------------------------------------------

PATHS = st.sampled_from(
    [
        "../model.onnx",
        "../../etc/passwd",
        "/etc/passwd",
        "/tmp/model.onnx",
        "sub/../../model.onnx",
        "./../model.onnx",
        "C:\\model.onnx",
        "c:model.onnx",
        "..\\model.onnx",
        "model.onnx\x00.txt",
        "\x00",
        "",
        ".",
        "..",
        "./",
        "model.onnx/",
        "./model.onnx",
        "\ud800",
        "model\udc80.onnx",
        "escape",  # a symlink to outside the bundle, made by the fixture
        "escape/model.onnx",
        "loop",  # a symlink loop
        "qpo.json",
        "~/model.onnx",
        "model.onnx\n",
    ]
) | st.sampled_from([1, 2]).map(
    lambda k: "a" * 5000 if k == 1 else ("d" * 200 + "/") * 30
)  # too long for the OS
PATTERNS = st.sampled_from(
    [
        "{layer:>99999}",
        "{layer:>1000000000}",  # would allocate a gigabyte if formatted
        "{layer.real}",
        "{layer.__class__}",
        "{layer[0]}",
        "{layer!r}",
        "{layer!s:^9}",
        "{0}",
        "{}",
        "{layer",
        "layer}",
        "{{layer}}",
        "{query:{answer}}",
        "{query.__class__.__mro__}",
        "{query[0]}",
        "{query}{answer}{other}",
        "{layer}{layer}",
        "past.{layer}.{layer[0]}",
        "past.{layer}{layer.real.x}",
        "past.{layer}.{layer:>1000000000}",
        "{query}{query.x}",
        "{query}{answer:>1000000000}",
    ]
)
HUGE = st.sampled_from([31, 63, 64, -63, 100, 1000, 13000]).map(
    lambda bits: (1 if bits > 0 else -1) << abs(bits)
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    PATHS,
    PATTERNS,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path inside ``value`` (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


ALL_PATHS = _paths(VALID)
MUTATION = st.tuples(
    st.sampled_from(["drop", "replace", "replace", "add"]),
    st.sampled_from(ALL_PATHS),
    st.one_of(JSON, PATHS, PATTERNS, HUGE),
)


def _mutate(data: dict[str, Any], mutations: list[tuple[str, tuple[Any, ...], Any]]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for kind, path, value in mutations:
        parent: Any = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            last = path[-1]
            if kind == "drop":
                del parent[last]
            elif kind == "replace":
                parent[last] = value
            elif isinstance(parent, dict):
                parent[f"unknown_{last}"] = value
            else:
                parent.append(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    return data


def _dump(data: Any) -> bytes | None:
    try:
        return json.dumps(data, allow_nan=True).encode()
    except ValueError:  # an int too long for str(): the manifest cannot even be written
        return None


def _check_accepted(manifest: Any, root: Path) -> None:
    inside = root.resolve()
    for path in (
        manifest.model_path,
        manifest.tokenizer_path,
        *(root / name for name in manifest.files),
    ):
        assert Path(os.path.realpath(path)).is_relative_to(inside), path


def _load(root: Path, raw: bytes, verify: bool) -> None:
    (root / "qpo.json").write_bytes(raw)
    try:
        manifest = load_manifest(root, verify=verify)
    except ALLOWED as exc:
        assert str(exc).strip(), type(exc)
        event(
            f"refused: {type(exc).__name__}"
        )  # figures for docs/reliability.md (--hypothesis-show-statistics)
        return
    _check_accepted(manifest, root)
    event("accepted")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "bundle"
    root.mkdir()
    (root / "model.onnx").write_bytes(MODEL)
    (root / "tokenizer.json").write_bytes(TOKENIZER)
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(MODEL)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    return root


_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# -- load_manifest -----------------------------------------------------------------------------


def test_the_valid_manifest_loads(bundle_dir: Path) -> None:
    (bundle_dir / "qpo.json").write_text(json.dumps(VALID))
    manifest = load_manifest(bundle_dir)
    assert manifest.model_path == (bundle_dir / "model.onnx").resolve()


@_SETTINGS
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3), verify=st.booleans())
def test_mutated_manifest_raises_only_bundle_error(
    bundle_dir: Path, mutations: list[tuple[str, tuple[Any, ...], Any]], verify: bool
) -> None:
    raw = _dump(_mutate(VALID, mutations))
    if raw is not None:
        _load(bundle_dir, raw, verify)


@_SETTINGS
@given(field=st.sampled_from(["model.file", "tokenizer.file", "files"]), name=PATHS)
def test_no_path_escapes_the_bundle(bundle_dir: Path, field: str, name: str) -> None:
    data = copy.deepcopy(VALID)
    digest = _sha(MODEL)
    if field == "model.file":
        data["model"]["file"] = name
        data["files"][name] = digest
    elif field == "tokenizer.file":
        data["tokenizer"]["file"] = name
        data["files"][name] = _sha(TOKENIZER)
    else:
        data["files"][name] = digest
    raw = _dump(data)
    assert raw is not None
    _load(bundle_dir, raw, verify=True)
    _load(bundle_dir, raw, verify=False)


@_SETTINGS
@given(
    field=st.sampled_from(
        ["past_key_name", "past_value_name", "present_key_name", "present_value_name", "demo_format"]
    ),
    pattern=PATTERNS,
)
def test_format_patterns_raise_only_bundle_error(bundle_dir: Path, field: str, pattern: str) -> None:
    """Every pattern field is checked before anything is formatted with it."""
    data = copy.deepcopy(VALID)
    (data["template"] if field == "demo_format" else data["model"])[field] = pattern
    raw = _dump(data)
    assert raw is not None
    _load(bundle_dir, raw, verify=False)


RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'"qpo"',
            b"\xff\xfe{}",
            b'{"format": "qpo-bundle", "format_version": ' + b"1" * 5000 + b"}",  # over 4300 digits
            b"[" * 100_000 + b"]" * 100_000,  # deeper than the recursion limit
            b'{"format": "qpo-bundle", "format_version": 1e999}',
            b'{"format": "qpo-bundle", "format_version": NaN}',
            json.dumps(VALID).encode()[:-7],
            json.dumps(VALID).encode().replace(b"model.onnx", b"model\\u0000.onnx"),
            json.dumps(VALID).encode().replace(b'"tokenizer.json"', b'"\\ud800"'),
        ]
    ),
)


@_SETTINGS
@given(raw=RAW)
def test_raw_bytes_raise_only_bundle_error(bundle_dir: Path, raw: bytes) -> None:
    _load(bundle_dir, raw, verify=False)


def test_manifest_over_the_size_limit_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "qpo.json").write_bytes(b" " * ((16 << 20) + 1))
    with pytest.raises(BundleError, match="larger than"):
        load_manifest(bundle_dir)


def test_huge_model_dims_are_refused_before_any_work(bundle_dir: Path) -> None:
    """num_layers = 10**9 would build two billion input names before this check existed."""
    data = copy.deepcopy(VALID)
    data["model"]["num_layers"] = 10**9
    (bundle_dir / "qpo.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"num_layers must be an integer in 1\.\.1024"):
        load_manifest(bundle_dir)


def test_format_spec_in_a_name_pattern_is_refused(bundle_dir: Path) -> None:
    data = copy.deepcopy(VALID)
    data["model"]["past_key_name"] = "past.{layer}.{layer:>2000000000}"  # 2 GB per name if formatted
    (bundle_dir / "qpo.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="past_key_name must be a name pattern"):
        load_manifest(bundle_dir)


# -- Template, PolicyFormat, GenerationConfig, ModelSpec ---------------------------------------


@pytest.mark.parametrize(
    "pattern", ["{query:>2000000000}", "{query.x}", "{answer[0]}", "{query!r}", "{0}", "{}"]
)
def test_demo_format_only_pastes_values_in(pattern: str) -> None:
    """A format spec would allocate 2 GB when rendered; attribute/index access reaches into objects."""
    with pytest.raises(TemplateError, match="plain fields"):
        Template(demo_format="Q: {query} " + pattern)


KEYS = st.one_of(
    st.sampled_from(
        [
            "placement",
            "separator",
            "demo_format",
            "demo_separator",
            "reward_token_ids",
            "separator_ids",
            "eos_token_ids",
            "prefix_ids",
            "query_max_tokens",
            "prompt_max_tokens",
            "pad_token_id",
            "max_new_tokens",
            "do_sample",
            "temperature",
            "top_k",
            "top_p",
            "suppress_token_ids",
        ]
    ),
    st.text(max_size=8),
    st.integers(),  # only Python callers can pass these
)
VALUES = st.one_of(JSON, HUGE, PATTERNS, st.lists(st.one_of(st.integers(), HUGE, st.booleans()), max_size=4))


def _seeded(base: dict[str, Any]) -> st.SearchStrategy[dict[Any, Any]]:
    """Dicts that start from ``base`` (valid) and get random keys replaced, dropped or added."""
    return st.tuples(
        st.dictionaries(KEYS, VALUES, max_size=4), st.lists(st.sampled_from(sorted(base)), max_size=2)
    ).map(lambda pair: {**{k: v for k, v in base.items() if k not in pair[1]}, **pair[0]})


@_SETTINGS
@given(data=st.one_of(_seeded(VALID["template"]), st.dictionaries(KEYS, VALUES, max_size=5), JSON))
def test_template_from_dict_raises_only_template_error(data: Any) -> None:
    try:
        template = Template.from_dict(data)
    except TemplateError as exc:
        assert str(exc).strip()
        event("refused: TemplateError")
        return
    event("accepted")
    rendered = template.render("PROMPT", "QUERY \ud800", [Demo("dq", "da")])
    assert "QUERY \ud800" in rendered.text


@_SETTINGS
@given(data=st.one_of(_seeded(VALID["policy"]), st.dictionaries(KEYS, VALUES, max_size=5), JSON))
def test_policy_format_from_dict_raises_only_policy_format_error(data: Any) -> None:
    try:
        policy = PolicyFormat.from_dict(data)
    except PolicyFormatError as exc:
        assert str(exc).strip()
        event("refused: PolicyFormatError")
        return
    event("accepted")
    ids = policy.input_ids([5, 6, *policy.special_ids, 7])
    assert ids[len(policy.prefix_ids)] == policy.reward_token_ids[-1]
    assert (
        not set(ids[len(policy.prefix_ids) + 1 : len(ids) - len(policy.separator_ids)]) & policy.special_ids
    )


@_SETTINGS
@given(
    data=st.one_of(
        _seeded(VALID["generation"]),
        _seeded(VALID["model"]),
        st.dictionaries(KEYS, VALUES, max_size=5),
        JSON,
    ),
    kind=st.sampled_from([GenerationConfig, ModelSpec]),
)
def test_generation_and_model_from_dict_raise_only_bundle_error(data: Any, kind: Any) -> None:
    try:
        kind.from_dict(data)
    except BundleError as exc:
        assert str(exc).strip()
        event(f"{kind.__name__}: refused")
    else:
        event(f"{kind.__name__}: accepted")


@pytest.mark.parametrize("value", [10**5000, -(10**5000)], ids=["plus", "minus"])
def test_ints_too_long_for_repr_still_give_a_message(value: int) -> None:
    with pytest.raises(PolicyFormatError, match="query_max_tokens"):
        PolicyFormat.from_dict({**VALID["policy"], "query_max_tokens": value})
    with pytest.raises(TemplateError, match="placement"):
        Template.from_dict({"placement": value})
    with pytest.raises(BundleError, match="max_new_tokens"):
        GenerationConfig.from_dict({"max_new_tokens": value})


def test_messages_are_short_for_huge_values() -> None:
    with pytest.raises(PolicyFormatError) as info:
        PolicyFormat.from_dict({**VALID["policy"], "separator_ids": "x" * 1_000_000})
    assert len(str(info.value)) < 400
