"""A batch of 100 queries: one batched policy decode, then the chat model's own batching.

Compares QPORewriter.batch (one left-padded batched decode) with 100 single
invoke calls, then answers all 100 through ``with_qpo(...).batch``.

    python examples/batch_100.py --bundle runs/quickstart/bundle [--queries FILE] [--chat echo]

``--queries`` reads one query per line (the first tab-separated column, so the
SST-2 ``dev.tsv`` works); without it, 100 queries are made from built-in reviews.
"""

from __future__ import annotations

import time
from pathlib import Path

from _chat import REVIEWS, make_chat, parser
from langchain_core.output_parsers import StrOutputParser

from qpo_middleware.integrations.langchain import QPORewriter

FRAMES = [
    "{review}",
    "Review: {review}\nIs this review positive or negative?",
    "Classify the sentiment of this movie review: {review}",
    "What does the reviewer think? {review}",
    "{review}\nSentiment:",
]


def load_queries(path: str | None, n: int = 100) -> list[str]:
    if path is None:
        return [frame.format(review=review) for frame in FRAMES for review in REVIEWS][:n]
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t")[0].strip() for line in lines]
    rows = [row for row in rows if row and row != "sentence"]  # skip blanks and a TSV header
    return rows[:n]


def main() -> None:
    args = parser(__doc__.splitlines()[0], max_new_tokens=8)
    args.add_argument("--queries", help="file with one query per line (first tab-separated column)")
    args = args.parse_args()
    queries = load_queries(args.queries)
    rewriter = QPORewriter(bundle=args.bundle)

    start = time.perf_counter()
    batched = rewriter.batch(queries)
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    one_by_one = [rewriter.invoke(q) for q in queries]
    single_s = time.perf_counter() - start
    same = sum(a == b for a, b in zip(batched, one_by_one, strict=True))
    print(f"{len(queries)} queries: batch {batch_s:.2f} s, one by one {single_s:.2f} s; {same} identical")

    chain = rewriter | make_chat(args.chat, args.max_new_tokens) | StrOutputParser()
    start = time.perf_counter()
    answers = chain.batch(queries, {"max_concurrency": 4})
    print(f"answered {len(answers)} in {time.perf_counter() - start:.1f} s; first three:")
    for query, answer in list(zip(queries, answers, strict=True))[:3]:
        print(f"  {query[:60]!r} -> {answer.strip()[:60]!r}")
    print("rewriter stats:", rewriter.stats)


if __name__ == "__main__":
    main()
