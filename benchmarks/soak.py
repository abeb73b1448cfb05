"""Concurrency soak (issue 7): N concurrent ``ainvoke`` calls through ``with_qpo`` on a real bundle.

Usage::

    python benchmarks/soak.py                     # 3 rounds x 500 concurrent calls, SmolLM2 int8 policy
    python benchmarks/soak.py --bundle DIR --calls 500 --rounds 3

The policy is a real SmolLM2-135M bundle (by default the untrained policy of
``benchmarks/latency.py``, exported to int8 under its work folder; ``--bundle`` takes any).
The chat model behind the rewriter echoes the user turn it receives, so every reply can be
checked against its own call: each query carries a unique tag, and its reply must hold that
query verbatim, no other call's tag, and the policy's prompt for it. The optimizer runs with
micro-batching (``RuntimeConfig(batch_window_ms=2, max_batch_size=32)``). Reports errors,
mismatched replies, rewrite statuses, latency percentiles, throughput, decode batches and the
process RSS after each round (bounded memory: the rounds after the first should not grow).
Writes ``benchmarks/results/soak.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


class EchoChat(BaseChatModel):
    """Replies with the text of the last message it was sent."""

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=messages[-1].text))])


def soak(bundle: Path, calls: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    from qpo_middleware import PromptOptimizer, RuntimeConfig
    from qpo_middleware.bench import current_rss_mb, peak_rss_mb
    from qpo_middleware.integrations.langchain import QPORewriter
    from qpo_middleware.stats import percentiles
    from qpo_middleware.training.tasks import get_task

    sentences = [e.query for e in get_task("sst2_sample").splits(None, seed=seed, n_train=0, n_collect=0,
                                                                  n_test=100).test]
    config = RuntimeConfig(provider="cpu", batch_window_ms=2, max_batch_size=32, max_queue=4096)
    optimizer = PromptOptimizer.from_bundle(bundle, config=config)
    rewriter = QPORewriter(optimizer=optimizer)
    chain = rewriter | EchoChat()  # what with_qpo(EchoChat(), optimizer) builds
    rss = {"after_load_mb": current_rss_mb()}
    out: dict[str, Any] = {"bundle": str(bundle), "calls_per_round": calls, "rounds": [],
                           "config": config.to_dict()}

    async def one(query: str) -> tuple[str, float, BaseException | None]:
        start = time.perf_counter()
        try:
            reply = await chain.ainvoke(query)
            return str(reply.content), (time.perf_counter() - start) * 1000, None
        except BaseException as error:  # noqa: BLE001 - counted, never lost
            return "", (time.perf_counter() - start) * 1000, error

    for round_index in range(rounds):
        queries = [f"[#{round_index}-{i}] {sentences[i % len(sentences)]}" for i in range(calls)]
        before = optimizer.stats()
        start = time.perf_counter()

        async def main(queries: list[str] = queries) -> list[tuple[str, float, BaseException | None]]:
            return await asyncio.gather(*(one(q) for q in queries))

        results = asyncio.run(main())
        wall = time.perf_counter() - start
        after = optimizer.stats()
        errors = [repr(e) for _, _, e in results if e is not None]
        mismatched = 0
        tags = [q.split("]", 1)[0] + "]" for q in queries]
        for query, tag, (reply, _, error) in zip(queries, tags, results, strict=True):
            if error is not None:
                continue
            others = [t for t in tags if t != tag and t + " " in reply]
            if not reply.endswith(query) or others:
                mismatched += 1
        # The prompt each call got, as the rewriter reported it in the reply (what precedes the query).
        prompts = [reply[: -len(query)].strip() if reply.endswith(query) else None
                   for query, (reply, _, _) in zip(queries, results, strict=True)]
        round_out = {
            "round": round_index + 1, "calls": calls, "errors": len(errors), "error_examples": errors[:3],
            "mismatched_replies": mismatched, "with_prompt": sum(bool(p) for p in prompts),
            "wall_s": wall, "calls_per_s": calls / wall,
            "latency_ms": percentiles([ms for _, ms, _ in results]),
            "decode_batches": after["batches"] - before["batches"],
            "rss_after_mb": current_rss_mb(),
        }
        out["rounds"].append(round_out)
        print(json.dumps({k: v for k, v in round_out.items() if k != "latency_ms"}), flush=True)
    rss["peak_mb"] = peak_rss_mb()
    out["rss"] = rss
    out["totals"] = {
        "calls": calls * rounds,
        "errors": sum(r["errors"] for r in out["rounds"]),
        "mismatched_replies": sum(r["mismatched_replies"] for r in out["rounds"]),
        "rss_growth_after_round_1_mb": out["rounds"][-1]["rss_after_mb"] - out["rounds"][0]["rss_after_mb"],
    }
    out["rewriter_stats"] = dict(rewriter.stats)
    optimizer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="Bundle (default: the latency benchmark's int8 policy).")
    parser.add_argument("--calls", type=int, default=500, help="Concurrent ainvoke calls per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds (memory must not grow after the first).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    args = parser.parse_args(argv)
    bundle = args.bundle
    if bundle is None:
        from latency import DEFAULT_OUT, prepare_bundles, prepare_policy

        work = DEFAULT_OUT / "work"
        work.mkdir(parents=True, exist_ok=True)
        bundle = prepare_bundles(prepare_policy(None, work), work)["int8"]
    result = soak(bundle, args.calls, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["totals"], indent=1))
    return 0 if result["totals"]["errors"] == 0 and result["totals"]["mismatched_replies"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
