"""Quality benchmark (issue 5) on tiny random models: selector, benchmark, report, plots, determinism.

The harness is ``benchmarks/qpo_bench`` (on the path through pytest's ``pythonpath``)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qpo_bench import BenchmarkConfig, benchmark, final_qpo, stable_view, target_check
from qpo_middleware.training.dataset import OfflineDataset, Record
from qpo_middleware.training.selector import Selector, SelectorConfig, text_features

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """A benchmark script (``benchmarks/<name>.py``) as a module, to call its functions and ``main``."""
    spec = importlib.util.spec_from_file_location(f"qpo_bench_script_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def load_quality() -> ModuleType:
    return load_script("quality")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with the SmolLM2 tokenizer: serves as policy base and as target."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qpo_middleware.training.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    directory = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_profile(quality: ModuleType) -> Any:
    return quality.Profile(
        name="tiny", queries=8, prompts="4", prompts_per_query=3, collect_queries=6, test_queries=6, dev_queries=4,
        target_batch_size=8,
        train={"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "num_buckets": 4, "prompt_max_tokens": 8,
               "query_max_tokens": 16, "warmup_ratio": 0.0, "conditioning": "absolute"},
        loops={"loops": 2, "samples_per_query": 2, "reward_floor_quantile": 0.0, "top_k": 50,
               "d0_floor_quantile": 0.25, "preference": "off"},
        bench={"oracle": True, "best_of_n": 2, "quantize": None, "examples_per_label": 2,
               "bootstrap_samples": 200},
    )


@pytest.fixture(scope="module")
def runs(tiny_base: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole script path (collect -> 2 loops -> benchmark -> report) twice, with the same seed."""
    quality = load_quality()
    out = {}
    for name in ("a", "b"):
        folder = tmp_path_factory.mktemp(f"quality-{name}")
        payload = quality.run_quality(["sst2_sample"], tiny_profile(quality), folder, seed=0, model=tiny_base,
                                      say=lambda message: None, notes=["Settings chosen on the test split."])
        out[name] = (folder, payload)
    return out


METHODS = {"none", "default", "random_pool", "best_pool", "selector", "oracle_pool", "oracle_label_routing",
           "qpo_loop1", "qpo_loop2", "qpo_best_of_2", "qpo_implicit_best_of_2"}


def test_results_json_has_every_method_and_loop(runs: dict[str, Any]) -> None:
    folder, payload = runs["a"]
    saved = json.loads((folder / "results.json").read_text())
    task = saved["tasks"]["sst2_sample"]
    assert {m["method"] for m in task["methods"]} == METHODS
    assert [row["loop"] for row in task["loops"]] == [1, 2]
    assert set(task["bundles"]) == {"loop_1", "loop_2"}
    for m in task["methods"]:
        assert 0.0 <= m["ci_low"] <= m["accuracy"] <= m["ci_high"] <= 1.0
        assert m["n"] == task["queries"] == 6
    by_name = {m["method"]: m for m in task["methods"]}
    # Training calls: D0 = 8 queries x 3 of (4 pool prompts + empty); the loops add theirs.
    assert by_name["best_pool"]["training_target_calls"] == by_name["selector"]["training_target_calls"] == 24
    assert by_name["none"]["training_target_calls"] == 0
    assert by_name["qpo_loop2"]["training_target_calls"] == 24 + sum(r["target_calls"] for r in task["loops"])
    assert by_name["qpo_loop1"]["policy_latency_ms_p50"] > 0
    assert by_name["qpo_best_of_2"]["policy_latency_ms_p50"] > 0
    # The oracle is an upper bound of every single-prompt-per-query pool method, and of routing by label,
    # which in turn is at least every single pool prompt.
    for name in ("none", "random_pool", "best_pool", "selector", "oracle_label_routing"):
        assert by_name["oracle_pool"]["accuracy"] >= by_name[name]["accuracy"]
    assert by_name["oracle_label_routing"]["accuracy"] >= by_name["best_pool"]["accuracy"]
    # Leakage check on every row: with leaking prompts replaced by the best pool prompt's outcome.
    for m in task["methods"]:
        assert 0.0 <= m["label_leak_share"] <= 1.0
        if m["label_leak_share"] == 0.0:
            assert m["accuracy_without_leaks"] == pytest.approx(m["accuracy"])
    # The behavioural check: the tiny random target answers one label for nearly every prompt, so nearly every D0
    # prompt steers it (the best one does), and a method's steering picks are replaced by the best pool prompt.
    assert by_name["best_pool"]["steered_share"] == 1.0
    for name in ("none", "best_pool", "random_pool", "selector"):  # they send D0's prompts only: all judged
        assert by_name[name]["steering_checked_share"] == 1.0 and by_name[name]["steered_share"] > 0.5
    assert by_name["best_pool"]["accuracy_without_steering"] == pytest.approx(by_name["best_pool"]["accuracy"])
    for m in task["methods"]:
        assert 0.0 <= m["steered_share"] <= m["steering_checked_share"] <= 1.0
        if m["steered_share"] == 0.0:
            assert m["accuracy_without_steering"] == pytest.approx(m["accuracy"])
        assert m["steered_share"] <= m["leaning_share"] <= m["steering_checked_share"]  # a steering prompt leans
        if m["leaning_share"] == m["steered_share"]:
            assert m["accuracy_without_leaning"] == pytest.approx(m["accuracy_without_steering"])
    assert len(task["d0"]["rewards"]) == 24
    assert task["loops"][0]["train_records"] < 24  # loop 1 trains on D0 above its 0.25 quantile only
    assert task["loops"][1]["new_records"] == len(task["loops"][1]["new_rewards"]) == task["loops"][1]["kept_pairs"]
    assert {g["versus"] for g in task["gaps"]} >= {"best_pool", "selector"}
    # The kept loop (whose row the gaps and best-of-n use) is chosen on the dev split, not on test.
    dev = {row["loop"]: row["greedy_accuracy_dev"] for row in task["loops"]}
    assert task["kept_loop"] == max(sorted(dev), key=lambda loop: (dev[loop], -loop)) and "dev" in task["kept_loop_reason"]
    assert {g["method"] for g in task["gaps"]} == {f"qpo_loop{task['kept_loop']}", "qpo_best_of_2",
                                                   "qpo_implicit_best_of_2"}
    assert {e["label"] for e in task["examples"]} == {"negative", "positive"}
    config = saved["config"]
    assert config["seed"] == 0 and config["sizes"]["queries"] == 8
    environment = saved["environment"]
    assert environment["cpu_cores"] and environment["versions"]["torch"] and environment["versions"]["onnxruntime"]


def test_report_and_plots_are_written(runs: dict[str, Any]) -> None:
    folder, payload = runs["a"]
    report = (folder / "report.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in report
    kept = f"qpo_loop{payload['tasks']['sst2_sample']['kept_loop']}"
    assert f"`{kept}` vs `best_pool`" in report and f"`{kept}` vs `selector`" in report
    assert f"**Against the target** (loop chosen on the dev split `{kept}`" in report and "At least +7 over `best_pool`" in report
    assert "- Settings chosen on the test split." in report and payload["notes"] == ["Settings chosen on the test split."]
    plots = payload["tasks"]["sst2_sample"]["plots"]
    assert len(plots) == 4
    for plot in plots:
        path = folder / plot
        assert path.suffix == ".png" and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({path.name})" in report


def test_same_seed_same_numbers(runs: dict[str, Any]) -> None:
    (_, first), (_, second) = runs["a"], runs["b"]
    assert stable_view(first) == stable_view(second)


def test_rerun_reuses_bundles_and_cache(runs: dict[str, Any]) -> None:
    folder, payload = runs["a"]
    run_dir = folder / "runs" / "sst2_sample-seed0-shots0"
    again = benchmark(run_dir, BenchmarkConfig(oracle=True, best_of_n=2, quantize=None, examples_per_label=2,
                                               bootstrap_samples=200))
    assert all(b["reused"] for b in again.bundles.values())
    assert all(m.target_calls == 0 for m in again.methods)  # every pair from the score cache
    task = payload["tasks"]["sst2_sample"]
    def numbers(methods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in m.items() if k != "target_calls"} for m in stable_view(methods)]

    assert numbers(again.to_dict()["methods"]) == numbers(task["methods"])
    # A bundle `qpo export` wrote for the final loop (RUN/bundle) is reused too.
    (run_dir / "bench" / "bundles" / "loop_2").rename(run_dir / "bundle")
    final = benchmark(run_dir, BenchmarkConfig(oracle=False, quantize=None, loops=(2,), bootstrap_samples=200))
    assert final.bundles["loop_2"]["path"] == str(run_dir / "bundle") and final.bundles["loop_2"]["reused"]
    assert final.method("qpo_loop2").accuracy == next(m for m in task["methods"] if m["method"] == "qpo_loop2")["accuracy"]


def test_torch_backend_writes_the_runtime_prompts(runs: dict[str, Any]) -> None:
    """The torch backend (full-size GPU runs) runs each loop's checkpoint in batches: its greedy prompts
    are the ones the fp32 bundle writes through the runtime, so its accuracies are the runtime's."""
    folder, payload = runs["a"]
    run_dir = folder / "runs" / "sst2_sample-seed0-shots0"
    config = BenchmarkConfig(oracle=False, best_of_n=3, quantize=None, bootstrap_samples=200,
                             policy_backend="torch", policy_batch_size=4)
    result = benchmark(run_dir, config)
    task = payload["tasks"]["sst2_sample"]
    assert result.bundles == {}  # nothing exported
    for loop in (1, 2):
        name = f"qpo_loop{loop}"
        assert result.per_query["prompts"][name] == task["per_query"]["prompts"][name]
        method = result.method(name)
        assert method.accuracy == next(m for m in task["methods"] if m["method"] == name)["accuracy"]
        assert method.policy_latency_ms_p50 is None and "torch on cpu" in method.description
    sampled = result.method("qpo_best_of_3")
    assert sampled.n == 6 and "torch on cpu" in sampled.description
    assert result.selector["best_of_n_distinct_candidates_mean"] >= 1
    implicit = result.method("qpo_implicit_best_of_3")
    assert implicit.n == 6 and result.selector["implicit_scoring_ms_p50"] > 0
    with pytest.raises(ValueError, match="policy_backend must be one of onnx, torch"):
        BenchmarkConfig(policy_backend="jax")
    with pytest.raises(ValueError, match="policy_batch_size must be >= 1"):
        BenchmarkConfig(policy_batch_size=0)


