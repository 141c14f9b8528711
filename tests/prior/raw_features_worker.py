"""The raw-bank test fixture (images, prior, float64 reference) and a one-process build for the tests.

Run as a script it builds a bank as one rank of a gloo group (--world-size > 1) or alone, optionally with
a slow prior (--delay) so a test can kill it part-way, and saves what the rank returned to --out (.npz).

The prior is exact by construction: integer pixels times integer weights sum exactly in float32 whatever
the batch or the BLAS blocking, then one division and one addition, both correctly rounded. So banks
built with different batch sizes, resumed or not, are bit-identical, and the float64 reference differs
from them only by the final rounding.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

IMAGE_SHAPE = (3, 4, 4)
PIXELS = 3 * 4 * 4


def load_batch(indices: torch.Tensor) -> torch.Tensor:
    """(B,) int64 -> (B, 3, 4, 4) float32 integer-valued images, distinct per index."""
    pixels = (indices[:, None] * 7919 + torch.arange(PIXELS)[None] * 31 + indices[:, None] ** 2) % 256
    return pixels.to(torch.float32).view(-1, *IMAGE_SHAPE)


def prior_weight(feature_dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234 + feature_dim)
    return torch.randint(-3, 4, (feature_dim, PIXELS), generator=generator).to(torch.float32)


def make_prior(feature_dim: int, *, delay: float = 0.0, output_dtype: torch.dtype = torch.float32):
    """images -> (B, feature_dim) features in [13, 87] (away from 0, so relative errors are meaningful)."""
    weight = prior_weight(feature_dim)

    def encode(images: torch.Tensor) -> torch.Tensor:
        if delay:
            time.sleep(delay)
        return ((images.flatten(1) @ weight.T) / 1000.0 + 50.0).to(output_dtype)

    return encode


def reference_rows(num_rows: int, feature_dim: int) -> torch.Tensor:
    """The prior's output for every index, computed in float64."""
    images = load_batch(torch.arange(num_rows)).to(torch.float64)
    return (images.flatten(1) @ prior_weight(feature_dim).to(torch.float64).T) / 1000.0 + 50.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", type=Path, required=True)
    parser.add_argument("--num-rows", type=int, required=True)
    parser.add_argument("--feature-dim", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--init-file", type=Path, help="the gloo group's file store (world size > 1)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep per prior call")
    parser.add_argument("--flush-seconds", type=float, default=0.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--fail-after-calls", type=int, default=None, help="the prior raises on its next call")
    parser.add_argument("--pause-after-calls", type=int, default=None,
                        help="the prior's next call waits to be killed (at most 10 minutes): a test kills the build "
                             "at a known point, with no timing window")
    args = parser.parse_args()

    torch.set_num_threads(1)  # ranks share the test machine's cores
    if args.world_size > 1:
        import torch.distributed as dist

        # A file store: a port found free and then closed could be taken before gloo binds it.
        dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank,
                                world_size=args.world_size)
    from rela.prior.raw_features import build_raw_features

    loaded = []

    def load(indices: torch.Tensor) -> torch.Tensor:
        loaded.append(indices.clone())
        return load_batch(indices)

    prior = make_prior(args.feature_dim, delay=args.delay)
    calls = []

    def encode(images: torch.Tensor) -> torch.Tensor:
        if args.fail_after_calls is not None and len(calls) >= args.fail_after_calls:
            raise SystemExit(3)  # this rank dies part-way through its shard
        if args.pause_after_calls is not None and len(calls) >= args.pause_after_calls:
            time.sleep(600)  # the earlier batches are written and flushed: the test kills this process now
            raise SystemExit(4)
        calls.append(len(images))
        return prior(images)

    raw = build_raw_features(
        encode, load, args.num_rows, args.feature_dim, args.path, "test-key",
        batch_size=args.batch_size, rank=args.rank, world_size=args.world_size,
        storage_dtype=getattr(torch, args.dtype), flush_seconds=args.flush_seconds)
    if args.out is not None:
        np.savez(args.out, row_sum=raw.row_sum.numpy(), row_outer_sum=raw.row_outer_sum.numpy(),
                 row_count=raw.row_count, rows_computed=raw.rows_computed,
                 loaded=torch.cat(loaded).numpy() if loaded else np.zeros((0,), np.int64),
                 batches=len(loaded), complete_rows=np.array(raw.features).astype(np.float64),
                 first_row=raw.first_row)
    if args.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
