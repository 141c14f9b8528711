"""How fast does the raw target bank fill, next to the prior's own forward?

Three numbers from one run on the same generated images (random uint8, no files) and the same prior:
  prior forward      the prior alone on one batch, repeated: the ceiling
  rela._C bank       build_raw_features: static batches, host ring, writer thread scattering into the
                     memory-mapped bank, float64 covariance sums on the device; a fresh bank each repeat
  naive loop         a Python loop with .cpu() after every batch, torch.cat, torch.save at the end (no sums)

    python benchmarks/prior.py [--out DIR] [--quick] [--device cuda]

CPU --quick: resnet18 at 64 px. CUDA: resnet50 at 224 px. Like with like: all three run the same encode, the
target bank's own (rela.prior.target_bank.prior_encoder at the bank's precision on this device: bf16 autocast on
channels_last on CUDA, fp32 NCHW elsewhere) on the same float32 images; the JSON's config says which, and each
result row repeats it. Reports, never asserts.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import environment, interleaved, print_table, write_json  # noqa: E402
from rela.prior.raw_features import build_raw_features  # noqa: E402
from rela.prior.target_bank import prior_encoder, prior_precision  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_prior(arch: str, device: torch.device, precision: str):
    """A torchvision ResNet (random weights: speed does not depend on them) without its classifier, run as the
    target bank runs its prior at `precision` (prior_encoder: "bf16" is autocast on channels_last)."""
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(device)
    return prior_encoder(model, precision), model.inplanes  # inplanes: the last stage's width, the feature dim


def make_loader(resolution: int, pool_size: int, device: torch.device):
    """Indices -> normalised float32 NCHW images on `device` (the encode puts them in its own layout), drawn
    from a pool of random uint8 images kept there."""
    generator = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (pool_size, 3, resolution, resolution), dtype=torch.uint8, generator=generator)
    pool = pool.to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def load_batch(indices: torch.Tensor) -> torch.Tensor:
        images = pool[(indices % pool_size).to(device, non_blocking=True)]
        return (images.float() - mean) / std

    return load_batch


def naive_build(encode, load_batch, num_rows: int, batch_size: int, path: Path) -> None:
    outputs = []
    with torch.no_grad():
        for start in range(0, num_rows, batch_size):
            indices = torch.arange(start, min(num_rows, start + batch_size))
            outputs.append(encode(load_batch(indices)).cpu())
    torch.save(torch.cat(outputs).float(), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="small run (CPU: under two minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", help="torchvision ResNet (default: resnet50 on CUDA, resnet18 on CPU)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--rows", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--storage-dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, help="rounds; each times every method once (the forward 5 times)")
    parser.add_argument("--bank-dir", type=Path, help="where the benchmark's banks go (default: a temporary folder)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    arch = args.arch or ("resnet50" if cuda else "resnet18")
    resolution = args.resolution or (224 if cuda else (64 if args.quick else 112))
    batch_size = args.batch_size or (256 if cuda else 32)
    rows = args.rows or (batch_size * (8 if args.quick else 32) if cuda else (256 if args.quick else 1024))
    repeats = args.repeats or (5 if args.quick else 7)
    precision = prior_precision(device)  # the target bank's on this device
    torch.backends.cudnn.benchmark = True

    encode, feature_dim = make_prior(arch, device, precision)
    load_batch = make_loader(resolution, pool_size=min(rows, 512), device=device)
    # Every method below runs this one encode: the same dtype and memory format on every side.
    run_as = {"precision": precision, "bf16_autocast": precision == "bf16", "channels_last": precision == "bf16",
              "input_dtype": "float32", "as_target_bank": True}
    config = {"arch": arch, "resolution": resolution, "rows": rows, "batch_size": batch_size,
              "feature_dim": feature_dim, **run_as, "storage_dtype": args.storage_dtype, "repeats": repeats,
              "quick": args.quick}
    print(f"prior benchmark: {arch} at {resolution} px, {rows} rows of {feature_dim}, batch {batch_size}, "
          f"on {device}")

    images = load_batch(torch.arange(batch_size))
    with tempfile.TemporaryDirectory(dir=args.bank_dir) as tmp:
        bank_path, naive_path = Path(tmp) / "bench.bank", Path(tmp) / "naive.pt"
        last = {}

        def forward():
            with torch.no_grad():
                encode(images)

        def extension_build():
            last["raw"] = build_raw_features(
                encode, load_batch, rows, feature_dim, bank_path, "benchmark", batch_size=batch_size, device=device,
                storage_dtype=getattr(torch, args.storage_dtype), rebuild=True)

        def naive():
            naive_build(encode, load_batch, rows, batch_size, naive_path)

        samples = interleaved({"prior forward": (forward, 5), "rela._C bank": (extension_build, 1),
                               "naive loop": (naive, 1)}, rounds=repeats, device=device)

    per_call = {"prior forward": batch_size, "rela._C bank": rows, "naive loop": rows}
    results = []
    for method, timing in samples.items():
        results.append({"method": method, **timing, "images_per_s": per_call[method] / timing["median_ms"] * 1e3,
                        "precision": precision, "channels_last": run_as["channels_last"]})
    results[1]["writer_rows_per_s"] = last["raw"].rows_per_s
    ceiling = results[0]["images_per_s"]
    for row in results:
        row["vs_forward"] = row["images_per_s"] / ceiling
    print_table(results, ["method", "images_per_s", "vs_forward", "median_ms", "p10_ms", "p90_ms", "repeats"])
    print(f"median_ms: one batch for 'prior forward', one whole bank of {rows} rows for the others; "
          "rounds interleave the methods")
    name = f"prior-{device.type}{'-quick' if args.quick else ''}.json"
    path = write_json(args.out / name, {"benchmark": "prior", "environment": environment(device), "config": config,
                                        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