def test_device_merge_joins_per_task_runs(runs: dict[str, Any], tmp_path: Path) -> None:
    """benchmarks/device/merge.py: one report from the per-task processes of a GPU run."""
    spec = importlib.util.spec_from_file_location("qpo_device_merge", REPO / "benchmarks" / "device" / "merge.py")
    assert spec and spec.loader
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    folder, payload = runs["a"]
    other = tmp_path / "other"
    other.mkdir()
    renamed = json.loads((folder / "results.json").read_text())
    renamed["config"]["tasks"] = ["other"]
    renamed["tasks"] = {"other": {**renamed["tasks"]["sst2_sample"], "task": "other"}}
    renamed["wall_seconds"] = 1e6
    (other / "results.json").write_text(json.dumps(renamed))
    assert merge.main([str(folder), str(other), "--out", str(tmp_path / "merged"), "--note", "ran side by side"]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["config"]["tasks"] == ["sst2_sample", "other"] and set(merged["tasks"]) == {"sst2_sample", "other"}
    assert merged["wall_seconds"] == 1e6 and merged["notes"][-1] == "ran side by side"
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "## sst2_sample" in report and "## other" in report and "- ran side by side" in report
    assert (tmp_path / "merged" / "other_accuracy.png").is_file()
    renamed["config"]["seed"] = 1
    (other / "results.json").write_text(json.dumps(renamed))
    with pytest.raises(SystemExit, match="config differs"):
        merge.main([str(folder), str(other), "--out", str(tmp_path / "bad")])


def test_target_check_says_how_far_off() -> None:
    def method(name: str, accuracy: float, loop: int | None = None) -> dict[str, Any]:
        return {"method": name, "accuracy": accuracy, "family": "qpo" if loop else "pool", "loop": loop}

    def gap(versus: str, difference: float) -> dict[str, Any]:
        return {"method": "qpo_loop3", "versus": versus, "difference": difference, "ci_low": difference - 0.05,
                "ci_high": difference + 0.05}

    task = {"methods": [method("best_pool", 0.60), method("selector", 0.66), method("qpo_loop1", 0.70, 1),
                        method("qpo_loop3", 0.68, 3)],
            "gaps": [gap("best_pool", 0.08), gap("selector", 0.02)]}
    lines = target_check(task)
    assert lines[0].endswith("— met.") and "+8.0 [+3.0, +13.0]" in lines[0]
    assert lines[1].endswith("— met.")
    assert lines[2] == "- Last loop (3) above loop 1: 68.0 vs 70.0 — **not met: 2.0 points below loop 1**."
    task["gaps"] = [gap("best_pool", 0.03), gap("selector", -0.01)]
    lines = target_check(task)
    assert "**not met: 4.0 points short**" in lines[0] and "**not met: 1.0 points behind**" in lines[1]
    task["gaps"] = [gap("best_pool", 0.0), gap("selector", 0.0)]
    task["methods"][-1]["accuracy"] = 0.70
    lines = target_check(task)
    assert "**not met: 7.0 points short**" in lines[0] and lines[1].endswith("**not met: tied**.")
    assert lines[2].endswith("**not met: tied with loop 1**.")
    assert target_check({"methods": [method("best_pool", 0.6)], "gaps": []}) == []
    # A loop kept on the dev split is QPO's result; the last-vs-first check still reads the last loop.
    assert final_qpo(task)["method"] == "qpo_loop3"
    task["kept_loop"] = 1
    assert final_qpo(task)["method"] == "qpo_loop1"
    assert target_check(task)[-1].startswith("- Last loop (3) above loop 1")


# ---------------------------------------------------------------------------- selector


def synthetic_records(seed: int = 0) -> tuple[list[Record], list[tuple[str, int]], list[str]]:
    """Which prompt works depends on one keyword of the query; the rest are filler words."""
    rng = random.Random(seed)
    filler = [f"word{i}" for i in range(40)] + ["the", "a", "movie", "film", "story", "plot", "actor", "scene", "good", "bad"]
    keywords = ["alpha", "beta", "gamma"]
    prompts = ["Use method A.", "Use method B.", "Use method C.", "Just answer."]

    def queries(n: int) -> list[tuple[str, int]]:
        out = []
        for _ in range(n):
            k = rng.randrange(3)
            words = rng.sample(filler, 6)
            words.insert(rng.randrange(7), keywords[k])
            out.append((" ".join(words), k))
        return out

    records = []
    for i, (query, k) in enumerate(queries(120)):
        for j, prompt in enumerate(prompts):
            p_correct = 0.9 if j == k else (0.5 if j == 3 else 0.15)
            records.append(Record(task="synthetic", query_id=f"q{i}", query=query, prompt=prompt,
                                  prompt_source=f"pool:{j}", loop=0, target="t", correct=rng.random() < p_correct,
                                  reward=0.0, prompt_mean_accuracy=0.0))
    return records, queries(100), prompts


def test_selector_picks_the_prompt_the_query_needs() -> None:
    records, test, prompts = synthetic_records()
    selector = Selector.fit(records)
    picked = selector.select_batch([q for q, _ in test])
    accuracy = sum(prompts.index(p) == k for p, (_, k) in zip(picked, test, strict=True)) / len(test)
    assert accuracy > 0.9
    assert selector.select(test[0][0]) == picked[0]
    probabilities = selector.predict(test[0][0], prompts)
    assert all(0.0 < p < 1.0 for p in probabilities)
    assert prompts[max(range(4), key=probabilities.__getitem__)] == picked[0]
    # A prompt outside the pool is scored like the pool prompts it resembles.
    k = test[0][1]
    unseen = selector.predict(test[0][0], [prompts[k].replace(".", "!"), ""])
    assert unseen[0] > probabilities[(k + 1) % 3]
    assert selector.best_of(test[0][0], ["Use method X.", prompts[k]])[0] == prompts[k]


def test_selector_is_deterministic_and_validates() -> None:
    records, test, _ = synthetic_records(seed=1)
    config = SelectorConfig(cv_folds=0, steps=100)
    first, second = Selector.fit(records, config), Selector.fit(list(reversed(records)), config)
    queries = [q for q, _ in test[:20]]
    assert Selector.fit(records, config).pool_scores(queries).tolist() == first.pool_scores(queries).tolist()
    assert first.select_batch(queries) == [p for p in second.select_batch(queries)]
    with pytest.raises(ValueError, match="at least one record"):
        Selector.fit([])
    features = text_features(["Same text", "same TEXT", ""], 256)
    assert features[0].tolist() == features[1].tolist() and not features[2].any()


def test_selector_fits_a_real_tiny_d0(runs: dict[str, Any]) -> None:
    folder, _ = runs["a"]
    d0 = OfflineDataset(folder / "runs" / "sst2_sample-seed0-shots0").loop(0)
    selector = Selector.fit(d0)
    assert sorted(selector.prompts) == sorted({r.prompt for r in d0})
    query = d0[0].query
    assert selector.select(query) in selector.prompts
    scores = selector.predict(query, selector.prompts + ["an instruction the pool never had"])
    assert len(scores) == len(selector.prompts) + 1 and all(0.0 < s < 1.0 for s in scores)



def test_names_labels_matches_whole_label_words() -> None:
    from qpo_middleware.training.tasks import names_labels

    labels = ["positive", "negative", "sci/tech"]
    assert names_labels("The answer is Positive.", labels) == {"positive"}
    assert names_labels("positive or negative?", labels) == {"positive", "negative"}
    assert names_labels("Answer with one word.", labels) == set()
    assert names_labels("nonpositive values", labels) == set()  # not a whole word
    assert names_labels("Is it Sci/Tech news?", labels) == {"sci/tech"}


def test_label_routing_sends_each_label_to_its_best_prompt() -> None:
    from qpo_bench.harness import label_routing
    from qpo_middleware.training.targets import Score

    def row(*hits: bool) -> list[Score]:
        return [Score(correct=h) for h in hits]

    # Prompt 0 is right on every "a" query, prompt 1 on every "b" query; prompt 2 never.
    matrix = [row(True, False, False), row(True, False, False), row(False, True, False), row(True, True, False)]
    golds = ["a", "a", "b", "b"]
    assert label_routing(matrix, golds, [0, 1, 2]) == {"a": 0, "b": 1}
    # The prompt right most often wins whatever the order; among equals, the earlier one in ``order``.
    assert label_routing([row(True, True, False), row(False, True, True)], ["b", "b"], [2, 0, 1]) == {"b": 1}
    assert label_routing([row(True, False, True)], ["c"], [2, 0, 1]) == {"c": 2}


def test_size_overrides_and_a_recipe_started_from_another_runs_d0(runs: dict[str, Any], tmp_path: Path) -> None:
    quality = load_quality()
    profile = quality.with_overrides(tiny_profile(quality), ["size.test_queries=300", "train.conditioning=query_rank"])
    assert profile.test_queries == 300 and profile.train["conditioning"] == "query_rank"
    with pytest.raises(SystemExit, match="size fields"):
        quality.with_overrides(profile, ["size.epochs=3"])

    folder, _ = runs["a"]
    source = next((folder / "runs").iterdir())
    copied = tmp_path / "runs" / source.name
    assert quality.reuse_d0(source, copied)
    from qpo_middleware.training.run import RunPaths

    d0 = OfflineDataset(source).loop(0)
    assert OfflineDataset(copied).records == d0 and len(OfflineDataset(source).records) > len(d0)  # loops left out
    assert not RunPaths(copied).policy.exists()  # the recipe trains afresh
    assert (RunPaths(copied).run_file.read_text() == RunPaths(source).run_file.read_text())
    assert not quality.reuse_d0(source, copied)  # an existing run is never overwritten


def test_policy_choices_give_a_base_reference_the_recipe_seed_and_rescore_new_inputs(
        tiny_base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pool_choice's choice step: a base-model DPO reference gets its reward-token rows from the recipe's seed
    (as in training), and a cache made for other inputs is not served."""
    import qpo_bench.offline as offline
    from qpo_middleware.training.config import TrainConfig
    from qpo_middleware.training.loops import LoopMetrics, load_policy
    from qpo_middleware.training.preference import candidate_logps
    from qpo_middleware.training.run import RunPaths

    run_dir = tmp_path / "run"
    model, tokenizer, _ = load_policy(tiny_base, TrainConfig(**offline.TRAIN))
    model.save_pretrained(RunPaths(run_dir).checkpoint(1))
    tokenizer.save_pretrained(RunPaths(run_dir).checkpoint(1))
    done = LoopMetrics(loop=1, train_records=0, first_loss=0.0, last_loss=0.0, train_seconds=0.0)
    RunPaths(run_dir).metrics(1).write_text(json.dumps(done.to_dict()))  # loop 1 is the run's last
    queries, prompts = ["a gripping, funny film", "dull and far too long"], ["Is it positive?", "Label it.", ""]

    def choose(seed: int, cache: str, candidates: list[str] = prompts) -> dict[str, Any]:
        return offline.policy_choices(run_dir, queries, candidates, tmp_path / cache, rules=("dpo_ratio",),
                                      reference=tiny_base, seed=seed)

    seeded = {seed: choose(seed, f"choices-{seed}.json")["logps"]["reference"] for seed in (0, 1)}
    assert seeded[0] != seeded[1]  # the new token rows' noise comes from the seed
    ref, ref_tokenizer, ref_fmt = load_policy(tiny_base, TrainConfig(**{**offline.TRAIN, "seed": 1}))
    top = len(ref_fmt.reward_token_ids) - 1
    expected = candidate_logps(ref, ref_tokenizer, ref_fmt, queries, prompts, (top,))[0]
    for got, want in zip(seeded[1], expected.tolist(), strict=True):
        assert got == pytest.approx(want, abs=1e-3)

    first = choose(1, "choices-1.json")  # the same inputs: served from the cache without a model
    monkeypatch.setattr(offline, "load_policy", lambda *a, **k: pytest.fail("the cache should have served"))
    assert choose(1, "choices-1.json") == first
    (tmp_path / "link").symlink_to(run_dir)  # the same run through another path (a ``runs`` link): served too
    assert offline.policy_choices(tmp_path / "link", queries, prompts, tmp_path / "choices-1.json",
                                  rules=("dpo_ratio",), reference=tiny_base, seed=1) == first
    monkeypatch.undo()
    again = choose(1, "choices-1.json", prompts[:2])  # other prompts: scored again, never stale indices
    assert len(again["logps"]["top"][0]) == 2 and again["inputs"] != first["inputs"]

    # Rule 'choose' (the runtime's strategy): the top row minus the offsets training recorded, and only when
    # they cover every candidate; derived afresh from the cached scores, so new offsets are never stale.
    from qpo_middleware.training.export import ChoiceOffsets, write_choice_offsets

    def choose_rule(offsets: dict[str, float]) -> dict[str, Any]:
        write_choice_offsets(RunPaths(run_dir).checkpoint(1), ChoiceOffsets(offsets=offsets, queries=2))
        return offline.policy_choices(run_dir, queries, prompts, tmp_path / "choices-choose.json",
                                      rules=("dpo_ratio", "choose"), reference=tiny_base, seed=1)

    assert "choose" not in choose_rule({prompts[0]: -1.0, prompts[1]: -2.0})  # "" has no offset
    top = choose_rule({prompts[0]: -1.0, prompts[1]: -2.0})["logps"]["top"]
    assert top == first["logps"]["top"]
    monkeypatch.setattr(offline, "load_policy", lambda *a, **k: pytest.fail("the cache should have served"))
    for favoured in range(3):
        offsets = {p: (-1e4 if j == favoured else 0.0) for j, p in enumerate(prompts)}
        assert choose_rule(offsets)["choose"] == [favoured, favoured]
    offsets = {p: -float(j) for j, p in enumerate(prompts)}
    assert choose_rule(offsets)["choose"] == [max(range(3), key=lambda j, r=r: r[j] + j) for r in top]


def test_a_later_loop_recipe_continues_its_loop_1_recipe_on_new_collect_queries(
        tiny_base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pool_choice's ``*_loop2`` recipes: a copy of the loop-1 recipe's run (not its choice caches) whose collect
    split grows past the queries the benchmark validates on; loop 2 samples only on the new ones, and its DPO
    reference (for rule dpo_ratio) is loop 1's policy."""
    from _handmade import handmade_d0

    import qpo_bench.offline as offline
    from qpo_middleware.training.loops import completed_loops
    from qpo_middleware.training.run import Run, RunPaths

    d0 = tmp_path / "d0"
    handmade_d0(d0, tiny_base)
    loops = {"d0_floor_quantile": 0.0, "preference": "instead", "preference_pairs_per_query": 2,
             "choice_offset_queries": 4}
    monkeypatch.setattr(offline, "TRAIN", {"epochs": 1, "learning_rate": 5e-3, "batch_size": 8, "num_buckets": 4,
                                           "prompt_max_tokens": 8, "query_max_tokens": 16, "warmup_ratio": 0.0})
    monkeypatch.setattr(offline, "RECIPES", {
        "dpo": {"train": {"conditioning": "query_rank"}, "loops": loops},
        "dpo_loop2": {"train": {"conditioning": "query_rank"}, "after": {"recipe": "dpo", "queries": 5},
                      "loops": {**loops, "loops": 2, "samples_per_query": 2}}})
    runs, quality = tmp_path / "runs", load_quality()

    def train(recipes: list[str]) -> dict[str, float]:
        return offline.train_recipes(runs, recipes, "x", lambda run_dir: quality.reuse_d0(d0, run_dir), seed=0,
                                     held_out=2, say=lambda _: None)

    with pytest.raises(SystemExit, match="list it before dpo_loop2"):
        train(["dpo_loop2"])
    train(["dpo"])
    (runs / "dpo_x" / "choices_dev_2.json").write_text("{}")  # the benchmark's cache: made for loop 1's policy
    assert set(train(["dpo", "dpo_loop2"])) == {"train_dpo_loop2"}  # the finished loop-1 recipe is kept
    before, after = Run.open(d0).splits.collect, Run.open(runs / "dpo_loop2_x").splits.collect
    assert len(before) == 6 and len(after) == 2 + 5 and after[:6] == before
    sampled = {r.query_id for r in OfflineDataset(runs / "dpo_loop2_x").records if r.loop == 2}
    assert sampled == {e.id for e in after[2:]}  # never the 2 the benchmark validates on
    assert [m.loop for m in completed_loops(runs / "dpo_loop2_x")] == [1, 2] and len(completed_loops(runs / "dpo_x")) == 1
    assert not (runs / "dpo_loop2_x" / "choices_dev_2.json").exists()
    assert offline.reference_model(runs, "dpo_loop2", "x") == str(RunPaths(runs / "dpo_loop2_x").checkpoint(1))
    assert train(["dpo", "dpo_loop2"]) == {}  # both finished: nothing runs again
    with pytest.raises(SystemExit, match="asks for more"):
        offline.continue_run(runs / "dpo_loop2_x", tmp_path / "fewer", 3)


def test_choice_rules_chooses_on_dev_and_bounds_with_the_hindsight_prompt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """choice_rules.py on a hand-built pool_choice folder: the rule is chosen on dev alone, test is scored on
    the full grid, and the best single prompt on those test queries is reported as a bound."""
    spec = importlib.util.spec_from_file_location("qpo_choice_rules", REPO / "benchmarks" / "choice_rules.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompts = ["none", "pool:a", "pool:b"]
    # dev: the policy's top row prefers pool:a, which is always wrong; its reference prefers it even more, so
    # ratio_prior (top minus the reference's mean) moves to pool:b, always right on dev.
    dev = {"ids": ["d0", "d1"], "grid": {"d0": "001", "d1": "001"}, "hits": {"qpo_r_dpo_ratio": "11"},
           "policy_logps": {"r": {"top": [[-5.0, -1.0, -2.0], [-5.0, -1.0, -2.0]],
                                  "reference": [[-5.0, -0.1, -3.0], [-5.0, -0.1, -3.0]]}}}
    # test: 4 queries, the first 3 with the full grid; "none" is the best single prompt there (3 of 3).
    test = {"ids": ["t0", "t1", "t2", "t3"], "grid": {"t0": "101", "t1": "110", "t2": "100"},
            "hits": {k: "1001" for k in ("best_prompt", "best_prompt_dev", "selector", "qpo_r_dpo_ratio")},
            "policy_logps": {"r": {"top": [[-5.0, -1.0, -2.0]] * 4, "reference": [[-5.0, -0.1, -3.0]] * 4}}}
    (tmp_path / "per_query.json").write_text(json.dumps({"prompts": prompts, "splits": {"dev": dev, "test": test}}))
    (tmp_path / "results.json").write_text(json.dumps(
        {"task": "sst2", "commit": "abc1234", "validation": {"chosen_recipe": "r"}}))
    monkeypatch.setattr(sys, "argv", ["choice_rules.py", str(tmp_path)])
    module.main()
    out = json.loads((tmp_path / "choice_rules.json").read_text())
    assert out["validation"]["chosen"] == "ratio_prior"
    assert out["validation"]["scores"]["likelihood"] == 0.0 and out["validation"]["scores"]["ratio_prior"] == 1.0
    methods = out["test"]["methods"]
    assert out["test"]["queries"] == 3
    assert methods["ratio_prior (chosen on dev, no reference model)"]["accuracy"] == pytest.approx(1 / 3)  # pool:b
    assert methods["best_prompt_hindsight (none; bound)"]["accuracy"] == 1.0
    assert methods["best_prompt"]["n"] == 3  # the recorded hits, cut to the scored grid
    assert "best_prompt_hindsight" in (tmp_path / "choice_rules.md").read_text()


def test_seed_mean_averages_each_seeds_dev_chosen_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """seed_mean.py: QPO's row is each seed's dev-chosen method; the mean gap's interval is the normal
    approximation over the seeds' paired intervals (hand-worked below)."""
    spec = importlib.util.spec_from_file_location("qpo_seed_mean", REPO / "benchmarks" / "seed_mean.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def gap(diff: float, width: float) -> dict[str, Any]:
        return {"diff": diff, "ci95": [diff - width / 2, diff + width / 2], "significant": True}

    folders = []
    for seed, (chosen, acc, d) in enumerate([("qpo_a", 0.80, 0.10), ("qpo_b", 0.70, 0.02)]):
        methods = {"best_prompt": {"accuracy": acc - d, "n": 300, "vs_selector": gap(0.0, 0.0392)},
                   "selector": {"accuracy": acc - d, "n": 300, "vs_best_prompt": gap(0.0, 0.0392)},
                   chosen: {"accuracy": acc, "n": 300, "vs_best_prompt": gap(d, 0.0392), "vs_selector": gap(d, 0.0392)},
                   "qpo_a" if chosen == "qpo_b" else "qpo_b": {"accuracy": 0.0, "n": 300},  # not chosen: ignored
                   "qpo_plain": {"accuracy": 0.6 + seed / 10, "n": 300, "vs_best_prompt": gap(0.0, 0.0392),
                                 "vs_selector": gap(0.0, 0.0392)},  # fixed before testing: a row with --methods
                   # a recipe fixed before testing, scored with the rule each seed's dev chose
                   f"qpo_r_{('choose', 'dpo_ratio')[seed]}": {"accuracy": 0.5 + seed / 10, "n": 300,
                                                              "vs_best_prompt": gap(0.0, 0.0392),
                                                              "vs_selector": gap(0.0, 0.0392)},
                   "qpo_q_choose": {"accuracy": 0.5, "n": 300}, "qpo_q_likelihood": {"accuracy": 0.5, "n": 300}}
        steering = {chosen: {"steered_share": 0.5, "accuracy_without_steering": acc - 0.1,
                             "vs_reference_without_steering": gap(d - 0.1, 0.0392)},
                    "qpo_plain": {"steered_share": 0.0, "accuracy_without_steering": 0.6 + seed / 10,
                                  "vs_reference_without_steering": gap(0.0, 0.0392)}}
        # qpo_plain sends no steering prompt but leans on seed 1 only (a softer check; no run before it has one).
        leaning = {"qpo_plain": {"steered_share": 0.2 * seed, "accuracy_without_steering": 0.6,
                                 "vs_reference_without_steering": gap(-0.02 * seed, 0.0392)}}
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"task": "sst2", "commit": "abc", "settings": {"seed": seed},
                                                         "validation": {"chosen": chosen},
                                                         "test": {"methods": methods, "steering": steering,
                                                                  "leaning": leaning}}))
        folders.append(str(folder))
    monkeypatch.setattr(sys, "argv", ["seed_mean.py", *folders, "--out", str(tmp_path / "mean"), "--methods",
                                      "qpo_plain,qpo_r"])
    module.main()
    rows = json.loads((tmp_path / "mean" / "seed_mean.json").read_text())["methods"]
    assert rows["qpo_r"]["rows"] == ["qpo_r_choose", "qpo_r_dpo_ratio"]
    assert rows["qpo_r"]["per_seed"] == pytest.approx([0.5, 0.6])
    assert "qpo_r: `qpo_r_choose`, `qpo_r_dpo_ratio`" in (tmp_path / "mean" / "seed_mean.md").read_text()
    qpo = rows["qpo_chosen"]
    assert qpo["accuracy"] == pytest.approx(0.75) and qpo["queries"] == 600
    assert (qpo["steered_share"], qpo["accuracy_without_steering"]) == pytest.approx((0.5, 0.65))
    assert rows["qpo_plain"]["per_seed"] == pytest.approx([0.6, 0.7]) and rows["qpo_plain"]["steered_share"] == 0.0
    assert "steered_share" not in rows["best_prompt"]
    assert (rows["qpo_plain"]["leaning_share"], rows["qpo_plain"]["accuracy_without_leaning"]) == pytest.approx((0.1, 0.6))
    assert "leaning_share" not in qpo  # no seed checked the chosen row for leaning
    table = (tmp_path / "mean" / "seed_mean.md").read_text()
    assert rows["qpo_plain"]["vs_best_prompt_without_leaning"]["diff"] == pytest.approx(-0.01)
    assert qpo["vs_best_prompt_without_steering"]["diff"] == pytest.approx(-0.04)  # (0.00 - 0.08) / 2
    assert "| qpo_plain | 65.0 | 60.0 / 70.0 | 600 |" in table
    assert "| 0% | 65.0, +0.0 [-1.4, +1.4] (n.s.) | 10% | 60.0, -1.0 [-2.4, +0.4] (n.s.) |" in table
    assert "| 50% | 65.0, -4.0 [-5.4, -2.6] | – | – |" in table
    monkeypatch.setattr(sys, "argv", ["seed_mean.py", *folders, "--out", str(tmp_path / "m3"), "--methods", "qpo_x"])
    with pytest.raises(SystemExit, match="Seed 0 has no test row qpo_x"):
        module.main()
    monkeypatch.setattr(sys, "argv", ["seed_mean.py", *folders, "--out", str(tmp_path / "m4"), "--methods", "qpo_q"])
    with pytest.raises(SystemExit, match="no test row qpo_q"):  # two rules scored on test: which one is ambiguous
        module.main()
    # each seed's se = 0.0392 / 3.92 = 0.01; mean se = sqrt(2) * 0.01 / 2; mean gap 0.06
    half = 1.96 * math.sqrt(2) * 0.01 / 2
    assert qpo["vs_best_prompt"]["ci95"] == pytest.approx([0.06 - half, 0.06 + half])
    monkeypatch.setattr(sys, "argv", ["seed_mean.py", folders[0], folders[0], "--out", str(tmp_path / "m2")])
    with pytest.raises(SystemExit, match="distinct seeds"):
        module.main()


def test_steering_check_replaces_steering_picks_by_the_fallbacks_verdicts() -> None:
    from qpo_bench.offline import steering_check

    sent = {"router": ["s", "n", "s", "n"], "plain": ["n", "n", "n", "n"]}
    hits = {"router": [True, True, True, False], "plain": [False, True, False, False],
            "best_prompt_dev": [False, False, True, True]}
    out = steering_check(sent, hits, {"s": "World", "n": None}, "best_prompt_dev", [False, True, False, True])
    assert out["router"]["steered_share"] == 0.5
    assert out["router"]["accuracy_without_steering"] == 0.5  # queries 1 and 3 take best_prompt_dev's verdicts
    assert out["router"]["vs_reference_without_steering"]["diff"] == 0.0
    assert out["plain"] == {**out["plain"], "steered_share": 0.0, "accuracy_without_steering": 0.25}


def test_pool_choice_report_shows_the_leaning_check_beside_the_steering_check() -> None:
    """pool_choice.py's steering lines: a run that checked leaning gets its two columns and the leaning prompts that
    do not also steer; a run from before the lean check renders as it did."""
    spec = importlib.util.spec_from_file_location("qpo_pool_choice", REPO / "benchmarks" / "pool_choice.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gap = {"diff": 0.02, "ci95": [-0.01, 0.05], "significant": False}
    check = {"steered_share": 0.25, "accuracy_without_steering": 0.7, "vs_reference_without_steering": gap}
    results = {"pool_steering": {"pool:a": "World"}, "pool_leaning": {"pool:a": "World", "pool:b": "Sports"},
               "test": {"methods": {"qpo_x": {"accuracy": 0.75}}, "steering": {"qpo_x": check},
                        "leaning": {"qpo_x": {**check, "steered_share": 0.5, "accuracy_without_steering": 0.68}}}}
    lines = module.steering_lines(results)
    assert "`pool:b` → Sports" in lines[2] and "`pool:a`" not in lines[2]  # pool:a is listed as steering already
    assert lines[-1] == "| qpo_x | 25.0% | 75.0 | 70.0 | +2.0 [-1.0, +5.0] (n.s.) | 50.0% | 68.0 |"
    old = {k: v for k, v in results.items() if k != "pool_leaning"}
    old["test"] = {k: v for k, v in results["test"].items() if k != "leaning"}
    assert module.steering_lines(old)[-1] == "| qpo_x | 25.0% | 75.0 | 70.0 | +2.0 [-1.0, +5.0] (n.s.) |"
    assert not any("Leaning" in line for line in module.steering_lines(old))


def test_pool_choice_route_reads_count_the_queries_sent_their_gold_labels_route() -> None:
    """pool_choice.py's route reads: a label_route recipe's picks are checked against the routes training draws from
    D0 (pos -> C, neg -> B here); other recipes and the baselines get no row."""
    spec = importlib.util.spec_from_file_location("qpo_pool_choice", REPO / "benchmarks" / "pool_choice.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scored = {"q1": ("pos", {"A": True, "B": False}), "q2": ("pos", {"A": False, "C": True}),
              "q3": ("pos", {"B": False, "C": True}), "q4": ("neg", {"A": False, "B": True}),
              "q5": ("neg", {"B": True, "C": False}), "q6": ("neg", {"A": True, "C": False})}
    d0 = [Record(task="t", query_id=q, query=f"query {q}", prompt=prompt, prompt_source="pool:x", loop=0, target="t",
                 correct=ok, reward=float(ok), prompt_mean_accuracy=0.5, label=label)
          for q, (label, verdicts) in scored.items() for prompt, ok in verdicts.items()]
    golds = ["pos", "pos", "neg", "neg"]
    sent = {"qpo_label_route_top4_likelihood": ["C", "B", "B", "A"], "qpo_dpo_only_likelihood": ["C", "C", "B", "B"],
            "selector": ["C", "C", "B", "B"]}
    reads = module.route_read(["label_route_top4", "dpo_only"], d0, sent, golds)
    assert reads == {"qpo_label_route_top4_likelihood": {"gold_route": 0.5, "a_route": 0.75, "queries": 4}}
    lines = module.route_lines({"route_reads": {"dev": reads, "test": {}}})
    assert lines[-1] == "| qpo_label_route_top4_likelihood | 50.0% (75.0%) | – |"
    assert module.route_lines({}) == []  # runs from before the route reads render as they did
    # Rule "remap": the read is the likelihood picks' gold-route share (dev's labels only), and each route sends
    # what route_remap gives at that read; other recipes get none.
    from qpo_middleware.training.policy import route_remap

    remap = module.remap_routes("label_route_top4", d0, sent["qpo_label_route_top4_likelihood"], golds)
    assert remap == {"read": 0.5, "serve": route_remap(d0, 0.5)}
    assert module.remap_routes("dpo_only", d0, sent["qpo_dpo_only_likelihood"], golds) is None
    lines = module.route_lines({"route_reads": {"dev": reads, "test": {}},
                                "route_remaps": {"label_route_top4": {"read": 0.5, "serve": {"C": "A", "B": "B"}}}})
    assert lines[-1] == "- `label_route_top4`: at a route read of 50.0% on dev, `C` sends `A`"
    # Rule "posterior": the recipe's route table, its temperature fit on the gold labels from the route scores
    # (columns B and C of the policy's scores over prompts A, B, C); a sure read sends its label's best prompt.
    prompts = ["A", "B", "C"]
    top = [[0.0, -9.0, 0.0], [0.0, -9.0, 0.0], [0.0, 0.0, -9.0], [0.0, 0.0, -9.0]]  # pos, pos, neg, neg: sure
    table = module.posterior_table("label_route_top4", d0, top, prompts, golds)
    assert table.routes == ("B", "C") and table.labels == ("neg", "pos") and table.temperature == 0.125
    best = {label: table.prompts[max(range(3), key=table.accuracy[i].__getitem__)]
            for i, label in enumerate(table.labels)}
    assert module.posterior_picks(table, top, prompts) == [best[g] for g in golds]
    lines = module.route_lines({"route_reads": {"dev": reads, "test": {}},
                                "route_tables": {"label_route_top4": {**table.to_dict(), "temperature": 0.5}}})
    assert lines[-1] == "- `label_route_top4`: temperature 0.5; routes `B`, `C`; 3 prompts to send"


def test_label_router_routes_by_predicted_label_on_real_sst2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_data: Path) -> None:
    """label_router.py on a hand-built pool_choice folder over real sst2 splits: ``pool:a`` is right exactly on
    positive queries and ``pool:b`` on negative ones, so the routes are a→positive, b→negative, gold routes are
    always right, a route through a label known with probability q is right with probability q, and the router
    is right exactly where its classifier is."""
    from qpo_middleware.training.tasks import get_task

    spec = importlib.util.spec_from_file_location("qpo_label_router", REPO / "benchmarks" / "label_router.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task = get_task("sst2")
    settings = {"task": "sst2", "seed": 3, "train_queries": 60, "dev_queries": 8, "test_queries": 5}
    splits = task.splits(real_data, seed=3, n_train=60, n_collect=8, n_test=5)

    def part(examples: list[Any], scored: int) -> dict[str, Any]:
        golds = [task.gold_text(e) for e in examples]
        grid = {e.id: "01" + "0" if g == "positive" else "001" for e, g in zip(examples[:scored], golds, strict=False)}
        return {"ids": [e.id for e in examples], "gold": golds, "grid": grid,
                "hits": {"best_prompt": "0" * len(examples), "selector": "1" * len(examples)}}

    dev, test = part(list(splits.collect), 8), part(list(splits.test), 4)
    assert {"positive", "negative"} <= set(dev["gold"])  # seed 3 puts both labels on dev
    (tmp_path / "per_query.json").write_text(json.dumps({"prompts": ["none", "pool:a", "pool:b"],
                                                         "splits": {"dev": dev, "test": test}}))
    (tmp_path / "results.json").write_text(json.dumps({"command": "pool_choice", "commit": "abc", "settings": settings}))
    monkeypatch.setattr(sys, "argv", ["label_router.py", str(tmp_path)])
    module.main()
    out = json.loads((tmp_path / "label_router.json").read_text())
    assert out["routes"] == {**{g: "pool:a" for g in dev["gold"] if g == "positive"},
                             **{g: "pool:b" for g in dev["gold"] if g == "negative"}}
    assert out["test_queries"] == 4 and out["test"]["best_prompt"]["n"] == 4  # the scored grid only
    assert out["test"]["gold_routes"]["accuracy"] == 1.0 and out["dev"]["gold_routes"] == 1.0
    assert out["noisy_routes"]["0.7"]["test"] == pytest.approx(0.7)
    assert out["test"]["label_router"]["accuracy"] == pytest.approx(out["classifier"]["test_accuracy"])
    assert "gold label → route (a bound)" in (tmp_path / "label_router.md").read_text()
    # --without-steering: routes only among the prompts the run did not find steering (pool:a steers here), so
    # positive queries, right on no other column, route to the first one ("none"), and only negatives are right.
    monkeypatch.setattr(sys, "argv", ["label_router.py", str(tmp_path), "--without-steering"])
    with pytest.raises(SystemExit, match="no pool_steering"):
        module.main()
    (tmp_path / "results.json").write_text(json.dumps({"command": "pool_choice", "commit": "abc", "settings": settings,
                                                       "pool_steering": {"pool:a": "positive"}}))
    module.main()
    plain = json.loads((tmp_path / "label_router_no_steering.json").read_text())
    assert plain["route_columns"] == 2 and set(plain["routes"].values()) == {"none", "pool:b"}
    test_golds = [g for qid, g in zip(test["ids"], test["gold"], strict=True) if qid in test["grid"]]
    assert plain["test"]["gold_routes"]["accuracy"] == pytest.approx(test_golds.count("negative") / 4)
    # --without-leaning: the run's pool_leaning (here pool:b leans too), its own files and report line; with no
    # pool_leaning recorded, or given with --without-steering, a clear error.
    monkeypatch.setattr(sys, "argv", ["label_router.py", str(tmp_path), "--without-leaning"])
    with pytest.raises(SystemExit, match="no pool_leaning"):
        module.main()
    monkeypatch.setattr(sys, "argv", ["label_router.py", str(tmp_path), "--without-leaning", "--without-steering"])
    with pytest.raises(SystemExit, match="give one of the two"):
        module.main()
    (tmp_path / "results.json").write_text(json.dumps({"command": "pool_choice", "commit": "abc", "settings": settings,
                                                       "pool_steering": {"pool:a": "positive"},
                                                       "pool_leaning": {"pool:a": "positive", "pool:b": "negative"}}))
    monkeypatch.setattr(sys, "argv", ["label_router.py", str(tmp_path), "--without-leaning"])
    module.main()
    unlean = json.loads((tmp_path / "label_router_no_leaning.json").read_text())
    assert unlean["without"] == "leaning" and unlean["route_columns"] == 1 and set(unlean["routes"].values()) == {"none"}
    assert unlean["test"]["gold_routes"]["accuracy"] == 0.0  # "none" is right on no query here
    assert "among the 1 that do not lean the target" in (tmp_path / "label_router_no_leaning.md").read_text()
    # --extra-train: more labelled train-pool queries for the classifier, disjoint from the run's splits.
    monkeypatch.setattr(sys, "argv", ["label_router.py", str(tmp_path), "--extra-train", "40"])
    module.main()
    extra = json.loads((tmp_path / "label_router_extra40.json").read_text())
    assert extra["train_queries"] == 100 and extra["routes"] == out["routes"]
    monkeypatch.setattr(sys, "argv", ["label_router.py", str(tmp_path), "--extra-train", "10000000"])
    with pytest.raises(SystemExit, match="--extra-train 10000000: .*only"):
        module.main()
    # The same with a linear probe of the real SmolLM2 policy base's hidden states: its own files, a layer and
    # an L2 chosen on dev, and the router still right exactly where its classifier is.
    monkeypatch.setattr(sys, "argv", ["label_router.py", str(tmp_path), "--features", "policy"])
    module.main()
    probe = json.loads((tmp_path / "label_router_policy.json").read_text())
    assert probe["classifier"]["kind"] == "policy" and probe["classifier"]["features"].startswith("policy base")
    assert len(probe["classifier"]["dev_accuracy_by_setting"]) == 4 * 3  # layers x L2 values, all on dev
    assert probe["test"]["label_router"]["accuracy"] == pytest.approx(probe["classifier"]["test_accuracy"])
    assert probe["routes"] == out["routes"] and (tmp_path / "label_router_policy.md").exists()


@pytest.mark.parametrize("kind", ["hidden", "values"])
def test_hidden_features_of_a_text_do_not_depend_on_its_batch(kind: str) -> None:
    import numpy
    import torch
    from _tiny_policy import load_tokenizer, tiny_model

    from qpo_bench.features import hidden_features

    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer)).eval()
    config = model.config
    width = config.hidden_size if kind == "hidden" else config.num_key_value_heads * (
        config.hidden_size // config.num_attention_heads)
    texts = ["a short one", "a much longer sentence that needs no padding at all in its batch"]
    for side in ("left", "right"):
        tokenizer.padding_side = side
        together = hidden_features(texts, model, tokenizer, (1, 2), kind=kind)
        alone = hidden_features(texts[:1], model, tokenizer, (1, 2), kind=kind)
        for layer in (1, 2):
            assert together[layer].shape == (2, width)
            numpy.testing.assert_allclose(together[layer][0], alone[layer][0], rtol=1e-4, atol=1e-5)
        # Read shortest first in batches of two, the rows come back in input order.
        mixed = [texts[1], texts[0], "a middling sentence here"]
        batched = hidden_features(mixed, model, tokenizer, (1, 2), batch_size=2, kind=kind)
        for i, text in enumerate(mixed):
            numpy.testing.assert_allclose(batched[2][i], hidden_features([text], model, tokenizer, (2,), kind=kind)[2][0],
                                          rtol=1e-4, atol=1e-5)
    if kind == "values":  # layer 2's values are its v_proj of the normalised hidden state leaving layer 1
        ids = tokenizer(texts[:1], return_tensors="pt")
        with torch.no_grad():
            entering = model(**ids, output_hidden_states=True).hidden_states[1]
            block = model.model.layers[1]
            expected = block.self_attn.v_proj(block.input_layernorm(entering)).mean(1)[0].numpy()
        numpy.testing.assert_allclose(alone[2][0], expected, rtol=1e-4, atol=1e-5)


def test_label_router_classifier_learns_separable_labels() -> None:
    spec = importlib.util.spec_from_file_location("qpo_label_router2", REPO / "benchmarks" / "label_router.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts = [f"{word} {i}" for i in range(30) for word in ("sunny bright", "rainy grey", "snowy cold")]
    x = text_features(texts, 256)
    y = [i % 3 for i in range(len(texts))]
    import numpy as np

    weights = module.fit_softmax(x, np.array(y), 3, l2=1e-4)
    assert list(module.predict(weights, x)) == y
    assert list(module.predict(weights, text_features(["rainy grey 99", "snowy cold 7"], 256))) == [1, 2]


def test_every_offline_recipe_is_a_valid_training_and_loop_config() -> None:
    """A typo in a recipe (a field name, a value out of range) fails here, not an hour into a benchmark run."""
    from qpo_bench.offline import RECIPES, TRAIN
    from qpo_middleware.training.config import LoopConfig, TrainConfig

    for name, spec in RECIPES.items():
        TrainConfig(**{**TRAIN, **spec["train"]})
        LoopConfig(**{"loops": 1, **spec["loops"]})
        if "from" in spec:
            assert spec["from"]["recipe"] in RECIPES, name
        if "after" in spec:  # continues a recipe's run with the same settings and more loops
            before = RECIPES[spec["after"]["recipe"]]
            assert spec["loops"]["loops"] > before["loops"].get("loops", 1) and spec["train"] == before["train"], name
            assert {k: v for k, v in spec["loops"].items() if k in before["loops"]} == before["loops"], name
    assert RECIPES["dpo_by_label"]["loops"]["preference_label_smoothing"] == 1.0
    with pytest.raises((TypeError, ValueError)):
        LoopConfig(loops=1, **{**RECIPES["dpo_by_label"]["loops"], "preference_label_smoothing": 1.5})


def test_choice_head_routes_separable_queries() -> None:
    """The head is the selector's model on other features: where one feature says which prompt is right, it
    sends every query the right prompt, on the fit queries and on new ones."""
    import numpy as np

    module = load_script("choice_head")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    x[:, 0] = np.sign(x[:, 0]) * (1 + np.abs(x[:, 0]))  # a margin around the boundary
    right = (x[:, 0] > 0).astype(int)  # prompt 1 is right where feature 0 is positive, prompt 0 elsewhere
    hits = np.stack([1 - right, right], axis=1).astype(float)
    counts = np.ones_like(hits)
    config = SelectorConfig(cv_folds=0, l2_prompt=1e-3)
    new = rng.normal(size=(20, 6))
    new[:, 0] = np.where(np.arange(20) % 2 == 0, 2.0, -2.0)
    _, (fit_picks, new_picks) = module.head_picks(x, hits, counts, config, [5, 7], x, new)
    assert fit_picks == [7 if r else 5 for r in right]  # grid columns, not D0's prompt order
    assert new_picks == [7 if i % 2 == 0 else 5 for i in range(20)]


def test_choice_head_on_real_sst2_and_the_real_policy_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_data: Path) -> None:
    """choice_head.py on a hand-built pool_choice folder over real sst2 splits, a real D0 file and the real
    SmolLM2 base's features: D0 says ``pool:b`` is right on every query and the others never, so whatever
    layer and L2 dev chooses, the head sends ``pool:b`` everywhere (the D0 prompt texts map to the right grid
    columns even when the pool lists them in another order) and is right on every fully scored test query."""
    from qpo_middleware.training.tasks import get_task

    module = load_script("choice_head")
    task = get_task("sst2")
    settings = {"task": "sst2", "seed": 3, "train_queries": 40, "dev_queries": 6, "test_queries": 5}
    splits = task.splits(real_data, seed=3, n_train=40, n_collect=6, n_test=5)
    texts = {"none": "", "pool:a": "Is this review positive?", "pool:b": "Answer with one word."}
    d0_dir = tmp_path / "runs" / "sst2-seed3" / "d0"
    d0_dir.mkdir(parents=True)
    OfflineDataset(d0_dir).append(
        Record(task="sst2", query_id=e.id, query=e.query, prompt=texts[src], prompt_source=src, loop=0,
               target="t", correct=src == "pool:b", reward=float(src == "pool:b"), prompt_mean_accuracy=0.0)
        for e in splits.train for src in ("pool:a", "none", "pool:b"))

    def part(examples: list[Any], scored: int, grid_row: str) -> dict[str, Any]:
        n = len(examples)
        return {"ids": [e.id for e in examples], "gold": [task.gold_text(e) for e in examples],
                "grid": {e.id: grid_row for e in examples[:scored]},
                "hits": {"best_prompt": "0" * n, "selector": "1" * n, "qpo_r_choose": "10" * (n // 2) + "1" * (n % 2)}}

    result_dir = tmp_path / "sst2-seed3"
    result_dir.mkdir()
    (result_dir / "per_query.json").write_text(json.dumps({"prompts": ["none", "pool:a", "pool:b"], "splits": {
        "dev": part(list(splits.collect), 6, "001"), "test": part(list(splits.test), 4, "001")}}))
    (result_dir / "results.json").write_text(json.dumps({
        "command": "pool_choice", "commit": "abc", "target": "t", "settings": settings,
        "pool": [{"source": s, "text": t} for s, t in reversed(texts.items())],
        "validation": {"chosen": "qpo_r_choose", "scores": {"best_prompt": 0.0, "selector": 1.0, "qpo_r_choose": 0.5}}}))
    monkeypatch.setattr(sys, "argv", ["choice_head.py", str(result_dir)])
    module.main()
    out = json.loads((result_dir / "choice_head.json").read_text())
    assert out["d0_queries"] == 40 and out["d0_records"] == 120 and out["test_queries"] == 4
    for head, prefix in (("head_hidden", "policy layer "), ("head_values", "policy values ")):
        settings_of = {k: v for k, v in out["dev_accuracy_by_setting"].items() if k.startswith(prefix)}
        assert len(settings_of) == 4 * 3  # layers x L2 values, all on dev
        assert out["chosen"][head] in settings_of and settings_of[out["chosen"][head]] == max(settings_of.values())
        assert out["dev"][head] == 1.0 and out["prompts_sent"][head] == {"pool:b": 4}
        assert out["test"][head]["accuracy"] == 1.0 and out["test"][head]["n"] == 4
    assert out["test"]["qpo"]["accuracy"] == 0.5  # the run's own row, cut to the scored grid
    assert "success head on attention values" in (result_dir / "choice_head.md").read_text()
    # A run that trained no recipe (pool_choice.py --recipes ''): the head is compared with the baselines alone.
    # The features here are a stand-in (plumbing only; the real base was read above).
    # Its D0 read from per_query.json (pool_choice.py keeps the verdicts there), the run's caches gone.
    results = json.loads((result_dir / "results.json").read_text())
    results["validation"]["chosen"] = None
    (result_dir / "results.json").write_text(json.dumps(results))
    per_query = json.loads((result_dir / "per_query.json").read_text())
    from qpo_bench.offline import d0_verdicts

    per_query["d0"] = d0_verdicts(OfflineDataset(d0_dir).loop(0), {"": 0, texts["pool:a"]: 1, texts["pool:b"]: 2})
    assert per_query["d0"]["columns"] == [1, 0, 2] and per_query["d0"]["hits"][0] == "001"
    (result_dir / "per_query.json").write_text(json.dumps(per_query))
    shutil.rmtree(tmp_path / "runs")
    monkeypatch.setattr(module, "policy_feature_sets", lambda *splits, kinds, **_: {
        f"{module.KINDS[kind]} 1": tuple(text_features(texts, 64) for texts in splits) for kind in kinds})
    monkeypatch.setattr(sys, "argv", ["choice_head.py", str(result_dir)])
    module.main()
    out = json.loads((result_dir / "choice_head.json").read_text())
    assert "qpo" not in out["test"] and out["qpo_row"] is None and out["test"]["head_values"]["accuracy"] == 1.0
    assert "trained no QPO recipe" in (result_dir / "choice_head.md").read_text()
    monkeypatch.setattr(sys, "argv", ["choice_head.py", str(result_dir), "--d0", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--d0"):
        module.main()


@pytest.mark.real
def test_steering_recheck_adds_the_checks_to_a_run_recorded_without_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_data: Path, smollm2_target: Any) -> None:
    """steering_recheck.py on a hand-built pool_choice folder over real sst2 splits whose dev grid holds the real
    SmolLM2's verdicts: "Negative or positive? ..." makes SmolLM2 answer negative on 7 of 8 (it answers the label
    named first), so it steers and leans; the QPO row sends it to the test queries its recorded scores pick, and
    without them takes ``best_prompt_dev``'s verdicts. A dev grid the target does not reproduce, or a row whose
    recorded verdicts its rederived picks do not reproduce, stops the script with the reason."""
    from qpo_middleware.training.targets import Pair
    from qpo_middleware.training.tasks import LEAN_REACH, get_task, steered_label

    module = load_script("steering_recheck")
    task = get_task("sst2")
    settings = {"task": "sst2", "seed": 6, "train_queries": 40, "dev_queries": 8, "test_queries": 4,
                "target": "smollm2-135m-instruct"}
    splits = task.splits(real_data, seed=6, n_train=40, n_collect=8, n_test=4)
    texts = {"none": "", "pool:steer": "Negative or positive? Reply with one word.",
             "pool:read": "Is this movie review positive or negative?"}
    dev = list(splits.collect)
    verdicts = smollm2_target.score(task, [Pair(e, t) for e in dev for t in texts.values()])
    grid = {e.id: "".join("1" if verdicts[3 * i + j].correct else "0" for j in range(3)) for i, e in enumerate(dev)}
    test = list(splits.test)
    test_grid = {e.id: ("0" if i % 2 else "1") + ("1" if task.gold_text(e) == "negative" else "0") + "1"
                 for i, e in enumerate(test)}  # made up: the script reads the target only on dev
    top = [[0.0, -1.0, -2.0], [0.0, -1.0, -2.0], [-3.0, 0.0, -1.0], [-3.0, -1.0, 0.0]]  # likelihood: none none steer read
    reference = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, -5.0, 0.0]]  # dpo_ratio: ... steer steer
    golds = [task.gold_text(e) for e in test]
    picks = {"qpo_x_likelihood": [0, 0, 1, 2], "qpo_x_dpo_ratio": [0, 0, 1, 1]}
    hits = {name: "".join(test_grid[e.id][j] for e, j in zip(test, cols, strict=True)) for name, cols in picks.items()}
    hits |= {"best_prompt": "".join(test_grid[e.id][0] for e in test), "best_prompt_dev": "".join(
        test_grid[e.id][0] for e in test), "qpo_x_choose": "1111", "selector": "0110"}  # none: all 8 dev right
    per_query = {"prompts": list(texts), "splits": {
        "dev": {"ids": [e.id for e in dev], "gold": [task.gold_text(e) for e in dev], "grid": grid, "hits": {}},
        "test": {"ids": [e.id for e in test], "gold": golds, "grid": test_grid, "hits": hits,
                 "policy_logps": {"x": {"top": top, "reference": reference}}}}}
    methods = {name: {"accuracy": bits.count("1") / 4} for name, bits in hits.items()}
    results = {"task": "sst2", "target": "hf:smollm2-135m-instruct", "commit": "abc", "settings": settings,
               "pool": [{"source": s, "text": t} for s, t in texts.items()], "d0": {"best_prompt": "none"},
               "best_prompt_dev": {"prompt": "none"}, "test": {"methods": methods}}
    result_dir = tmp_path / "sst2-seed6"
    result_dir.mkdir()
    (result_dir / "per_query.json").write_text(json.dumps(per_query))
    (result_dir / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(sys, "argv", ["steering_recheck.py", str(result_dir)])
    module.main()
    out = json.loads((result_dir / "checks.json").read_text())
    assert out["dev_verdicts_differing"] == 0
    assert out["pool_steering"]["pool:steer"] == out["pool_leaning"]["pool:steer"] == "negative"
    dev_golds = [task.gold_text(e) for e in dev]
    for j, source in enumerate(texts):  # the flags are those of the target's own answers
        answers = [verdicts[3 * i + j].prediction for i in range(len(dev))]
        assert out["pool_steering"].get(source) == steered_label(answers, dev_golds)
        assert out["pool_leaning"].get(source) == steered_label(answers, dev_golds, LEAN_REACH)
    fallback = [b == "1" for b in hits["best_prompt_dev"]]
    for kind, flags in (("steering", out["pool_steering"]), ("leaning", out["pool_leaning"])):
        for name, cols in picks.items():
            flagged = [list(texts)[j] in flags for j in cols]
            kept = [fallback[i] if flag else test_grid[e.id][j] == "1"
                    for i, (e, j, flag) in enumerate(zip(test, cols, flagged, strict=True))]
            assert out["test"][kind][name]["steered_share"] == statistics.fmean(flagged)
            assert out["test"][kind][name]["accuracy_without_steering"] == statistics.fmean(kept)
            assert out["test"][kind][name]["vs_selector_without_steering"]["diff"] == pytest.approx(
                statistics.fmean(kept) - 0.5)  # the selector's recorded verdicts: 2 of 4
    assert out["test"]["steering"]["qpo_x_dpo_ratio"]["steered_share"] >= 0.5  # it sends pool:steer twice
    assert "qpo_x_choose" in out["unchecked"]
    assert out["prompts_sent"]["qpo_x_likelihood"] == {"none": 2, "pool:steer": 1, "pool:read": 1}
    assert "| qpo_x_dpo_ratio |" in (result_dir / "checks.md").read_text()

    # seed_mean reads checks.json for a run whose results.json has no checks.
    monkeypatch.setattr(sys, "argv", ["seed_mean.py", str(result_dir), "--out", str(tmp_path / "mean"),
                                      "--methods", "qpo_x_likelihood"])
    no_gap = {"diff": 0.0, "ci95": [0.0, 0.0], "significant": False}
    rows = {n: {**m, "n": 4, "vs_best_prompt": no_gap, "vs_selector": no_gap} for n, m in methods.items()}
    (result_dir / "results.json").write_text(json.dumps({**results, "validation": {"chosen": "qpo_x_dpo_ratio"},
                                                         "test": {"methods": rows}}))
    load_script("seed_mean").main()
    mean = json.loads((tmp_path / "mean" / "seed_mean.json").read_text())
    assert mean["rechecked"] == [6]
    assert mean["methods"]["qpo_chosen"]["steered_share"] == out["test"]["steering"]["qpo_x_dpo_ratio"]["steered_share"]
    assert "from `steering_recheck.py`" in (tmp_path / "mean" / "seed_mean.md").read_text()

    # A row whose recorded verdicts the rederived picks do not reproduce; a dev grid the target does not reproduce.
    broken = {**hits, "qpo_x_likelihood": "".join("0" if b == "1" else "1" for b in hits["qpo_x_likelihood"])}
    per_query["splits"]["test"]["hits"] = broken
    (result_dir / "per_query.json").write_text(json.dumps(per_query))
    monkeypatch.setattr(sys, "argv", ["steering_recheck.py", str(result_dir)])
    with pytest.raises(SystemExit, match="qpo_x_likelihood's rederived picks do not reproduce"):
        module.main()
    per_query["splits"]["dev"]["grid"] = {q: "".join("0" if b == "1" else "1" for b in row) for q, row in grid.items()}
    (result_dir / "per_query.json").write_text(json.dumps(per_query))
    with pytest.raises(SystemExit, match="dev verdicts differ from the run's"):
        module.main()


def test_pool_ceiling_scores_new_prompts_on_the_real_target_and_leaves_leaky_prompts_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_data: Path) -> None:
    """pool_ceiling.py on a hand-built pool_choice folder over real sst2 splits: ``pool:a`` is right exactly on
    positive queries, ``pool:b`` never and the leaky ``pool:c`` ("...positive.") always. Leaving ``pool:c`` out, the
    pool's oracle and gold routes are the share of positive queries. A prompts file adds a sensible prompt (scored
    by the real SmolLM2 target), a duplicate and a leaky one (both dropped); the ceilings with it are recomputed
    here from its stored verdicts. ``--mutate`` sends the best dev prompts to the inducer (a scripted one: the
    real inducer is tested in test_induce.py) and keeps what mutation's filters keep."""
    from qpo_middleware.training.induce import Reply
    from qpo_middleware.training.tasks import get_task, resolve_prompts

    module = load_script("pool_ceiling")
    task = get_task("sst2")
    settings = {"task": "sst2", "seed": 6, "train_queries": 40, "dev_queries": 6, "test_queries": 5,
                "target": "smollm2-135m-instruct", "induce": 0}
    splits = task.splits(real_data, seed=6, n_train=40, n_collect=6, n_test=5)
    texts = {"none": "", "pool:a": "Read the review.", "pool:b": "Reply in French.", "pool:c": "The answer is positive."}

    def part(examples: list[Any], scored: int) -> dict[str, Any]:
        golds = [task.gold_text(e) for e in examples]
        grid = {e.id: "0" + ("1" if g == "positive" else "0") + "01" for e, g in zip(examples[:scored], golds,
                                                                                    strict=False)}
        return {"ids": [e.id for e in examples], "gold": golds, "grid": grid, "hits": {}}

    result_dir = tmp_path / "sst2-seed6"
    result_dir.mkdir()
    (result_dir / "per_query.json").write_text(json.dumps({"prompts": list(texts), "splits": {
        "dev": part(list(splits.collect), 6), "test": part(list(splits.test), 4)}}))
    (result_dir / "results.json").write_text(json.dumps({
        "task": "sst2", "target": "hf:smollm2-135m-instruct", "commit": "abc", "settings": settings,
        "pool": [{"source": s, "text": t} for s, t in texts.items()], "d0": {"best_prompt": "pool:a"}}))
    new = "Is this movie review positive or negative? Answer with one word."
    (tmp_path / "new.txt").write_text(f"{new}\n\nRead the review.\nSay positive.\n")
    monkeypatch.setattr(sys, "argv", ["pool_ceiling.py", str(result_dir), "--prompts-file", str(tmp_path / "new.txt")])
    module.main()
    out = json.loads((result_dir / "ceiling_new.json").read_text())
    assert [(c["text"], c["dropped"]) for c in out["candidates"]] == [
        (new, None), ("Read the review.", "duplicate"), ("Say positive.", "names_one_label")]
    assert out["leaky_pool_prompts"] == ["pool:c"] and out["queries"] == {"dev": 6, "test": 4}
    positive = [task.gold_text(e) == "positive" for e in splits.test[:4]]
    pool = out["ceilings"]["pool"]
    assert 0 < sum(positive) < 4  # seed 6 puts both labels on dev and on the scored test queries
    assert pool["prompts"] == 3 and pool["oracle"]["accuracy"] == pool["gold_routes"]["accuracy"] == sum(positive) / 4
    hits = [b == "1" for b in out["candidates"][0]["test_hits"]]
    assert len(out["candidates"][0]["dev_hits"]) == 6 and out["candidates"][0]["test_accuracy"] == sum(hits) / 4
    right = (out["candidates"][0]["dev_hits"] + out["candidates"][0]["test_hits"]).count("1")
    assert right >= 5, out["candidates"][0]  # SmolLM2 reads sentiment with a sensible prompt (about 70% on sst2)
    both = out["ceilings"]["pool_and_new"]
    assert both["prompts"] == 4 and both["oracle"]["accuracy"] == statistics.fmean(
        p or h for p, h in zip(positive, hits, strict=True))
    assert both["oracle"]["vs_best_prompt"]["diff"] == both["oracle"]["accuracy"] - sum(positive) / 4
    assert out["passes"] is (both["gold_routes"]["vs_best_prompt"]["diff"] > 0.07 and
                             both["oracle"]["vs_best_prompt"]["diff"] > 0.07)
    assert "Leaky pool prompts left out: pool:c" in (result_dir / "ceiling_new.md").read_text()
    assert ("pool_and_new_no_steering" in out["ceilings"]) is (out["candidates"][0]["steers"] is not None)
    grown = resolve_prompts(task, str(result_dir / "ceiling_new_pool.json"), include_empty=True)
    assert grown == [("none", ""), *((f"file:{s.split(':')[1]}", t) for s, t in texts.items() if t), ("file:file-0", new)]

    asked: list[str] = []

    def scripted(batch: list[list[dict[str, str]]], seed: int) -> list[Reply]:
        asked.extend(m[-1]["content"] for m in batch)
        steer = "Negative or positive? Reply with one word."  # SmolLM2 answers the label named first
        return [Reply(r) for r in (steer, "Say positive.", steer)]

    monkeypatch.setattr(module, "make_inducer", lambda spec: scripted)
    monkeypatch.setattr(sys, "argv", ["pool_ceiling.py", str(result_dir), "--mutate", "3", "--from-top", "2"])
    module.main()
    out = json.loads((result_dir / "ceiling_mutate.json").read_text())
    # The two best dev prompts (neither the leaky pool:c nor the empty prompt is varied), then the first again.
    assert [c["of"] for c in out["candidates"]] == ["pool:a", "pool:b", "pool:a"]
    assert [c["dropped"] for c in out["candidates"]] == [None, "names_one_label", "duplicate"]
    assert len(asked) == 3 and out["ceilings"]["pool_and_new"]["prompts"] == 4
    # It names both labels, so the wording check keeps it; the behavioural check sees it answer negative throughout.
    assert out["candidates"][0]["steers"] == "negative", out["candidates"][0]
    # The ceilings without steering prompts: the pool's none, a and b (c leaks), not the new one.
    assert out["ceilings"]["pool_and_new_no_steering"]["prompts"] == 3
    assert "| negative | Negative or positive?" in (result_dir / "ceiling_mutate.md").read_text()

    # --plain varies only pool prompts that do not steer: with pool:a marked as steering, pool:b alone, in turn.
    monkeypatch.setattr(sys, "argv", ["pool_ceiling.py", str(result_dir), "--mutate", "3", "--from-top", "2", "--plain",
                                      "--name", "plain"])
    with pytest.raises(SystemExit, match="needs the testbed's pool_steering"):
        module.main()
    results = json.loads((result_dir / "results.json").read_text())
    (result_dir / "results.json").write_text(json.dumps({**results, "pool_steering": {"pool:a": "positive"}}))
    asked.clear()
    module.main()
    out = json.loads((result_dir / "ceiling_plain.json").read_text())
    assert [c["of"] for c in out["candidates"]] == ["pool:b"] * 3 and len(asked) == 3
    assert all(texts["pool:b"] in request and texts["pool:a"] not in request for request in asked)
    assert out["ceilings"]["pool_no_steering"]["prompts"] == 2  # none and b: a steers, c leaks


def test_oirl_selector_on_the_real_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_data: Path) -> None:
    """oirl_selector.py on LLaMA-2's real GSM8K logs, small sizes. The head's features are a stand-in that
    carries each question's logged outcomes (plumbing: the real base's features are read in the choice_head
    test), so a head that sends each question a prompt its own row says was right must reach the oracle on
    test, which it only does if picks, outcome rows and questions line up. The best prompt's test accuracy is
    checked against the logs' own derived table, read here independently."""
    import csv

    import numpy as np

    from qpo_bench.offline import gsm8k_logs
    from qpo_middleware.training.oirl import BASE_ALIASES

    module = load_script("oirl_selector")

    train, test, texts, aliases = gsm8k_logs(tmp_path / "runs")
    outcome_of = {texts[i]: [float(row[p]) for p in sorted(row, key=lambda p: BASE_ALIASES.index(aliases[p]))]
                  for i, row in [*train.items(), *test.items()]}
    calls: list[int] = []

    def stand_in(*splits: list[str], **_: Any) -> dict[str, tuple[Any, ...]]:
        calls.append(len(splits))
        return {"layer 1": tuple(np.array([outcome_of[t] for t in split]) for split in splits)}

    monkeypatch.setattr(module, "policy_feature_sets", stand_in)
    assert module.sizes_of("all,300,120,300", 7000) == [120, 300, 7000]
    argv = ["oirl_selector.py", "--train-sizes", "120,200", "--dev-queries", "100", "--test-queries", "200",
            "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    out = json.loads((tmp_path / "results.json").read_text())
    assert [s["train_queries"] for s in out["sizes"]] == [120, 200] and out["settings"]["test_queries"] == 200
    with open(real_data / "prompt_oirl" / "derived" / "gsm8k_test_correctness.csv") as f:
        table = list(csv.DictReader(f))[:200]
    for size in out["sizes"]:
        rows = size["test"]
        assert rows["best_prompt"]["accuracy"] == statistics.fmean(int(r[size["best_prompt"]]) for r in table)
        assert rows["oracle"]["accuracy"] == statistics.fmean(max(int(r[a]) for a in BASE_ALIASES) for r in table)
        assert rows["head"]["accuracy"] == rows["oracle"]["accuracy"] > rows["best_prompt"]["accuracy"]
        assert rows["head"]["vs_best_prompt"]["significant"] and size["dev"]["head_chosen"].startswith("layer 1, ")
        assert sum(size["prompts_sent"]["selector"].values()) == 200
    assert (tmp_path / "oirl_selector.png").stat().st_size > 0 and "## 200 train questions" in (
        tmp_path / "report.md").read_text()
    # The features are read once and cached: a rerun does not read them again.
    module.main()
    assert calls == [3]
    for bad in ("120,x", "1", "7400"):
        monkeypatch.setattr(sys, "argv", [*argv[:2], bad, *argv[3:]])
        with pytest.raises(SystemExit, match="--train-sizes"):
            module.main()



def test_compare_runs_pairs_two_runs_queries_and_refuses_other_queries(tmp_path: Path) -> None:
    """compare_runs.py: a method of one run against a method of another, query by query, on the same queries."""
    compare_runs = load_script("compare_runs")

    def run(name: str, hits: dict[str, str], ids: list[str]) -> Path:
        folder = tmp_path / name / "ag_news-seed1"
        folder.mkdir(parents=True)
        split = {"ids": ids, "gold": ["A"] * len(ids), "hits": hits}
        (folder / "per_query.json").write_text(json.dumps({"splits": {"dev": split, "test": split}}))
        return folder

    ids = [f"q{i}" for i in range(8)]
    new = run("new", {"qpo_x_likelihood": "11111110", "best_prompt": "11000000", "selector": "11110000"}, ids)
    old = run("old", {"qpo_y_likelihood": "11110000"}, ids)
    rows = compare_runs.compare([(new, "qpo_x_likelihood"), (old, "qpo_y_likelihood")])
    assert rows["test"]["accuracy"] == 7 / 8
    assert rows["test"]["vs_old/qpo_y_likelihood"]["diff"] == pytest.approx(3 / 8)
    assert rows["test"]["vs_best_prompt"]["diff"] == pytest.approx(5 / 8)
    other = run("other", {"qpo_y_likelihood": "11110000"}, [f"r{i}" for i in range(8)])
    with pytest.raises(SystemExit, match="queries differ"):
        compare_runs.compare([(new, "qpo_x_likelihood"), (other, "qpo_y_likelihood")])
    with pytest.raises(SystemExit, match="no method 'qpo_z'"):
        compare_runs.compare([(new, "qpo_z"), (old, "qpo_y_likelihood")])


def test_verdicts_script_seeds_a_run_from_a_saved_file_or_another_run(tmp_path: Path) -> None:
    """verdicts.py / pool_choice --verdicts-from: a committed verdicts.jsonl.gz (or another run's directory) becomes
    a new run's score cache; a bad source exits naming the fix and leaves no cache behind."""
    from qpo_middleware.training.targets import Score, ScoreCache

    verdicts = load_script("verdicts")
    source = tmp_path / "source"
    cache = ScoreCache(source / "scores.sqlite")
    cache.put_many([(f"k{i}", Score(correct=i % 2 == 0, prediction="positive", label_nll=0.1 * i, tokens=9))
                    for i in range(5)])
    assert cache.dump(tmp_path / "verdicts.jsonl.gz") == 5
    for seed in (tmp_path / "verdicts.jsonl.gz", source):
        scores = tmp_path / f"from-{seed.name}" / "scores.sqlite"
        scores.parent.mkdir()
        assert verdicts.seed_cache(seed, scores) == 5
        seeded = ScoreCache(scores)
        assert seeded.get("k3") == Score(correct=False, prediction="positive", label_nll=0.1 * 3, tokens=9,
                                         cached=True)
        assert {p.name for p in scores.parent.iterdir()} <= {"scores.sqlite", "scores.sqlite-wal", "scores.sqlite-shm"}
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_text("not gzip")
    scores = tmp_path / "from-bad" / "scores.sqlite"
    scores.parent.mkdir()
    with pytest.raises(SystemExit, match="bad.jsonl.gz: not a gzipped verdict dump"):
        verdicts.seed_cache(bad, scores)
    with pytest.raises(SystemExit, match="no scores.sqlite there; pass a run directory or a verdicts.jsonl.gz"):
        verdicts.seed_cache(tmp_path / "nowhere", scores)
    assert list(scores.parent.iterdir()) == []


def test_label_scoring_batching_times_sorted_against_call_order_on_d0_pairs(
        tmp_path: Path, tiny_target_model: str, real_data: Path) -> None:
    """label_scoring.py --batching: D0's pairs (queries x 5 pool prompts) scored both ways, less padding sorted,
    the same answers either way."""
    label_scoring = load_script("label_scoring")
    out = tmp_path / "out"
    assert label_scoring.main(["--batching", "--tasks", "ag_news", "--targets", tiny_target_model, "--queries", "8",
                               "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["targets"][tiny_target_model]["ag_news"]
    assert row["pairs"] == 40 and row["predictions_differ"] == 0
    assert row["padded_tokens"]["length_sorted"] < row["padded_tokens"]["call_order"]
    assert (out / "pairs_per_second.png").stat().st_size > 0
    # --shared-prefix: the template's system turn runs once per batch; fewer tokens than the real ones, same answers
    assert label_scoring.main(["--shared-prefix", "--tasks", "tweet_emotion", "--targets", tiny_target_model,
                               "--queries", "8", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["targets"][tiny_target_model]["tweet_emotion"]
    assert row["switch"] == "share_prefix" and row["pairs"] == 40 and row["predictions_differ"] == 0
    assert row["padded_tokens"]["shared_prefix"] < row["real_tokens"] <= row["padded_tokens"]["whole_contexts"]
    assert row["max_abs_label_nll_difference"] < 1e-4
    with pytest.raises(SystemExit):
        label_scoring.main(["--batching", "--shared-prefix"])
