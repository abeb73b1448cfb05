"""Import of the Prompt-OIRL logs, checked on the real files of the data collection."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from qpo_middleware.cli.import_oirl import command
from qpo_middleware.template import Template
from qpo_middleware.training.config import RewardConfig
from qpo_middleware.training.dataset import OfflineDataset
from qpo_middleware.training.oirl import OIRL_TEMPLATE, OirlImportError, import_prompt_oirl
from qpo_middleware.training.run import ImportedLogs, RunPaths
from qpo_middleware.training.tasks import get_task

DATA = Path(os.environ.get("QPO_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = pytest.mark.skipif(
    not (DATA / "prompt_oirl" / "derived").is_dir(),
    reason=f"Prompt-OIRL data not found at {DATA} (set QPO_DATA)",
)

BASE = ("nan", "CoT", "APE", "Dis", "ToT", "Decomp")
# SOURCE.md, "Accuracy of each log file": llama_gsm8k_test_corr_<alias>.txt
GSM8K_TEST_ACCURACY = {"nan": 0.248, "CoT": 0.240, "APE": 0.246, "Dis": 0.071, "ToT": 0.069, "Decomp": 0.237}


@pytest.fixture(scope="module")
def prompt_texts() -> dict[str, str]:
    items = json.loads((DATA / "prompt_oirl" / "prompts.json").read_text(encoding="utf-8"))["prompts"]
    return {p["alias"]: p["text"] for p in items}


@pytest.fixture(scope="module")
def gsm8k_test(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gsm8k_test")
    return out, import_prompt_oirl(DATA, "gsm8k", out, split="test")


def test_gsm8k_train_sample(tmp_path: Path, prompt_texts: dict[str, str]) -> None:
    summary = import_prompt_oirl(DATA, "gsm8k", tmp_path, split="train", max_queries=200, seed=3)
    records = OfflineDataset(tmp_path).records
    assert summary.queries == 200 and summary.prompts == list(BASE)
    assert summary.records_written == len(records) == 6 * 200
    assert Counter(r.prompt_source for r in records) == {f"oirl:{a}": 200 for a in BASE}
    assert {r.prompt for r in records} == {prompt_texts[a] for a in BASE}
    # GSM8K questions had "\n" appended before the prompt; the other datasets are plain suffixes.
    assert summary.template == Template(placement="after", separator="\n") != OIRL_TEMPLATE
    logs = ImportedLogs.read(RunPaths(tmp_path))
    assert (logs.task, logs.target, logs.template) == ("gsm8k", "oirl:llama-2-7b-chat", summary.template)

    # Ids and query texts are those of our gsm8k task; labels are the gold numbers.
    train, _ = get_task("gsm8k").loader(DATA)
    by_id = {e.id: e for e in train}
    for record in records:
        assert record.task == "gsm8k" and record.loop == 0 and record.target == "oirl:llama-2-7b-chat"
        example = by_id[record.query_id]
        assert record.query == example.query and not record.query.endswith("\n")
        assert float(record.label) == example.answer
        assert record.gold_nll is None
        assert record.reward == pytest.approx(
            RewardConfig().reward(record.correct, record.prompt_mean_accuracy, None)
        )
        alias = record.prompt_source.removeprefix("oirl:")
        assert record.prompt_mean_accuracy == pytest.approx(summary.accuracy[alias])

    # The sample is deterministic in the seed, and another seed picks other queries.
    again = import_prompt_oirl(DATA, "gsm8k", tmp_path / "again", split="train", max_queries=200, seed=3)
    import_prompt_oirl(DATA, "gsm8k", tmp_path / "other", split="train", max_queries=200, seed=4)
    ids = {r.query_id for r in records}
    assert {r.query_id for r in OfflineDataset(tmp_path / "again")} == ids
    assert {r.query_id for r in OfflineDataset(tmp_path / "other")} != ids
    assert again.accuracy == summary.accuracy


def test_gsm8k_test_matches_published_numbers(gsm8k_test) -> None:
    out, summary = gsm8k_test
    assert summary.queries == 1000 and summary.records_written == 6000
    for alias, expected in GSM8K_TEST_ACCURACY.items():
        assert summary.accuracy[alias] == pytest.approx(expected, abs=0.001), alias
    # METHOD.md: best single training prompt 24.8%, per-query oracle over the 6 prompts 50.1% (GSM8K test).
    assert summary.best_prompt == "nan" and summary.best_accuracy == pytest.approx(0.248, abs=0.001)
    assert summary.oracle_accuracy == pytest.approx(0.501, abs=0.001)
    ids = {r.query_id for r in OfflineDataset(out)}
    assert ids == {f"gsm8k-test-{i}" for i in range(1, 1001)}


def test_reimport_writes_nothing(gsm8k_test) -> None:
    out, first = gsm8k_test
    again = import_prompt_oirl(DATA, "gsm8k", out, split="test")
    assert again.records_written == 0 and again.dataset_records == first.dataset_records == 6000
    assert len(OfflineDataset(out)) == 6000


def test_gsm8k_all_prompts_on_test(tmp_path: Path) -> None:
    summary = import_prompt_oirl(DATA, "gsm8k", tmp_path, split="test", prompts="all", max_queries=50)
    assert len(summary.prompts) == 16 and summary.records_written == 16 * 50
    # The GPT-4 prompts never ran on GSM8K train questions: "all" there means the 6 base prompts.
    train = import_prompt_oirl(
        DATA, "gsm8k", tmp_path / "train", split="train", prompts="all", max_queries=50
    )
    assert train.prompts == list(BASE)


def test_svamp_split_by_question(tmp_path: Path) -> None:
    train = import_prompt_oirl(DATA, "svamp", tmp_path / "train", split="train")
    test = import_prompt_oirl(DATA, "svamp", tmp_path / "test", split="test")
    train_records = OfflineDataset(tmp_path / "train").records
    test_records = OfflineDataset(tmp_path / "test").records
    train_ids = {r.query_id for r in train_records}
    test_ids = {r.query_id for r in test_records}
    assert train_ids and test_ids and not train_ids & test_ids
    assert len(train_ids) == train.queries and len(test_ids) == test.queries
    assert train.queries + test.queries == 3961  # SOURCE.md: 3,961 distinct svamp questions
    assert not {r.query for r in train_records} & {r.query for r in test_records}
    for record in train_records[:60] + test_records[:60]:
        assert record.task == "oirl_svamp" and record.query_id.startswith("oirl-svamp-q")
        assert record.correct == (record.extra["p_correct"] >= 0.5)
        assert record.extra["n"] >= 1
    assert {r.extra["split"] for r in train_records} == {"train"}
    assert max(r.extra["n"] for r in test_records) > 1  # repeated occurrences are averaged


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "asdiv"}, "gsm8k, svamp, mawps"),
        ({"prompts": "gpt4"}, "'base'"),
        ({"split": "dev"}, "train, test or all"),
        ({"max_queries": 0}, "max_queries"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"dataset": "gsm8k", **kwargs}
    dataset = str(args.pop("dataset"))
    with pytest.raises(OirlImportError, match=message):
        import_prompt_oirl(DATA, dataset, tmp_path, **args)  # type: ignore[arg-type]


def test_missing_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OirlImportError, match="QPO_DATA"):
        import_prompt_oirl(tmp_path / "nowhere", "gsm8k", tmp_path / "out")
    with pytest.raises(OirlImportError, match="prompt_oirl/derived"):
        import_prompt_oirl(tmp_path, "gsm8k", tmp_path / "out")
    monkeypatch.delenv("QPO_DATA", raising=False)
    with pytest.raises(OirlImportError, match="--data-dir"):
        import_prompt_oirl(None, "gsm8k", tmp_path / "out")


def test_cli(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(command)
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        app,
        [
            "--data-dir",
            str(DATA),
            "--dataset",
            "mawps",
            "--split",
            "test",
            "--max-queries",
            "30",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "per-query oracle" in result.output and "oirl:nan" in result.output
    assert len(OfflineDataset(out)) == 6 * 30
    bad = runner.invoke(app, ["--data-dir", str(DATA), "--dataset", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "Unknown Prompt-OIRL dataset" in bad.output


def test_train_loop_1_on_imported_logs(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An imported D0 trains like a collected one (loop 1); later loops need a target and are refused."""
    from _tiny_policy import save_tiny_checkpoint

    from qpo_middleware.training.config import LoopConfig, TrainConfig
    from qpo_middleware.training.export import read_policy_meta
    from qpo_middleware.training.loops import run_loops

    base = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    summary = import_prompt_oirl(DATA, "gsm8k", tmp_path, split="train", max_queries=6, seed=1)
    train = TrainConfig(epochs=1, batch_size=8, num_buckets=4, prompt_max_tokens=8, query_max_tokens=16,
                        conditioning="query_rank", device="cpu")
    with pytest.raises(ValueError, match="--loops 1"):
        run_loops(tmp_path, train, LoopConfig(loops=2, base_model=base))
    metrics = run_loops(tmp_path, train, LoopConfig(loops=1, base_model=base, d0_floor_quantile=0.0, preference="off"))
    assert [m.loop for m in metrics] == [1] and metrics[0].target_calls == 0
    assert metrics[0].train_records == 6 * 6 == summary.records_written
    assert metrics[0].greedy_accuracy_collect is None  # no target, no collect split
    meta = read_policy_meta(RunPaths(tmp_path).checkpoint(1))
    assert (meta.task, meta.template) == ("gsm8k", summary.template)
