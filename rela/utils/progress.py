"""Progress and logs on rank 0 only: a bar with rate and ETA, one-line messages, metrics.jsonl."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm


class Progress:
    """A tqdm bar on rank 0 (rate and ETA); silent elsewhere."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class RunLog:
    """Messages to stderr and metrics lines to metrics.jsonl, from rank 0 only."""

    def __init__(self, run_dir: Path | None, enabled: bool):
        self.enabled = enabled
        self.metrics_path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.start = time.time()

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(f"[rela {time.time() - self.start:7.1f}s] {message}", file=sys.stderr)

    def metrics(self, record: dict) -> None:
        if self.enabled and self.metrics_path is not None:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
