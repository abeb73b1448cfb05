"""Speculative decoding from the bundle's prompt library: the output is plain greedy decoding's, token for token.

The tiny random policy's library is built from its own greedy outputs (drafts accepted in full), the same
outputs cut or changed part way (drafts accepted up to a point, or rejected at their first token) and
random prompts, so every path of the verification runs. A real SmolLM2 test is in test_real_export.py.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from qpo_middleware import BundleError, PromptOptimizer, RuntimeConfig
from qpo_middleware.bundle import GenerationConfig
from qpo_middleware.generator import Generator
from qpo_middleware.library import Drafter, LibraryPrompt, read_library, write_library

QUERIES = [
    "Is this movie any good?", "a", "The film was a complete waste of two hours and I want them back.",
    "Quiet, moving, and honest.", "Ünïcødé query — with “quotes” and emoji 🎬", "flat , dull and far too long",
    "one of the year's best", "I laughed, I cried", "not bad at all", "terrible acting",
    "the plot makes no sense whatsoever, and the ending is worse", "?",
]


def entry(ids: list[int], count: int = 1) -> LibraryPrompt:
    return LibraryPrompt(text=" ".join(map(str, ids)), ids=tuple(ids), count=count)


def test_drafter_follows_the_most_frequent_library_prompt_then_looks_up_the_last_tokens() -> None:
    drafter = Drafter([entry([1, 2, 3, 9], 1), entry([1, 2, 4, 5, 9], 3), entry([7, 8, 6, 9], 2)])
    assert drafter.draft([], 10) == [1, 2, 4, 5, 9]  # the heavier branch (3 records against 1)
    assert drafter.draft([1, 2, 3], 10) == [9]
    assert drafter.draft([1, 2, 4], 2) == [5, 9][:2] and drafter.draft([1], 1) == [2]
    assert drafter.draft([1, 2, 3, 9], 10) == []  # the whole prompt is written: nothing follows in the trie
    # Off every prompt's start: the tokens after the row's last 3 (or 2) tokens somewhere in the library.
    assert drafter.draft([5, 5, 7, 8], 10) == [6, 9]
    assert drafter.draft([0, 2, 4], 10) == [5, 9]
    assert drafter.draft([0, 0, 4], 10) == [] and drafter.draft([3], 10) == []  # a lone token is not looked up
    long = Drafter([entry(list(range(10, 30)))])
    assert long.draft([10], 30) == list(range(11, 30))  # on the trie path: the whole rest of the prompt
    assert long.draft([0, 14, 15], 30) == [16, 17, 18, 19]  # a lookup guess drafts LOOKUP_MAX_DRAFT tokens
    assert drafter.draft([1], 0) == []
    assert Drafter([]).draft([1, 2], 5) == []


def test_library_file_round_trips_and_refuses_bad_content(tmp_path: Path) -> None:
    path = tmp_path / "library.json"
    entries = [LibraryPrompt("Classify it.", (5, 6, 0), 4), LibraryPrompt("ü", (7, 0), 1)]
    write_library(path, entries)
    assert read_library(path, vocab_size=10, max_ids=3) == entries
    with pytest.raises(BundleError, match="token ids below 7"):
        read_library(path, vocab_size=7, max_ids=3)
    with pytest.raises(BundleError, match="1..1 token ids"):
        read_library(path, vocab_size=10, max_ids=1)
    data = json.loads(path.read_text())
    for bad, message in (({**data, "format": "x"}, "not a prompt library"), ({**data, "version": 4}, "version 4"),
                         ({**data, "prompts": [{"text": "a", "ids": [1], "count": 0}]}, "count must be"),
                         ({**data, "prompts": [{"text": "a", "ids": [True], "count": 1}]}, "token ids"),
                         ({**data, "prompts": [{"text": "a", "ids": [1]}]}, "text, ids and count")):
        path.write_text(json.dumps(bad))
        with pytest.raises(BundleError, match=message):
            read_library(path, vocab_size=10, max_ids=3)
    path.write_text("{")
    with pytest.raises(BundleError, match="Cannot read the prompt library"):
        read_library(path, vocab_size=10, max_ids=3)


def _decode(optimizer: PromptOptimizer, rows: list[list[int]], generation: GenerationConfig,
            drafter: Drafter | None, max_draft: int) -> tuple[list[list[int]], Generator]:
    generator = Generator(optimizer.decoder, generation, optimizer.policy.eos_token_ids,
                          optimizer.policy.pad_token_id, drafter=drafter, max_draft=max_draft)
    generator.append_tokens(rows)
    while not generator.is_done():
        generator.generate_next_token()
    return generator.sequences(), generator


def test_speculative_greedy_equals_plain_greedy_over_seeds_batches_and_budgets(optimizer: PromptOptimizer) -> None:
    rows = [optimizer.input_ids(q) for q in QUERIES]
    base = optimizer.generation()
    plain_full, _ = _decode(optimizer, rows, base, None, 0)
    assert len({len(s) for s in plain_full}) > 1  # rows stop at different steps (the tiny policy's extra EOS)
    vocab = optimizer.manifest.model.vocab_size
    totals = {"drafted": 0, "accepted": 0, "forwards": 0, "plain_forwards": 0}
    for seed in range(12):
        rng = random.Random(seed)
        library = []
        for seq in plain_full:
            kind = rng.choice(["exact", "exact", "changed", "first", "cut"])
            ids = list(seq)
            if kind == "changed":  # right up to a point, then a different token
                ids[rng.randrange(len(ids))] = rng.randrange(vocab)
            elif kind == "first":  # rejected at the first drafted token
                ids = [ids[0]] + [rng.randrange(vocab) for _ in range(len(ids))]
            elif kind == "cut":
                ids = ids[: max(1, len(ids) // 2)]
            library.append(entry(ids, rng.randint(1, 3)))
        library += [entry([rng.randrange(vocab) for _ in range(rng.randint(1, 14))]) for _ in range(4)]
        drafter = Drafter(library)
        batch = rng.sample(range(len(rows)), rng.randint(1, len(rows)))
        generation = base.with_(max_new_tokens=rng.choice([1, 3, 5, base.max_new_tokens]))
        max_draft = rng.choice([1, 2, 4, 16])
        chosen = [rows[i] for i in batch]
        plain, plain_gen = _decode(optimizer, chosen, generation, None, 0)
        fast, gen = _decode(optimizer, chosen, generation, drafter, max_draft)
        assert fast == plain, f"seed {seed}: speculative decoding changed the output"
        assert gen.accepted <= gen.drafted
        for key, value in (("drafted", gen.drafted), ("accepted", gen.accepted), ("forwards", gen.forwards),
                           ("plain_forwards", plain_gen.forwards)):
            totals[key] += value
    # Drafts were verified, some kept and some rejected, and fewer forward passes ran than plain decoding's.
    assert 0 < totals["accepted"] < totals["drafted"]
    assert totals["forwards"] < totals["plain_forwards"]


def test_sampling_never_drafts(optimizer: PromptOptimizer) -> None:
    rows = [optimizer.input_ids(q) for q in QUERIES[:4]]
    plain, _ = _decode(optimizer, rows, optimizer.generation(), None, 0)
    sampled = optimizer.generation(do_sample=True)
    generator = Generator(optimizer.decoder, sampled, optimizer.policy.eos_token_ids, optimizer.policy.pad_token_id,
                          np.random.default_rng(0), drafter=Drafter([entry(s) for s in plain]))
    assert generator.drafter is None


@pytest.fixture(scope="module")
def library_bundle(tiny, optimizer: PromptOptimizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy exported with a library of its own greedy prompts (as text) and two others."""
    from _tiny import export_tiny

    prompts = {r.prompt: 2 for r in optimizer.optimize_batch(QUERIES) if r.prompt}
    prompts.update({"Classify the sentiment.": 5, "Answer briefly.": 1})
    return export_tiny(tiny, tmp_path_factory.mktemp("library") / "bundle", library=prompts)


