"""An async server-style loop: requests arrive on a queue, workers answer them with ainvoke.

The policy decodes in a worker thread, so the event loop stays responsive: a
heartbeat task measures how late the loop wakes it (loop lag). A latency budget
keeps the policy from holding a request back; on overrun the query goes to the
chat model unchanged (fail-open) and the request is counted as passed through.

    python examples/async_server.py --bundle runs/quickstart/bundle [--budget-ms 500] [--chat echo]
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from _chat import REVIEWS, make_chat, parser
from langchain_core.callbacks import AsyncCallbackHandler

from qpo_middleware.integrations.langchain import QPO_EVENT, with_qpo


class StatusCounter(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.status: dict[str, int] = {}

    async def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == QPO_EVENT:
            status = str(data["qpo_status"])  # a qpo_middleware.Status (a StrEnum), or "error"
            self.status[status] = self.status.get(status, 0) + 1


async def heartbeat(lags: list[float], stop: asyncio.Event, period: float = 0.01) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - start - period)


async def serve(chain: Any, requests: int, workers: int, rate: float) -> None:
    queue: asyncio.Queue[tuple[int, str, float] | None] = asyncio.Queue()
    latencies: list[float] = []
    counter = StatusCounter()

    async def worker() -> None:
        while (item := await queue.get()) is not None:
            number, query, arrived = item
            reply = await chain.ainvoke(query, {"callbacks": [counter]})
            latencies.append(time.perf_counter() - arrived)
            print(f"#{number:02d} {time.perf_counter() - arrived:6.2f} s  {reply.content.strip()[:70]!r}")

    lags: list[float] = []
    stop = asyncio.Event()
    beat = asyncio.create_task(heartbeat(lags, stop))
    pool = [asyncio.create_task(worker()) for _ in range(workers)]
    rng = random.Random(0)
    for number in range(requests):  # requests arrive at random times (Poisson, `rate` per second)
        await queue.put(
            (number, f"Is this review positive or negative? {rng.choice(REVIEWS)}", time.perf_counter())
        )
        await asyncio.sleep(rng.expovariate(rate))
    for _ in pool:
        await queue.put(None)
    await asyncio.gather(*pool)
    stop.set()
    await beat
    print(
        f"{requests} requests: median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s; "
        f"policy: {counter.status}; event-loop lag max {max(lags) * 1000:.0f} ms"
    )


def main() -> None:
    args = parser(__doc__.splitlines()[0], max_new_tokens=8)
    args.add_argument("--requests", type=int, default=12)
    args.add_argument("--workers", type=int, default=3)
    args.add_argument("--rate", type=float, default=4.0, help="mean requests per second")
    args.add_argument("--budget-ms", type=float, default=None, help="policy latency budget (fail-open)")
    args = args.parse_args()
    chain = with_qpo(make_chat(args.chat, args.max_new_tokens), args.bundle, latency_budget_ms=args.budget_ms)
    asyncio.run(serve(chain, args.requests, args.workers, args.rate))


if __name__ == "__main__":
    main()
