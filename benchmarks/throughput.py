"""What does RELA save? Step throughput, loader speed, target-bank cost and end-to-end wall-clock, in one run.

    python benchmarks/throughput.py [--out DIR] [--quick] [--preset h100] [--device cpu|cuda]
        [--dataset digits] [--data PATH] [--arch A] [--batch-size B] [--image-size S] [--precision fp32|bf16]
        [--recipe project|reference] [--prior rand] [--transfer-prior run:DIR] [--budgets 0.1 0.2 0.5]
        [--seeds 3] [--epochs N] [--probe-epochs N] [--target-drop-pp 1] [--monitor-every N] [--monitor-size N]
        [--rela-averaging-scale S] [--skip PART ...]

1. Step throughput (images/s; each image is two views): rela.step.train_step, the trainer's own step, on
   the networks rela.run.build_networks builds for the trainer (no DDP), on synthetic batches resident on
   the device: a BYOL step, a RELA-phase step (no target-network forward), each with the fused ops on and off, next to a plain
   supervised step (cross-entropy, SGD) of the same backbone on the same batch and the prior's forward.
   Like with like: the supervised step runs with the trainer's autocast and memory format, its backbone
   compiled as theirs (--compile, same backend); the prior's forward runs as the target bank runs it (bf16
   autocast on channels_last on CUDA); each row says what it ran with, read off its networks, and
   step.like_for_like whether the compared rows agree. --steps-only: this part alone, on the imagenet
   preset's ResNet-50 networks (what benchmarks/gpu_first_contact.sh times).
   Interleaved rounds (every method once per round), the median; CUDA events on a GPU. On the CPU the
   fused path would be Triton's interpreter, which is not timed. The loader's own images/s on the dataset
   (TorchTrainLoader; DALI too where installed and on a GPU) says whether the step or the loader bounds.
2. Target bank: a fresh bank built by the trainer's rela.run.build_target_bank for the chosen prior;
   seconds per 1,000 images.
3. End to end, against honest baselines: rela.train.run per seed (seeds outermost, after an untimed
   warm-up run) for BYOL at 100% (--prior none --budget 1.0), BYOL at each reduced budget, RELA at each
   budget, RELA from --transfer-prior at each budget (a prior trained elsewhere: a digits run's folder as the
   prior of a harder dataset), and the untrained backbone (rela.train.evaluate_untrained: same architecture
   and initialisation, same evaluation; its wall-clock is its evaluation alone). --recipe goes to every run.
   A fresh bank folder per run, so the bank build is in wall_clock_s (which also holds the evaluation);
   training_clock_s is wall_clock_s without the kNN monitor's own time. Per (method, budget): mean ± std
   over seeds and every seed's number; the difference to BYOL-100% paired by seed, its mean and 95% paired
   t-interval (n/a with one seed). Time to accuracy: each run's kNN monitor (metrics.jsonl) against its
   training clock; the target is BYOL-100%'s mean final monitor kNN minus --target-drop-pp; per run the first
   monitored training clock at or above it (None if never), per group the median over seeds and how many
   reached it, and the ratio to BYOL-100%'s. The headline says whether RELA at 20% came within --tolerance-pp
   of BYOL-100% at under half its wall-clock (linear probe, kNN, time to target), met or not.
4. A projection to ImageNet-1K ResNet-50 on 8 GPUs from the measured ResNet-50 step (on the CPU measured
   at a small resolution and scaled by pixel count): a projection, not a measurement.

--out DIR writes DIR/throughput.json (with benchmarks.timing.environment()) and DIR/throughput.png (the
claim: monitor kNN against training clock per run, the target and each group's time to it; beside it the
final accuracy against wall-clock; --name changes the stem). --preset h100 adds ResNet-18
(CIFAR stem, 32 px, batch 512) and ResNet-50 (224 px, batch 256), bf16 autocast + channels_last on CUDA.
A benchmark never asserts a speed; it reports.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput_costs import bottlenecks, time_bank, time_loaders  # noqa: E402
from benchmarks.throughput_projection import PROJECTION_SIZE, project_imagenet, rela_phase_fractions  # noqa: E402
from benchmarks.throughput_report import announce, payload_header, report, write_outputs  # noqa: E402
from benchmarks.throughput_runs import bank_seconds_in_runs, compare_end_to_end  # noqa: E402
from benchmarks.throughput_steps import StepSetup, fused_skip_reason, setup_from_config, step_throughput  # noqa: E402
from rela.config import METHOD_NAMES, PRESETS, Config  # noqa: E402
from rela.data.datasets import DATASETS, DatasetSplits, load_dataset  # noqa: E402
from rela.errors import RelaError  # noqa: E402
from rela.options import resolve_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    given, cfg, splits = resolve(args)
    setups, projection_setup = plan_setups(args, cfg, splits, device)
    payload = payload_header(args, cfg, device)
    announce(payload, cfg, splits, setups, args.precision, device)
    clock = SectionClock()

    # 1. Step throughput, and the loader's beside it
    payload["step"] = step_throughput(setups, cfg, device, args.methods, warmup=args.step_warmup,
                                      rounds=args.step_rounds, repeats=args.step_repeats)
    trainer_fused = "on" if fused_skip_reason(device) is None else "off"
    clock.done("step")
    if "loader" not in args.skip:
        print("timing the loader", flush=True)
        loader_rows = time_loaders(cfg, device, args.precision, warmup=2, repeats=5 if args.quick else 10)
        payload["loader"] = {"rows": bottlenecks(loader_rows, payload["step"]["rows"], setups[0].label, trainer_fused)}
        clock.done("loader")

    # 2. Target bank
    if "bank" not in args.skip:
        print(f"timing the target bank ({args.bank_builds} fresh build(s), prior {cfg.prior})", flush=True)
        payload["target_bank"] = time_bank(cfg, device, args.bank_builds)
        clock.done("bank")

    # 3. End to end
    if "e2e" not in args.skip:
        payload["end_to_end"] = compare_end_to_end(
            given, cfg, method=args.method, prior=args.prior, budgets=args.budgets, seeds=args.seeds,
            transfer_prior=args.transfer_prior, target_drop_pp=args.target_drop_pp, tolerance_pp=args.tolerance_pp)
        if "target_bank" in payload:
            payload["target_bank"]["in_runs_seconds_mean"] = bank_seconds_in_runs(payload["end_to_end"]["runs"])
        clock.done("e2e")

    # 4. Projection
    if "projection" not in args.skip:
        fractions, source = rela_phase_fractions(args.budgets, args.projection_rela_fraction, payload.get("end_to_end"))
        payload["projection"] = {**project_imagenet(payload["step"]["rows"], projection_setup, trainer_fused, fractions,
                                                    epochs=args.projection_epochs, gpus=args.projection_gpus),
                                 "rela_phase_fraction_source": source}

    payload["benchmark_seconds"] = clock.seconds
    payload["load_average_end"] = list(os.getloadavg())
    report(payload)
    if args.out is not None:
        write_outputs(payload, args.out, args.name, cfg, args.tolerance_pp)
    return payload


class SectionClock:
    """Seconds per part of the benchmark, each from the end of the one before."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def done(self, name: str) -> None:
        self.seconds[name] = time.perf_counter() - self.started
        self.started = time.perf_counter()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write DIR/NAME.json and DIR/NAME.png")
    parser.add_argument("--name", default="throughput", help="file name stem under --out (default: throughput)")
    parser.add_argument("--quick", action="store_true",
                        help="CPU-minutes: 1 seed, budget 0.2, few epochs, few step repeats")
    parser.add_argument("--preset", choices=("none", "h100"), default="none",
                        help="h100: also time ResNet-18 (CIFAR stem, 32 px, batch 512) and ResNet-50 (224 px, "
                             "batch 256), bf16 + channels_last on CUDA")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", default="mnist5k", choices=DATASETS)
    parser.add_argument("--data", default=None, help="data folder (CIFAR, ImageFolder)")
    parser.add_argument("--arch", default=None, help="backbone (default: the dataset preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the dataset preset's")
    parser.add_argument("--image-size", type=int, default=None, help="default: the dataset preset's")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 autocast (+ channels_last) on CUDA, fp32 on the CPU")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                        help="torch.compile the backbones, of every timed step and run alike (rela.train --compile; "
                             "default: the trainer's, auto: on for CUDA)")
    parser.add_argument("--compile-backend", default=None, help="rela.train --compile-backend (default: inductor)")
    parser.add_argument("--steps-only", action="store_true",
                        help="only the step throughput of one setup: the imagenet preset's networks (ResNet-50, its "
                             "heads and optimiser; --arch, --image-size, --batch-size change them), synthetic "
                             "batches, no dataset, loader, bank, end-to-end runs, methods or projection")
    parser.add_argument("--prior", default="rand", help="RELA's prior (rela.train --prior)")
    parser.add_argument("--method", choices=METHOD_NAMES, default="byol",
                        help="the SSL method of every end-to-end run: alone at 100%% and at the reduced budgets, and "
                             "after RELA (rela.train --method)")
    parser.add_argument("--methods", nargs="*", choices=METHOD_NAMES, default=list(METHOD_NAMES),
                        help="step throughput per method: its own step against the RELA-phase step on its networks "
                             "(default: every method; --methods with no name: none)")
    parser.add_argument("--transfer-prior", default=None, metavar="SPEC",
                        help="also RELA from a prior trained elsewhere at each budget, e.g. run:DIR of a digits run "
                             "as the prior for a harder dataset")
    parser.add_argument("--recipe", choices=("project", "reference"), default=None,
                        help="rela.train --recipe for every run (default: the trainer's, project)")
    parser.add_argument("--rela-averaging-scale", type=float, default=None, help="rela.train --rela-averaging-scale")
    parser.add_argument("--monitor-every", type=int, default=None,
                        help="kNN monitor every N steps (default: the trainer's, each epoch's end)")
    parser.add_argument("--monitor-size", type=int, default=None, help="kNN monitor's memory bank size")
    parser.add_argument("--budgets", type=float, nargs="+", default=None, help="RELA budgets (default 0.1 0.2 0.5)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per run (default 3, quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="end-to-end epochs (default: preset's, quick 8)")
    parser.add_argument("--probe-epochs", type=int, default=None,
                        help="linear-probe epochs (default: preset's, quick 30)")
    parser.add_argument("--tolerance-pp", type=float, default=1.0,
                        help="RELA matches BYOL-100%% when its mean linear-probe accuracy is at most this many "
                             "points lower")
    parser.add_argument("--target-drop-pp", type=float, default=1.0,
                        help="time-to-accuracy target: BYOL-100%%'s mean final monitor kNN minus this many points")
    parser.add_argument("--step-warmup", type=int, default=None)
    parser.add_argument("--step-rounds", type=int, default=None, help="interleaved rounds; the median of their medians")
    parser.add_argument("--step-repeats", type=int, default=None, help="steps per method per round")
    parser.add_argument("--bank-builds", type=int, default=None, help="fresh bank builds to time (default 3, quick 1)")
    parser.add_argument("--projection-image-size", type=int, default=None,
                        help="ResNet-50 step size for the projection (default 224 on CUDA; CPU 64, quick 32)")
    parser.add_argument("--projection-batch-size", type=int, default=None, help="default 256 on CUDA, 8 on the CPU")
    parser.add_argument("--projection-epochs", type=int, default=PRESETS["imagenet"]["epochs"])
    parser.add_argument("--projection-gpus", type=int, default=8)
    parser.add_argument("--projection-rela-fraction", type=float, default=None,
                        help="fraction of RELA's steps in the RELA phase (default: measured in the end-to-end runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("loader", "bank", "e2e", "projection"),
                        help="parts not to run")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.steps_only:
        args.skip = ["loader", "bank", "e2e", "projection"]
        args.methods = []
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.budgets = args.budgets or ([0.2] if args.quick else [0.1, 0.2, 0.5])
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (8 if args.quick else None)
    args.probe_epochs = args.probe_epochs or (30 if args.quick else None)
    args.step_warmup = args.step_warmup or (10 if cuda else (2 if args.quick else 3))
    args.step_rounds = args.step_rounds or (2 if args.quick else 5)
    args.step_repeats = args.step_repeats or (20 if cuda else (3 if args.quick else 5))
    args.bank_builds = args.bank_builds or (1 if args.quick else 3)
    args.projection_image_size = args.projection_image_size or (224 if cuda else (32 if args.quick else 64))
    args.projection_batch_size = args.projection_batch_size or (256 if cuda else 8)
    return args


def resolve(args: argparse.Namespace) -> tuple[dict, Config, DatasetSplits | None]:
    """The dataset's configuration: preset, then what was given here (--steps-only: the imagenet preset's),
    as rela.train options, the resolved Config and the dataset (None with --steps-only). A user mistake
    ends the benchmark with one line."""
    given = {"dataset": args.dataset, "device": args.device, "precision": args.precision, "prior": args.prior,
             "method": args.method}
    if args.steps_only:
        given.update(dataset="imagefolder", preset="imagenet")
    for name in ("data", "arch", "batch_size", "image_size", "epochs", "probe_epochs", "recipe",
                 "rela_averaging_scale", "monitor_every", "monitor_size", "compile", "compile_backend"):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    try:
        cfg = resolve_config(given)
        splits = None if args.steps_only else load_dataset(cfg.dataset, cfg.data, split_seed=cfg.seed,
                                                           val_fraction=cfg.val_fraction)
    except RelaError as err:
        print(f"throughput: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.prior == "none":
        print("throughput: error: --prior none leaves nothing to compare; give RELA's prior", file=sys.stderr)
        raise SystemExit(1)
    return given, cfg, splits


def plan_setups(args: argparse.Namespace, cfg: Config, splits: DatasetSplits | None, device: torch.device
                ) -> tuple[list[StepSetup], StepSetup]:
    """The setups whose steps are timed and the ResNet-50 the projection is made from: with --steps-only the
    one setup of cfg (both); else the dataset's setup, the h100 preset's, and the projection's."""
    if args.steps_only:
        setup = setup_from_config(f"{cfg.arch}-{cfg.image_size}px", cfg, args.precision, device, 1000)
        return [setup], setup
    setups = [setup_from_config(cfg.dataset, cfg, args.precision, device, splits.num_classes)]
    precision = "bf16" if device.type == "cuda" else "fp32"
    projection = {"image_size": args.projection_image_size, "batch_size": args.projection_batch_size}
    compiled = {"compile": cfg.compile, "compile_backend": cfg.compile_backend}  # every setup as the dataset's
    if args.preset == "h100":
        if device.type != "cuda":
            print("note: --preset h100 on the CPU: ResNet-50 at 224 px, batch 256, takes minutes per step")
        setups.append(setup_from_config("h100-resnet18", resolve_config(
            {"dataset": "cifar10", "arch": "resnet18_cifar", "image_size": 32, "batch_size": 512, **compiled}),
            precision, device, 10))
        projection = {"image_size": PROJECTION_SIZE, "batch_size": 256}
    projection_setup = setup_from_config(
        "h100-resnet50" if args.preset == "h100" else "projection-resnet50",
        resolve_config({"dataset": "imagefolder", "preset": "imagenet", **projection, **compiled}), precision, device,
        1000)
    if "projection" not in args.skip or args.preset == "h100":
        setups.append(projection_setup)
    return setups, projection_setup


if __name__ == "__main__":
    main()
