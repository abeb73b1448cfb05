"""Export a tiny random Llama policy and check the bundle and the torch-free runtime against torch."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import (
    FAKE_DATA_SHA256,
    PROMPT_MAX_TOKENS,
    QUERIES,
    TinyPolicy,
    export_tiny,
    torch_greedy,
)

from qpo_middleware import BundleError, OptimizedPrompt, PromptOptimizer
from qpo_middleware.bundle import GenerationConfig, load_manifest, sha256_file
from qpo_middleware.generator import Generator
from qpo_middleware.training.export import ExportError, PolicyMeta, read_policy_meta, write_policy_meta


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "qpo.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------- export


def test_manifest_lists_checksums_and_graph_dims(bundle: Path, tiny: TinyPolicy) -> None:
    manifest = load_manifest(bundle)
    assert sorted(p.name for p in bundle.iterdir()) == ["model.onnx", "qpo.json", "tokenizer.json"]
    assert set(manifest.files) == {"model.onnx", "tokenizer.json"}
    for name, digest in manifest.files.items():
        assert sha256_file(bundle / name) == digest
    config = tiny.model.config
    model = manifest.model
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 16)
    assert model.num_kv_heads == config.num_key_value_heads
    assert model.vocab_size == len(tiny.tokenizer) == config.vocab_size
    assert model.dtype == "fp32" and model.has_position_ids
    assert manifest.policy == tiny.policy
    assert manifest.generation.max_new_tokens == PROMPT_MAX_TOKENS and not manifest.generation.do_sample
    assert manifest.training_data_sha256 == FAKE_DATA_SHA256
    raw = json.loads((bundle / "qpo.json").read_text())
    assert raw["format"] == "qpo-bundle" and raw["format_version"] == 1
    assert raw["created_by"] == "qpo-middleware 0.1.0"
    assert raw["model"]["past_key_name"] == "past_key_values.{layer}.key"


def test_policy_meta_round_trip(tiny: TinyPolicy, tmp_path: Path) -> None:
    meta = read_policy_meta(tiny.checkpoint)
    assert isinstance(meta, PolicyMeta) and meta.policy == tiny.policy and meta.task == "sst2"
    changed = dataclasses.replace(meta, task="t", base_model="b", training_data_sha256="00" * 32)
    write_policy_meta(tmp_path, changed)
    assert read_policy_meta(tmp_path) == changed
    with pytest.raises(FileNotFoundError, match="qpo_policy.json"):
        read_policy_meta(tmp_path / "missing")
    with pytest.raises(ExportError, match="training_data_sha256"):
        dataclasses.replace(meta, training_data_sha256="not-a-hash")
    (tmp_path / "qpo_policy.json").write_text(json.dumps({**changed.to_dict(), "format_version": 2}))
    with pytest.raises(ExportError, match="format_version"):
        read_policy_meta(tmp_path)


def test_onnx_logits_match_torch(optimizer: PromptOptimizer, tiny: TinyPolicy) -> None:
    decoder = optimizer.decoder
    ids = optimizer.input_ids(QUERIES[2])
    with torch.no_grad():
        expected = tiny.model(torch.tensor([ids])).logits[0].numpy()  # (seq, vocab)
    # Prefill on all but the last token, then one cached step: both must match torch.
    prefix = np.array([ids[:-1]])
    logits, past = decoder.forward(
        prefix, np.ones_like(prefix), np.arange(prefix.shape[1])[None], decoder.empty_past(1)
    )
    np.testing.assert_allclose(logits[0], expected[-2], atol=1e-4)
    step, _ = decoder.forward(np.array([[ids[-1]]]), np.ones((1, len(ids))), np.array([[len(ids) - 1]]), past)
    np.testing.assert_allclose(step[0], expected[-1], atol=1e-4)


def test_greedy_matches_torch_generate(optimizer: PromptOptimizer, tiny: TinyPolicy) -> None:
    stopped_early = 0
    for query in QUERIES:
        ids = optimizer.input_ids(query)
        assert ids == tiny.policy.input_ids(tiny.tokenizer(query, add_special_tokens=False).input_ids)
        ours = optimizer.generate_ids([ids])[0]
        assert ours == torch_greedy(tiny.model, ids, tiny.policy, PROMPT_MAX_TOKENS), query
        stopped_early += len(ours) < PROMPT_MAX_TOKENS
    assert stopped_early >= 1  # the fixture's extra EOS id stops QUERIES[0] after 4 tokens


def test_batch_equals_single(optimizer: PromptOptimizer, bundle: Path) -> None:
    queries = [*QUERIES, "", "   ", QUERIES[0]]
    singles = [optimizer.optimize(q) for q in queries]
    for batch_size in (16, 2):
        batched = PromptOptimizer.from_bundle(
            bundle, provider="cpu", max_batch_size=batch_size
        ).optimize_batch(queries)
        assert [(b.prompt, b.text, b.tokens) for b in batched] == [
            (s.prompt, s.text, s.tokens) for s in singles
        ]
    lengths = {s.tokens for s in singles if s.tokens}
    assert len(lengths) > 1 and PROMPT_MAX_TOKENS in lengths  # rows stop at different steps


def test_optimize_result(optimizer: PromptOptimizer) -> None:
    special = {"<|qpo_prompt|>", "<|im_end|>", "<|qpo_reward_3|>"}
    for query in QUERIES:
        result = optimizer.optimize(query)
        assert isinstance(result, OptimizedPrompt)
        assert result.text == optimizer.template.render(result.prompt, query).text
        assert query in result.text and result.messages[-1]["content"] == result.text
        assert result.prompt == result.prompt.strip()
        assert not any(s in result.prompt for s in special)
        assert not any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in result.prompt)
        assert 1 <= result.tokens <= PROMPT_MAX_TOKENS and result.latency_ms > 0
    empty = optimizer.optimize("  \n")
    assert (empty.prompt, empty.text, empty.tokens) == ("", "  \n", 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.prompt = "x"  # type: ignore[misc]


def test_sampling_is_seeded(optimizer: PromptOptimizer) -> None:
    query = QUERIES[2]
    a = optimizer.optimize(query, do_sample=True, seed=7)
    assert a.prompt == optimizer.optimize(query, do_sample=True, seed=7).prompt
    draws = {optimizer.optimize(query, do_sample=True, seed=s).prompt for s in range(4)}
    assert len(draws) > 1  # the tiny model's distribution is flat: samples differ


def test_sampling_rules_on_hand_made_logits() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))

    def draw(n: int, **kwargs) -> np.ndarray:
        generation = GenerationConfig(max_new_tokens=1, do_sample=True, **kwargs)
        gen = Generator(None, generation, eos_token_ids={0}, rng=np.random.default_rng(0))  # type: ignore[arg-type]
        return np.array([gen.next_token(np.repeat(logits, n, axis=0))]).ravel()

    freq = np.bincount(draw(20000), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.02)
    assert set(draw(2000, top_k=2).tolist()) == {0, 1}
    assert set(draw(2000, top_p=0.75).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    assert set(draw(500, top_p=0.4).tolist()) == {0}
    assert set(draw(2000, suppress_token_ids=(0,)).tolist()) == {1, 2, 3}
    cold = np.bincount(draw(4000, temperature=0.25), minlength=4) / 4000
    assert cold[0] > 0.85
    greedy = Generator(None, GenerationConfig(max_new_tokens=1), eos_token_ids={0})  # type: ignore[arg-type]
    assert greedy.next_token(logits).tolist() == [0]


def test_thread_safe(optimizer: PromptOptimizer) -> None:
    expected = {q: optimizer.optimize(q).prompt for q in QUERIES}
    errors: list[str] = []

    def worker(i: int) -> None:
        for query in QUERIES[i % 2 :: 2] * 2:
            if optimizer.optimize(query).prompt != expected[query]:
                errors.append(query)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------------------- bundle safety


def test_tampered_file_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    with open(copy / "tokenizer.json", "ab") as handle:
        handle.write(b" ")
    with pytest.raises(BundleError, match="checksum mismatch for 'tokenizer.json'"):
        PromptOptimizer.from_bundle(copy)
    load_manifest(copy, verify=False)  # skipping verification is explicit
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="'model.onnx' listed in qpo.json is missing"):
        load_manifest(copy, verify=False)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/../../x", "..\\x"])
def test_path_escape_is_refused(bundle: Path, tmp_path: Path, name: str) -> None:
    copy = _copy(bundle, tmp_path)
    _edit_manifest(copy, lambda d: d["files"].update({name: "0" * 64}))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_manifest(copy)


def test_symlink_escape_is_refused(bundle: Path, tmp_path: Path) -> None:
    copy = _copy(bundle, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, copy / "link.txt")
    _edit_manifest(copy, lambda d: d["files"].update({"link.txt": sha256_file(secret)}))
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        load_manifest(copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=2), "re-export with a matching qpo-middleware"),
        (lambda d: d.update(format="other"), "not a QPO bundle"),
        (lambda d: d["model"].update(num_layers="2"), "model.num_layers"),
        (lambda d: d["model"].pop("head_dim"), "model.head_dim"),
        (lambda d: d["files"].pop("model.onnx"), "no checksum in 'files'"),
        (lambda d: d["generation"].update(top_p=0), "generation.top_p"),
        (lambda d: d["policy"].update(eos_token_ids=[]), "eos_token_ids"),
        (lambda d: d["template"].update(placement="middle"), "placement"),
        (lambda d: d.update(surprise=1), "unknown field"),
        (lambda d: d["model"]["input_names"].remove("attention_mask"), "lacks input"),
        (lambda d: d["model"]["input_names"].append("token_type_ids"), "does not feed"),
        (lambda d: d["model"]["output_names"].remove("logits"), "lacks output"),
    ],
)
def test_bad_manifest_names_the_field(bundle: Path, tmp_path: Path, edit, message: str) -> None:
    copy = _copy(bundle, tmp_path)
    _edit_manifest(copy, edit)
    with pytest.raises(BundleError, match=message):
        load_manifest(copy)


def test_one_set_of_io_rules_for_manifest_graph_and_session(bundle: Path) -> None:
    """Validation, the runtime and export check the decoder's inputs and outputs with the same rules."""
    import onnxruntime as ort

    from qpo_middleware.bundle import check_model_io
    from qpo_middleware.decoder import OnnxDecoder

    spec = load_manifest(bundle).model
    session = ort.InferenceSession(str(bundle / spec.file), providers=["CPUExecutionProvider"])
    check_model_io(spec, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()], "graph")
    with pytest.raises(BundleError, match="lacks input.*past_key_values.1.value"):
        check_model_io(spec, [n for n in spec.input_names if n != "past_key_values.1.value"], spec.output_names, "x")
    with pytest.raises(BundleError, match="The ONNX model lacks input"):  # the runtime reads the session
        OnnxDecoder(session, dataclasses.replace(spec, num_layers=spec.num_layers + 1))


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no qpo.json"):
        load_manifest(tmp_path)
    (tmp_path / "qpo.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------------------- export behaviour


def test_existing_out_dir_needs_overwrite(tiny: TinyPolicy, bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--overwrite"):
        export_tiny(tiny, out)
    assert (out / "keep.txt").exists()
    export_tiny(tiny, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert load_manifest(out).files == load_manifest(bundle).files
    empty = tmp_path / "empty"
    empty.mkdir()
    export_tiny(tiny, empty)  # an empty directory is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no temp dirs left


def test_crash_leaves_no_half_bundle(
    tiny: TinyPolicy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qpo_middleware.training import export

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(export, "_check_tokenizer", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_tiny(tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_export_arguments(tiny: TinyPolicy, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="quantize"):
        export_tiny(tiny, tmp_path / "a", quantize="int2")
    with pytest.raises(ExportError, match="not both"):
        export_tiny(tiny, tmp_path / "a", quantize="int8", fp16=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        from qpo_middleware.training.export import export_bundle

        export_bundle(tmp_path, tmp_path / "a", meta=read_policy_meta(tiny.checkpoint))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_export_loads_and_runs(tiny: TinyPolicy, bundle: Path, tmp_path: Path, bits: int) -> None:
    out = export_tiny(tiny, tmp_path / f"int{bits}", quantize=f"int{bits}")
    manifest = load_manifest(out)
    assert manifest.model.dtype == f"int{bits}"
    import onnx

    nodes = [node for node in onnx.load(str(out / "model.onnx")).graph.node]
    # Every weight MatMul (the tied lm_head too, after constant folding) is block-wise int8 / int4;
    # the MatMuls left are activation x activation (attention).
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
    optimizer = PromptOptimizer.from_bundle(out, provider="cpu")
    results = optimizer.optimize_batch(QUERIES)
    assert all(1 <= r.tokens <= PROMPT_MAX_TOKENS and QUERIES[i] in r.text for i, r in enumerate(results))
    # Block-wise weight-only int8 quantizes each row's activations on their own: a row's prompt
    # does not depend on its batch mates. (The 4-bit kernels round a batch differently from one row.)
    if bits == 8:
        assert [r.prompt for r in results] == [optimizer.optimize(q).prompt for q in QUERIES]


def test_int8_dynamic_export_loads_and_runs(tiny: TinyPolicy, bundle: Path, tmp_path: Path) -> None:
    out = export_tiny(tiny, tmp_path / "int8d", quantize="int8-dynamic")
    assert load_manifest(out).model.dtype == "int8-dynamic"
    optimizer = PromptOptimizer.from_bundle(out, provider="cpu")
    results = optimizer.optimize_batch(QUERIES[:3])
    assert all(1 <= r.tokens <= PROMPT_MAX_TOKENS and QUERIES[i] in r.text for i, r in enumerate(results))
    # No batch == single check here: dynamic int8 quantizes activations with one scale per tensor,
    # i.e. over the whole batch, so a row's logits depend on its neighbours.
    single = optimizer.optimize(QUERIES[0])
    assert single.prompt == optimizer.optimize(QUERIES[0]).prompt  # deterministic for a given batch


def test_fp16_export_loads_and_runs(tiny: TinyPolicy, tmp_path: Path) -> None:
    out = export_tiny(tiny, tmp_path / "fp16", fp16=True)
    optimizer = PromptOptimizer.from_bundle(out, provider="cpu")
    assert optimizer.manifest.model.dtype == "fp16" and optimizer.decoder.kv_dtype == np.float16
    assert 1 <= optimizer.optimize(QUERIES[0]).tokens <= PROMPT_MAX_TOKENS


def test_external_data_files_are_bundled(
    tiny: TinyPolicy, optimizer: PromptOptimizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models over 2 GB come with an external-data file: it must travel with the bundle and be checksummed."""
    import onnx

    from qpo_middleware.training import export

    real = export._optimum_export

    def export_with_external_data(checkpoint: Path, target: Path, *, fp16: bool) -> Path:
        real(checkpoint, target, fp16=fp16)
        proto = onnx.load(str(target / "model.onnx"))
        onnx.save_model(
            proto, str(target / "model.onnx"), save_as_external_data=True, location="model.onnx_data"
        )
        return target

    monkeypatch.setattr(export, "_optimum_export", export_with_external_data)
    out = export_tiny(tiny, tmp_path / "ext")
    assert set(load_manifest(out).files) == {"model.onnx", "model.onnx_data", "tokenizer.json"}
    external = PromptOptimizer.from_bundle(out, provider="cpu")
    assert external.optimize(QUERIES[2]).prompt == optimizer.optimize(QUERIES[2]).prompt
    with open(out / "model.onnx_data", "r+b") as handle:
        handle.write(b"\0\0\0\0")
    with pytest.raises(BundleError, match="model.onnx_data"):
        PromptOptimizer.from_bundle(out)


def test_cli_export_and_rewrite(tiny: TinyPolicy, bundle: Path, tmp_path: Path) -> None:
    export_cli = pytest.importorskip(
        "qpo_middleware.cli.export", reason="the qpo CLI package is not complete yet", exc_type=ImportError
    )
    rewrite_cli = pytest.importorskip("qpo_middleware.cli.rewrite", exc_type=ImportError)
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("export")(export_cli.command)
    app.command("rewrite")(rewrite_cli.command)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tiny.checkpoint), "--out", str(bundle)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    out = tmp_path / "cli-bundle"
    result = runner.invoke(app, ["export", str(tiny.checkpoint), "--out", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rewrite", QUERIES[0], "--bundle", str(bundle), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # logs go to stderr; stdout is the JSON alone
    assert QUERIES[0] in data["text"] and data["tokens"] >= 1


def test_prefill_computes_the_logits_it_needs_only(bundle: Path) -> None:
    """The exported graph takes logits_to_keep: 1 gives the last position's logits, N the last N, 0 all of them,
    each equal to the full computation's; a manifest from before the input (no model.logits_to_keep) still parses."""
    import numpy as np

    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    decoder = optimizer.decoder
    assert decoder.spec.logits_to_keep and "logits_to_keep" in decoder.spec.input_names
    rows = [optimizer.input_ids(q) for q in QUERIES[:3]]
    from qpo_middleware.generator import left_pad

    ids, mask, positions = left_pad(rows, optimizer.policy.pad_token_id)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    empty = decoder.empty_past(3)
    for i, (key, value) in enumerate(decoder.past_names):
        feeds[key], feeds[value] = empty[2 * i], empty[2 * i + 1]
    full = decoder.session.run(["logits"], {**feeds, "logits_to_keep": np.array([0])})[0]
    assert full.shape[:2] == ids.shape
    for keep in (1, 3):
        kept = decoder.session.run(["logits"], {**feeds, "logits_to_keep": np.array([keep])})[0]
        assert kept.shape[1] == keep
        np.testing.assert_allclose(kept, full[:, -keep:], atol=1e-5)
    last, _ = decoder.forward(ids, mask, positions, decoder.empty_past(3))
    np.testing.assert_allclose(last, full[:, -1], atol=1e-5)
    data = load_manifest(bundle).to_dict()
    data["model"] = {k: v for k, v in data["model"].items() if k != "logits_to_keep"}
    data["model"]["input_names"] = [n for n in data["model"]["input_names"] if n != "logits_to_keep"]
    from qpo_middleware.bundle import parse_manifest

    assert not parse_manifest(data, bundle).model.logits_to_keep
