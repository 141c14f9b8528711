"""Progress and logs on rank 0 only: a bar with rate and ETA, one-line messages, metrics.jsonl (always) and,
with --logger tensorboard, the same rows as TensorBoard scalars (rela/utils/tensorboard.py)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from rela.errors import RelaError
from rela.utils.files import atomic_write_bytes, write_errors_named


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
    """Messages to stderr and metrics rows to metrics.jsonl, from rank 0 only; each row also goes to the
    other sinks `loggers` names ("tensorboard": RUN/tensorboard/ events)."""

    def __init__(self, run_dir: Path | None, enabled: bool, loggers: str = "jsonl"):
        self.enabled = enabled
        self.metrics_path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.start = time.time()
        self.sinks = []
        if "tensorboard" in parse_loggers(loggers):
            from rela.utils.tensorboard import TensorBoardSink, require_tensorboard

            require_tensorboard()  # on every rank, so that all stop alike
            if enabled and run_dir is not None:
                self.sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard", start_time=self.start))

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.write(f"[rela {time.time() - self.start:7.1f}s] {message}", file=sys.stderr)

    def trim_metrics(self, after_step: int) -> None:
        """Drops rows past `after_step` (logged after the checkpoint a run resumes from; -1: every row, for a
        fresh start), atomically. A torn last row (a process killed mid-write) is dropped with a warning."""
        if self.metrics_path is None or not self.metrics_path.is_file():
            return
        rows = self.metrics_path.read_bytes().decode(errors="replace").splitlines()
        kept = []
        for number, row in enumerate(rows, 1):
            if not row.strip():
                continue
            try:
                record = json.loads(row)
            except ValueError:
                if number < len(rows):
                    raise RelaError(f"{self.metrics_path}: line {number} is not a JSON row ({row[:80]!r}); "
                                    "remove it to resume") from None
                self.info(f"warning: {self.metrics_path}: its last line is torn (a process killed while writing "
                          f"it): dropped ({row[:80]!r})")
                continue
            if isinstance(record, dict) and record.get("step", 0) <= after_step:
                kept.append(row)
        if len(kept) != len(rows):
            atomic_write_bytes(self.metrics_path, "".join(r + "\n" for r in kept).encode())
        for sink in self.sinks:
            sink.purge_after(after_step)

    def metrics(self, record: dict) -> None:
        if self.enabled and self.metrics_path is not None:
            with write_errors_named(self.metrics_path), open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


LOGGERS = ("jsonl", "tensorboard")


def parse_loggers(value: str) -> list[str]:
    """--logger's comma list: 'jsonl', 'tensorboard' or 'jsonl,tensorboard' (metrics.jsonl is always written:
    the summary, curves.png and resumes read it)."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in LOGGERS]
    if unknown or not names:
        raise RelaError(f"--logger takes a comma list of {', '.join(LOGGERS)}; got {value!r}")
    return names
