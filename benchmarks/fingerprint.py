"""How long does a start take to list and fingerprint an ImageNet-sized tree, and how much memory does the list hold?

Generates N tiny files (ROOT/CLASS/IMAGE.jpg, 1000 files a class, a few bytes each: the cost is per file, not per
byte) in a temporary folder and times, with the page cache warm (a second pass, as on a node that staged the data):
  list           the tree's listing as every rank does it (rela.data.datasets.list_class_folders: scandir, no stat)
  names digest   what every rank other than 0 checks (FileImages.names_digest: no stat)
  fingerprint    what rank 0 alone takes (a stat of every file, hashed) and caches beside the banks
                 (rela.prior.target_bank.agreed_fingerprint with a list folder: the list written as it goes)
and the memory of the list (tracemalloc of the names and labels), then extrapolates each linearly to ImageNet-1K's
1,281,167 training files. A network file system's stat costs more than a local disk's: the per-file times here are
a lower bound there.

    python benchmarks/fingerprint.py [--files 100000] [--out benchmarks/results]

Reports, never asserts.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import environment, print_table, time_fn, write_json  # noqa: E402
from rela.data.datasets import FileImages, list_class_folders  # noqa: E402
from rela.prior.target_bank import agreed_fingerprint  # noqa: E402
from rela.utils.distributed import DistInfo  # noqa: E402

IMAGENET_TRAIN_FILES = 1_281_167
PER_CLASS = 1000


def make_tree(root: Path, files: int) -> float:
    """`files` tiny .jpg files in classes of PER_CLASS; returns the seconds it took."""
    start = time.perf_counter()
    for i in range(files):
        folder = root / f"n{i // PER_CLASS:08d}"
        if i % PER_CLASS == 0:
            folder.mkdir(parents=True)
        fd = os.open(folder / f"n{i // PER_CLASS:08d}_{i:07d}.JPEG", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"\xff\xd8\xff")
        os.close(fd)
    return time.perf_counter() - start


def list_memory_bytes(root: Path) -> int:
    """Bytes the Python list of names (and the int64 labels) holds, as a dataset keeps it."""
    import numpy as np

    tracemalloc.start()
    files = list_class_folders(root)
    labels = np.zeros(len(files), dtype=np.int64)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del files, labels
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rela-fingerprint-") as tmp:
        root, banks = Path(tmp) / "train", Path(tmp) / "banks"
        create_s = make_tree(root, args.files)
        files = list_class_folders(root)
        dataset = FileImages(root, files, [int(f[1:9]) for f in files], "imagefolder/train")
        timed = {
            "list": lambda: list_class_folders(root),
            "names digest": dataset.names_digest,
            "fingerprint (stat + hash)": dataset.fingerprint,
            "fingerprint + cached list": lambda: agreed_fingerprint(dataset, DistInfo(), banks),
        }
        rows = []
        for name, fn in timed.items():
            t = time_fn(fn, device="cpu", warmup=1, repeats=args.repeats)
            per_file_us = t["median_ms"] * 1e3 / args.files
            rows.append({"step": name, "median_s": t["median_ms"] / 1e3, "per_file_us": per_file_us,
                         "imagenet_s": per_file_us * IMAGENET_TRAIN_FILES / 1e6, "repeats": t["repeats"]})
        memory = list_memory_bytes(root)
        cached = sorted(banks.glob("files-*.list"))
        list_file_bytes = cached[0].stat().st_size if cached else None

    print_table(rows, ["step", "median_s", "per_file_us", "imagenet_s"])
    memory_row = {"files": args.files, "list_bytes": memory, "bytes_per_file": memory / args.files,
                  "imagenet_list_mb": memory / args.files * IMAGENET_TRAIN_FILES / 2**20,
                  "cached_list_file_bytes": list_file_bytes,
                  "imagenet_cached_list_mb": (list_file_bytes / args.files * IMAGENET_TRAIN_FILES / 2**20
                                              if list_file_bytes else None)}
    print_table([memory_row], list(memory_row))
    payload = {"benchmark": "fingerprint", **environment("cpu"),
               "config": {"files": args.files, "per_class": PER_CLASS, "file_bytes": 3, "page_cache": "warm",
                          "imagenet_train_files": IMAGENET_TRAIN_FILES, "tree_creation_s": create_s},
               "results": rows, "memory": memory_row}
    print(f"wrote {write_json(args.out / 'fingerprint-cpu.json', payload)}")


if __name__ == "__main__":
    main()
