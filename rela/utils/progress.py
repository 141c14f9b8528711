"""Progress and logs on rank 0 only: a bar with rate and ETA, one-line messages, metrics.jsonl."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from rela.utils.checkpoint import atomic_write_bytes


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

    def trim_metrics(self, after_step: int) -> None:
        """Drops rows past `after_step` (logged after the checkpoint a run resumes from), atomically."""
        if self.metrics_path is None or not self.metrics_path.is_file():
            return
        rows = self.metrics_path.read_text().splitlines()
        kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= after_step]
        if len(kept) != len(rows):
            atomic_write_bytes(self.metrics_path, "".join(r + "\n" for r in kept).encode())

    def metrics(self, record: dict) -> None:
        if self.enabled and self.metrics_path is not None:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