def test_runtime_decodes_the_same_prompts_with_the_library(library_bundle: Path, bundle: Path) -> None:
    manifest = json.loads((library_bundle / "qpo.json").read_text())
    assert manifest["library"] == {"file": "library.json"} and "library.json" in manifest["files"]
    assert "library" not in json.loads((bundle / "qpo.json").read_text())  # no run, no library
    fast = PromptOptimizer.from_bundle(library_bundle, provider="cpu")
    plain = PromptOptimizer.from_bundle(library_bundle, config=RuntimeConfig(provider="cpu", speculative=False))
    old = PromptOptimizer.from_bundle(bundle, provider="cpu")  # a bundle without a library decodes as before
    assert fast.info()["speculative"] and not plain.info()["speculative"] and not old.info()["speculative"]
    assert fast.info()["library"]["prompts"] == 2 + len({r.prompt for r in old.optimize_batch(QUERIES) if r.prompt})
    for batch in (1, 3, 16):
        def prompts(optimizer: PromptOptimizer, size: int = batch) -> list[str]:
            return [r.prompt for q in range(0, len(QUERIES), size) for r in optimizer.optimize_batch(QUERIES[q : q + size])]

        assert prompts(fast) == prompts(plain) == prompts(old)
    stats = fast.stats()
    assert stats["accepted_draft_tokens"] > 0 and stats["forward_passes"] < plain.stats()["forward_passes"]
    # Through the micro-batcher: concurrent callers share speculative decodes and get plain greedy's prompts.
    from concurrent.futures import ThreadPoolExecutor

    with PromptOptimizer.from_bundle(library_bundle, config=RuntimeConfig(provider="cpu", batch_window_ms=20,
                                                                          max_batch_size=8)) as batched:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda q: batched.optimize(q).prompt, QUERIES))
        assert got == [r.prompt for r in plain.optimize_batch(QUERIES)]
        assert batched.stats()["batches"] < len(QUERIES) and batched.stats()["accepted_draft_tokens"] > 0
    with pytest.raises(ValueError, match="max_draft_tokens"):
        RuntimeConfig(max_draft_tokens=0)


