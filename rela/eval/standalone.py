"""python -m rela.eval RUN_DIR_OR_BACKBONE [--dataset D --data PATH]: the linear probe and the kNN classifier
on any saved backbone, on the dataset it was trained on or another one (a transfer evaluation).

RUN_DIR_OR_BACKBONE is a run folder (backbone.pt, and config.json for the defaults), a backbone.pt written by
rela.train, or a state-dict file (.safetensors, .pth) with --arch (backbone.safetensors names its own arch).
Options not given take the run's (dataset, image size, seed and so the held-out split, probe settings), then
the eval dataset's preset. Features and both evaluations are the end of a run's (rela/eval/features.py,
rela/eval/frozen.py): on the run's own dataset, split and protocol it gives summary.json's numbers again.
One process (no torchrun); writes a JSON (--out, default RUN/eval-DATASET.json) and prints the results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rela.config import Config, shorten
from rela.data.datasets import load_dataset, with_norm_stats
from rela.data.factory import build_image_source, choose_loader
from rela.errors import RelaError
from rela.eval.frozen import PROBE_PROTOCOLS, evaluate_frozen
from rela.models.backbones import build_backbone
from rela.models.export import load_backbone
from rela.options import checked_options, resolve_config
from rela.utils.device import autocast_dtype_for, pick_device
from rela.utils.distributed import DistInfo
from rela.utils.files import atomic_write_json, write_errors_named

# Options of the run that carry over to its evaluation unless given (dataset-specific ones only when the
# evaluation is on the run's own dataset).
FROM_RUN = ("seed", "probe_protocol", "probe_epochs", "knn_k", "knn_temperature", "eval_batch_size", "workers",
            "image_size", "skip_corrupt", "norm_stats")
FROM_RUN_SAME_DATASET = ("data", "preset", "val_fraction")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rela.eval", allow_abbrev=False,
        description="Linear probe and kNN on a saved backbone, on its training dataset or another one.")
    parser.add_argument("backbone", metavar="RUN_DIR_OR_BACKBONE",
                        help="a run folder, its backbone.pt, or a .safetensors/.pth state dict (with --arch)")
    parser.add_argument("--dataset", choices=Config.__dataclass_fields__["dataset"].metadata["choices"],
                        help="dataset to evaluate on (default: the run's)")
    parser.add_argument("--data", help="its data folder (CIFAR batches, ImageFolder tree)")
    parser.add_argument("--arch", help="the backbone's architecture (default: the file's or the run's)")
    parser.add_argument("--image-size", type=int, help="evaluation size in pixels (default: the run's)")
    parser.add_argument("--norm-stats", choices=Config.__dataclass_fields__["norm_stats"].metadata["choices"],
                        help="normalise with the dataset's own mean and std or ImageNet's (default: the run's)")
    parser.add_argument("--probe-protocol", choices=(*PROBE_PROTOCOLS, "both"),
                        help="linear probe protocol (default: the run's); 'both' runs the two on the same features")
    parser.add_argument("--probe-epochs", type=int)
    parser.add_argument("--knn-k", type=int)
    parser.add_argument("--knn-temperature", type=float)
    parser.add_argument("--seed", type=int, help="seed of the train/val split (when the data has no val split) "
                                                 "and of the probe (default: the run's)")
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--out", help="the results' JSON (default: RUN/eval-DATASET.json, or beside the file)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return parser


def load_evaluated_backbone(path: Path, arch: str | None) -> tuple[torch.nn.Module, dict, dict]:
    """(backbone with the file's weights, what the file says of itself, the run's config or {})."""
    if path.is_dir():
        run_config = _read_json(path / "config.json")
        path = path / "backbone.pt"
        if not path.is_file():
            raise RelaError(f"{path.parent} holds no backbone.pt (a finished run of rela.train writes one)")
    else:
        run_config = _read_json(path.parent / "config.json") if path.stem == "backbone" else {}  # in a run folder
    if not path.is_file():
        raise RelaError(f"{path}: no such file")
    info: dict[str, Any] = {"path": str(path)}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            state = load_file(str(path))
            info.update({k: (json.loads(v) if k in ("mean", "std") else v) for k, v in meta.items() if k != "format"})
            if "image_size" in info:
                info["image_size"] = int(info["image_size"])
        else:
            saved = load_backbone(path)
            if isinstance(saved, dict) and "state_dict" in saved and "arch" in saved:  # rela.train's backbone.pt
                state = saved["state_dict"]
                info.update({k: saved[k] for k in ("arch", "image_size", "mean", "std") if k in saved})
            else:
                state = saved.get("state_dict", saved) if isinstance(saved, dict) else saved
    except Exception as err:  # the user's file: name it, not a pickle traceback
        raise RelaError(f"cannot load {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    arch = arch or info.get("arch") or run_config.get("arch")
    if arch is None:
        raise RelaError(f"{path} does not say its architecture: pass --arch (e.g. resnet18, small_resnet, timm:NAME)")
    backbone = build_backbone(arch)
    try:
        backbone.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise RelaError(f"{path} does not fit --arch {arch}: {str(err).splitlines()[0]} "
                        f"{_first_detail(str(err))}".strip()) from None
    info["arch"] = arch
    return backbone, info, run_config


def evaluate_backbone(args: argparse.Namespace) -> dict:
    start = time.time()
    backbone, info, run_config = load_evaluated_backbone(Path(args.backbone), args.arch)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("backbone", "out")}
    protocol = given.pop("probe_protocol", None)
    run_dataset = run_config.get("dataset")
    dataset = given.get("dataset", run_dataset)
    if dataset is None:
        raise RelaError("--dataset is needed: the backbone comes without a run's config.json")
    options = {k: run_config[k] for k in FROM_RUN if run_config.get(k) is not None}
    if dataset == run_dataset:
        options.update({k: run_config[k] for k in FROM_RUN_SAME_DATASET if run_config.get(k) is not None})
    if "image_size" not in options and "image_size" in info:
        options["image_size"] = info["image_size"]
    options.update(given, dataset=dataset, arch=info["arch"])
    cfg = resolve_config(options)
    protocols = list(PROBE_PROTOCOLS) if protocol == "both" else [protocol or cfg.probe_protocol]

    device = pick_device(cfg.device)
    splits = with_norm_stats(load_dataset(cfg.dataset, cfg.data, split_seed=cfg.seed, val_fraction=cfg.val_fraction),
                             cfg.norm_stats)
    use_dali = choose_loader(cfg, device, splits.train)
    backbone = backbone.to(device)
    results = evaluate_frozen(backbone, build_image_source(cfg, splits.train, device, use_dali),
                              build_image_source(cfg, splits.val, device, use_dali), splits, cfg, dist=DistInfo(),
                              autocast_dtype=autocast_dtype_for(cfg.precision, device), protocols=protocols)
    return {"backbone": info["path"], "arch": info["arch"], "trained_on": run_dataset, "dataset": cfg.dataset,
            "data": cfg.data, "transfer": run_dataset is not None and cfg.dataset != run_dataset,
            "image_size": cfg.image_size, "train_images": len(splits.train), "val_images": len(splits.val),
            "num_classes": splits.num_classes, "seed": cfg.seed, "probe_epochs": cfg.probe_epochs, "knn_k": cfg.knn_k,
            "device": str(device), "results": results, "eval_s": time.time() - start}


def default_out(backbone_arg: str, dataset: str) -> Path:
    path = Path(backbone_arg)
    if path.is_dir():
        return path / f"eval-{dataset}.json"
    return path.with_name(f"{path.stem}-eval-{dataset}.json")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate_backbone(args)
    except RelaError as err:
        print(f"rela.eval: error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else default_out(args.backbone, report["dataset"])
    try:
        with write_errors_named(out):
            atomic_write_json(report, out)
    except RelaError as err:
        print(f"rela.eval: error: {err}", file=sys.stderr)
        return 1
    for protocol, r in report["results"].items():
        spread = f" ± {r['linear_probe_top1_std']:.2f}" if r["linear_probe_top1_std"] is not None else ""
        trained_on = report["trained_on"]
        origin = ("trained on it" if trained_on == report["dataset"] else f"trained on {trained_on}") if trained_on else "-"
        print(f"{report['dataset']} ({origin}; probe {protocol}): "
              f"linear_probe_top1={r['linear_probe_top1']:.2f}{spread} knn_top1={r['knn_top1']:.2f}")
    print(f"written: {out}")
    return 0


def _read_json(path: Path) -> dict:
    """A run's config.json as Config's options of their types ({} without one); RelaError naming the file if
    it is not JSON or holds values of the wrong type. Names that are not options (another version's) are
    left out."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RelaError(f"{path}: not a run's config.json: {shorten(str(err).splitlines()[0])}") from None
    return checked_options(str(path), raw, unknown="ignore")


def _first_detail(message: str) -> str:
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    return lines[0][:200] if lines else ""
