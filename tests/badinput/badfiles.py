"""Builders for the bad-input tests: image files in every PIL mode, files that do not decode, and one trainer
run that reports how it ended (a plain module: the tests of tests/badinput/ import it)."""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builders import FAST_ARGS

IMAGEFOLDER_ARGS = [*FAST_ARGS, "--dataset", "imagefolder", "--budget", "1.0", "--batch-size", "4",
                    "--val-fraction", "0.25", "--probe-epochs", "2"]


def shown(path) -> str:
    """How a message shows a file name: odd bytes of a non-UTF-8 name as \\x escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class Outcome:
    code: int
    err: str
    summary: dict | None

    @property
    def error_line(self) -> str:
        """The one `rela.train: error:` line; the test fails if there is none, several, or a traceback."""
        lines = [line for line in self.err.splitlines() if line.startswith("rela.train: error:")]
        assert self.code == 1 and len(lines) == 1 and "Traceback" not in self.err, (self.code, self.err[-3000:])
        assert self.err.rstrip().endswith(lines[0]), self.err[-3000:]
        return lines[0]


def run_trainer(capsys, tmp_path: Path, *args: str, name: str = "run") -> Outcome:
    from rela.train import main

    out = tmp_path / name
    code = main([*args, "--out", str(out), "--bank-dir", str(tmp_path / "banks")])
    err = capsys.readouterr().err
    summary_file = out / "summary.json"
    return Outcome(code, err, json.loads(summary_file.read_text()) if summary_file.is_file() else None)


def coloured_rgb(k: int, size=(24, 20), seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: class k's colour and noise, as builders.write_imagefolder draws them."""
    rng = np.random.default_rng(seed)
    base = np.zeros((size[1], size[0], 3), np.float32)
    base[..., k % 3] = 180
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def png_bytes(width: int, height: int, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    """A valid PNG of zeros whatever its size: a 1-bit image of 20000 x 9000 is a decompression bomb of 23 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = 1 + (width * bit_depth + 7) // 8  # a filter byte, then the packed samples
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(row * height), 9)) + chunk(b"IEND", b""))