def test_a_library_with_a_wrong_checksum_is_refused(library_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(library_bundle, tmp_path / "bundle"))
    (copy / "library.json").chmod(0o644)
    data = json.loads((copy / "library.json").read_text())
    data["prompts"][0]["count"] += 1
    (copy / "library.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="checksum mismatch for 'library.json'"):
        PromptOptimizer.from_bundle(copy, provider="cpu")
    manifest = json.loads((copy / "qpo.json").read_text())
    del manifest["files"]["library.json"]
    (copy / "qpo.json").chmod(0o644)
    (copy / "qpo.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="library.file = 'library.json' has no checksum"):
        PromptOptimizer.from_bundle(copy, provider="cpu")


def test_drafting_backs_off_when_it_does_not_help(optimizer: PromptOptimizer) -> None:
    """Wrong guesses only: each row's prompt-lookup guess is rejected once, then the row stops guessing; a batch
    whose drafts are fewer tokens than its rows decodes plain steps. The output stays plain greedy's."""
    rows = [optimizer.input_ids(q) for q in QUERIES]
    plain, plain_gen = _decode(optimizer, rows, optimizer.generation(), None, 0)
    vocab = optimizer.manifest.model.vocab_size
    # For every 2-gram the rows write, a library prompt that continues it with a token no row writes next; each
    # starts with a token no row writes, so no row is ever on a library prompt's trie path.
    unused = next(t for t in range(vocab) if all(t not in seq for seq in plain))
    wrong = [entry([unused, a, b, (c + 1) % vocab, (c + 2) % vocab])
             for seq in plain for a, b, c in zip(seq, seq[1:], seq[2:], strict=False)]
    drafter = Drafter(wrong)
    guessed = 0
    for row in rows:
        fast, gen = _decode(optimizer, [row], optimizer.generation(), drafter, 4)
        assert fast == _decode(optimizer, [row], optimizer.generation(), None, 0)[0]
        assert gen.drafted <= 2 and gen.accepted == 0  # one rejected guess at most, then no more drafting
        guessed += gen.drafted > 0
    assert guessed > len(rows) // 2
    fast, gen = _decode(optimizer, rows, optimizer.generation(), drafter, 4)
    assert fast == plain and gen.forwards == plain_gen.forwards  # a single row's guess never widens the batch
