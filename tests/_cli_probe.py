"""Run the real ``qpo`` CLI with a call counter on the local (Hugging Face) target.

``python tests/_cli_probe.py collect ...`` behaves exactly like ``qpo collect ...``,
except that before every forward batch the target appends the batch's pair count
(one line) to the file named by ``$QPO_CALL_LOG``, and then sleeps
``$QPO_CALL_DELAY`` seconds (default 0). The line is written with ``os.write`` on an
``O_APPEND`` descriptor, so it survives a SIGKILL of this process; the crash-resume
tests read it to count the target calls that an attempt paid for before it was killed.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def install_counter(log_path: str, delay: float) -> None:
    from qpo_middleware.training.hf_target import HFTarget

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def counted(method: Any) -> Any:
        def wrapper(self: HFTarget, task: Any, pairs: list[Any], progress: Any) -> list[Any]:
            out = []
            for start in range(0, len(pairs), self.batch_size):  # one original call per forward batch
                batch = pairs[start : start + self.batch_size]
                os.write(fd, f"{len(batch)}\n".encode())
                if delay:
                    time.sleep(delay)
                out.extend(method(self, task, batch, progress))
            return out

        return wrapper

    HFTarget._score_labels = counted(HFTarget._score_labels)  # type: ignore[method-assign]
    HFTarget._score_generation = counted(HFTarget._score_generation)  # type: ignore[method-assign]


def main() -> None:
    from qpo_middleware.cli import app

    if os.environ.get("QPO_CALL_LOG"):
        install_counter(os.environ["QPO_CALL_LOG"], float(os.environ.get("QPO_CALL_DELAY", "0")))
    app(sys.argv[1:], prog_name="qpo")


if __name__ == "__main__":
    main()
