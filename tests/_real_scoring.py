"""The real-model check that a target reads prompts, shared by the SmolLM2 and Qwen target tests."""

from __future__ import annotations

from pathlib import Path


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
