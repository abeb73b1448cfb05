"""The real-model check that a target reads prompts, shared by the SmolLM2 and Qwen target tests."""

from __future__ import annotations

from pathlib import Path

# The cached-context path and the full-sequence reference run different float32 kernels (KV cache vs one pass),
# whose rounding depends on the CPU: up to 1.1e-4 was seen on CI's CPU for Qwen, so 1e-4 was flaky. 1e-3 is still
# a thousandth of a nat: a wrong position id, an attended pad or a dropped label token changes what the model reads.
LABEL_SCORING_TOL = 1e-3


def sensible_vs_nonsense(target, data: Path) -> dict[str, tuple[float, float]]:
    """(accuracy, mean gold NLL) of ``target`` on 40 SST-2 dev sentences with a sensible prompt (the pool's
    role-critic) and with a nonsense one: the real-model check that a target reads prompts."""
    from qpo_middleware.training.targets import Pair
    from qpo_middleware.training.tasks import _sentence_label_tsv, get_task

    task = get_task("sst2")
    dev = _sentence_label_tsv(data / "sst2" / "dev.tsv", "sst2-dev")[:40]
    sensible = next(p["text"] for p in task.prompt_pool() if p["id"] == "role-critic")
    results = {}
    for name, prompt in (("sensible", sensible), ("nonsense", "Xylophone purple banana seventeen.")):
        scores = target.score(task, [Pair(e, prompt) for e in dev])
        results[name] = (sum(s.correct for s in scores) / 40, sum(s.gold_nll for s in scores) / 40)
    return results


def label_scoring_gap(target, data: Path | None, task_name: str = "tweet_emotion", n: int = 12) -> float:
    """Largest difference between ``target``'s label log-probs (shared context, cached) and the full-sequence
    reference, over ``n`` real queries of a task with multi-token labels, batched with contexts of different
    lengths (left padding) under three prompts."""
    from qpo_bench.label_scoring import full_sequence_label_logprobs
    from qpo_middleware.training.targets import Pair
    from qpo_middleware.training.tasks import get_task

    task = get_task(task_name)
    examples = task.splits(data, seed=0, n_train=n, n_collect=0, n_test=0).train
    prompts = ["", "Which emotion does this tweet express?",
               "Read the tweet carefully, then name the one emotion it shows most strongly."]
    pairs = [Pair(e, prompts[i % len(prompts)]) for i, e in enumerate(examples)]
    contexts = [target.tokenizer(target.context_text(task, p), add_special_tokens=False).input_ids for p in pairs]
    label_ids = target.label_token_ids(task)
    assert len({len(c) for c in contexts}) > 1 and any(len(ids) > 1 for ids in label_ids)
    shared = target._label_logprobs(contexts, label_ids)
    reference = full_sequence_label_logprobs(target, contexts, label_ids)
    return float((shared - reference).abs().max())


def sorted_batching(target, data: Path | None, task_name: str = "tweet_emotion", n: int = 12,
                    batch_size: int = 4) -> dict[str, tuple[list, int]]:
    """``target``'s scores of ``n`` real queries under three prompts of different lengths, batched
    ``batch_size`` at a time shortest context first (``sorted``) and in call order (``call_order``), with the
    padded tokens each way fed to the model. ``target`` is used with its model as loaded, not changed."""
    from qpo_middleware.training.hf_target import HFTarget
    from qpo_middleware.training.targets import Pair
    from qpo_middleware.training.tasks import get_task

    task = get_task(task_name)
    examples = task.splits(data, seed=0, n_train=n, n_collect=0, n_test=0).train
    prompts = ["", "Which emotion does this tweet express?",
               "Read the tweet carefully, then name the one emotion it shows most strongly."]
    pairs = [Pair(e, prompts[i % len(prompts)]) for i, e in enumerate(examples)]
    out = {}
    for name, sort in (("sorted", True), ("call_order", False)):
        probe = HFTarget(model=target.model, batch_size=batch_size, sort_by_length=sort)
        probe._lm, probe._tok = target._lm, target.tokenizer
        padded = 0
        inner = probe._label_logprobs

        def counted(contexts, label_ids, inner=inner):  # noqa: ANN001, ANN202
            nonlocal padded
            padded += len(contexts) * max(map(len, contexts))
            return inner(contexts, label_ids)

        probe._label_logprobs = counted
        out[name] = (probe.score(task, pairs), padded)
    return out
