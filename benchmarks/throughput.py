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
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loader import batches_forever, take  # noqa: E402
from benchmarks.prior import interleaved  # noqa: E402
from benchmarks.timing import environment, print_table, time_fn, write_json  # noqa: E402
from rela.config import METHOD_NAMES, PRESETS, Config  # noqa: E402
from rela.data.datasets import DATASETS, load_dataset  # noqa: E402
from rela.data.factory import build_image_source, choose_loader  # noqa: E402
from rela.data.loader import TrainBatch  # noqa: E402
from rela.errors import RelaError  # noqa: E402
from rela.models.backbones import build_backbone  # noqa: E402
from rela.prior.specs import load_prior  # noqa: E402
from rela.ops._dispatch import kernels_unavailable_reason  # noqa: E402
from rela.options import resolve_config  # noqa: E402
from rela.prior.target_bank import TargetBank, prior_encoder, prior_precision  # noqa: E402
from rela.run import build_networks, build_run, build_target_bank, center_crop_fraction, peak_learning_rate  # noqa: E402
from rela.step import train_step  # noqa: E402
from rela.train import evaluate_untrained, run  # noqa: E402
from rela.utils.distributed import DistInfo  # noqa: E402
from rela.utils.progress import RunLog  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
PROJECTION_SIZE = 224
# Forward-equivalents per image: BYOL runs 2 views x (online forward + backward (2) + target forward) = 8;
# a supervised step 1 x (forward + backward) = 3. At equal efficiency BYOL gets 3/8 of supervised images/s.
BYOL_PARITY = 3 / 8


@dataclass
class StepSetup:
    """One configuration whose steps are timed."""
    label: str
    arch: str
    batch_size: int
    image_size: int
    precision: str  # fp32 | bf16
    channels_last: bool
    proj_hidden: int
    proj_dim: int
    optimizer: str
    lr: float
    weight_decay: float
    base_momentum: float
    num_classes: int
    compile: bool = False  # torch.compile the backbones in place, as the trainer does (rela.run.build_networks)
    compile_backend: str = "inductor"


def setup_from_config(label: str, cfg: Config, precision: str, device: torch.device, num_classes: int) -> StepSetup:
    # The trainer's rule (rela.run.build_networks): --compile auto compiles on CUDA.
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return StepSetup(label, cfg.arch, cfg.batch_size, cfg.image_size, precision, device.type == "cuda",
                     cfg.proj_hidden, cfg.proj_dim, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.base_momentum,
                     num_classes, compiled, cfg.compile_backend)


def is_compiled(module: nn.Module) -> bool:
    """Whether Module.compile() was called on `module` (it keeps the compiled call in _compiled_call_impl)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def is_channels_last(module: nn.Module) -> bool:
    """Whether the module's convolution weights are in channels_last (the first 4-D parameter's layout)."""
    weight = next((p for p in module.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last)


def observed_settings(backbones: list[nn.Module], autocast_dtype: torch.dtype | None, inputs: torch.Tensor,
                      backend: str) -> dict:
    """What a timed step really runs with, read off its networks and batch, not off the setup that asked."""
    compiled = all(is_compiled(b) for b in backbones)
    return {"precision": {None: "fp32", torch.bfloat16: "bf16"}[autocast_dtype],
            "channels_last": all(is_channels_last(b) for b in backbones),
            "input_dtype": str(inputs.dtype).removeprefix("torch."),
            "input_channels_last": inputs.dim() == 4 and inputs.is_contiguous(memory_format=torch.channels_last),
            "compiled": compiled, "compile_backend": backend if compiled else None}


# ---------------------------------------------------------------------------------------------------------
# 1. Step throughput
# ---------------------------------------------------------------------------------------------------------

class TrainerStep:
    """The trainer's step (rela.step.train_step) on the networks that rela.run.build_networks builds for
    `python -m rela.train` (no DDP), fed synthetic batches resident on the device."""

    def __init__(self, setup: StepSetup, device: torch.device, fused: bool, seed: int = 0, method: str = "byol",
                 preset: str | None = None):
        given = {"arch": setup.arch, "batch_size": setup.batch_size, "image_size": setup.image_size,
                 "optimizer": setup.optimizer, "lr": setup.lr, "weight_decay": setup.weight_decay, "seed": seed,
                 "method": method, "compile": "on" if setup.compile else "off",
                 "compile_backend": setup.compile_backend}
        if method == "byol":  # the setup's heads; another method's come from its own defaults for the preset
            given.update(proj_hidden=setup.proj_hidden, proj_dim=setup.proj_dim, base_momentum=setup.base_momentum)
        cfg = resolve_config({**given, **({"preset": preset} if preset else {})})
        backbone = build_backbone(cfg.arch, seed=cfg.seed)
        # The bank is PCA-reduced to the backbone's width, so the map is square.
        self.learner, _, self.ema, self.optimizer = build_networks(
            cfg, backbone, backbone.feature_dim, setup.num_classes, DistInfo(), device,
            channels_last=setup.channels_last, fused=fused)
        self.lr, self.momentum, self.fused = peak_learning_rate(cfg), cfg.base_momentum, fused
        self.autocast_dtype = torch.bfloat16 if setup.precision == "bf16" else None
        rows = 4 * setup.batch_size
        self.bank = TargetBank(torch.randn(rows, backbone.feature_dim, device=device), {}, 0.0, reused=False)
        self.batch = synthetic_batch(setup, device, rows)
        self.settings = observed_settings(list(self.learner.method.backbones()), self.autocast_dtype,
                                          self.batch.view1, setup.compile_backend)

    def __call__(self, phase: str) -> None:
        train_step(self.learner, self.optimizer, self.ema, [self.batch], phase=phase,
                   bank=self.bank if phase == "rela" else None, lr=self.lr, momentum=self.momentum,
                   autocast_dtype=self.autocast_dtype, fused=self.fused)


class SupervisedStep:
    """The baseline a BYOL step is compared with: backbone + linear classifier, cross-entropy, SGD. It runs as
    the trainer's steps do: same autocast, same memory format, the backbone compiled in place (same backend)
    when theirs is."""

    def __init__(self, setup: StepSetup, device: torch.device, batch: TrainBatch):
        memory_format = torch.channels_last if setup.channels_last else torch.preserve_format
        backbone = build_backbone(setup.arch, seed=0)
        self.model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, setup.num_classes))
        self.model = self.model.to(device, memory_format=memory_format)
        if setup.compile:  # as rela.run.build_networks compiles the SSL backbones: in place, after the move
            backbone.compile(backend=setup.compile_backend)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.autocast_dtype = torch.bfloat16 if setup.precision == "bf16" else None
        self.images, self.labels = batch.view1, batch.label
        self.settings = observed_settings([backbone], self.autocast_dtype, self.images, setup.compile_backend)

    def __call__(self) -> None:
        device_type, dtype = self.images.device.type, self.autocast_dtype
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(self.model(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class PriorForward:
    """The prior's forward as the target bank runs it (a random-init copy of the arch, eval, no grad): through
    the bank's own rela.prior.target_bank.prior_encoder at the bank's precision on this device (bf16 autocast
    on channels_last on CUDA, fp32 elsewhere), on float32 NCHW images as the bank's loader hands them over."""

    def __init__(self, setup: StepSetup, device: torch.device, batch: TrainBatch):
        prior = load_prior("rand", arch=setup.arch, image_size=setup.image_size, seed=1, prior_size=None,
                           data_mean=(0.5,) * 3, data_std=(0.25,) * 3)
        encoder = prior.encoder.to(device)
        self.precision = prior_precision(device)
        self.encode = prior_encoder(encoder, self.precision)
        self.images = batch.view1.float().contiguous()
        self.settings = observed_settings([encoder], torch.bfloat16 if self.precision == "bf16" else None,
                                          self.images, "")

    def __call__(self) -> None:
        with torch.no_grad():
            self.encode(self.images)


def synthetic_batch(setup: StepSetup, device: torch.device, rows: int) -> TrainBatch:
    """Two normalised views as the loaders deliver them (autocast dtype, the model's layout), bank indices
    and labels, on the device."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    shape = (setup.batch_size, 3, setup.image_size, setup.image_size)
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    views = [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2)]
    if setup.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    index = torch.randint(0, rows, (setup.batch_size,), generator=generator).to(device)
    label = torch.randint(0, setup.num_classes, (setup.batch_size,), generator=generator).to(device)
    return TrainBatch(views[0], views[1], index, label, views="byol")  # random pixels: any mode


def fused_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "not timed: on the CPU the fused path is Triton's interpreter"
    unavailable = kernels_unavailable_reason()
    return None if unavailable is None else f"not timed: {unavailable}"


def time_steps(setup: StepSetup, device: torch.device, *, warmup: int, rounds: int, repeats: int) -> list[dict]:
    """One row per (step, fused): images/s from the median step time over interleaved rounds."""
    skip = fused_skip_reason(device)
    fused_modes = [False] if skip else [False, True]
    learners = {fused: TrainerStep(setup, device, fused) for fused in fused_modes}
    batch = learners[False].batch
    supervised, prior = SupervisedStep(setup, device, batch), PriorForward(setup, device, batch)
    methods, settings = {("supervised", None): supervised}, {("supervised", None): supervised.settings}
    for fused, learner in learners.items():
        for phase in ("byol", "rela"):
            methods[(phase, fused)] = lambda learner=learner, phase=phase: learner(phase)
            settings[(phase, fused)] = learner.settings
    methods[("prior forward", None)], settings[("prior forward", None)] = prior, prior.settings
    for fn in methods.values():  # interleaved() warms each up once more
        for _ in range(max(warmup - 1, 0)):
            fn()
    timings = interleaved({key: (fn, repeats) for key, fn in methods.items()}, rounds=rounds, device=device)
    rows = []
    for (step, fused), timing in timings.items():
        rows.append(step_row(setup, step, fused, timing, settings=settings[(step, fused)]))
        if step == "rela" and fused is False and skip:
            rows.append(step_row(setup, "byol", True, None, skip))
            rows.append(step_row(setup, "rela", True, None, skip))
    del learners, methods
    release_memory(device)
    order = {"supervised": 0, "byol": 1, "rela": 2, "prior forward": 3}
    return sorted(rows, key=lambda r: (order[r["step"]], str(r["fused"])))


def time_method_steps(setup: StepSetup, cfg: Config, device: torch.device, methods: list[str], *, warmup: int,
                      rounds: int, repeats: int) -> list[dict]:
    """Per method: its own step and the RELA-phase step on its networks (heads at the method's defaults for
    the dataset's preset), the fused ops as the trainer picks them; interleaved rounds, the median."""
    fused = fused_skip_reason(device) is None
    steps = {m: TrainerStep(setup, device, fused, method=m, preset=cfg.preset) for m in methods}
    calls = {}
    for m, step in steps.items():
        for phase in (m, "rela"):
            call = (lambda step=step, phase=phase: step(phase))
            for _ in range(warmup):
                call()
            calls[(m, phase)] = (call, repeats)
    timings = interleaved(calls, rounds=rounds, device=device)
    del steps, calls
    release_memory(device)
    rows = []
    for m in methods:
        own, rela = (setup.batch_size / timings[(m, phase)]["median_ms"] * 1e3 for phase in (m, "rela"))
        rows.append({"setup": setup.label, "method": m, "fused": "on" if fused else "off",
                     "method_images_per_s": own, "rela_images_per_s": rela, "rela_over_method": rela / own,
                     "method_median_ms": timings[(m, m)]["median_ms"], "rela_median_ms": timings[(m, "rela")]["median_ms"]})
    return rows


def step_row(setup: StepSetup, step: str, fused: bool | None, timing: dict | None, note: str = "",
             settings: dict | None = None) -> dict:
    """settings: what the timed step ran with (observed_settings); a step not timed names the setup's."""
    if settings is None:
        settings = {"precision": setup.precision, "channels_last": setup.channels_last, "input_dtype": None,
                    "input_channels_last": None, "compiled": setup.compile,
                    "compile_backend": setup.compile_backend if setup.compile else None}
    row = {"setup": setup.label, "step": step, "fused": {None: "-", False: "off", True: "on"}[fused],
           "arch": setup.arch, "batch": setup.batch_size, "size": setup.image_size, **settings,
           "images_per_s": None, "median_ms": None, "p10_ms": None, "p90_ms": None, "rounds": None, "note": note}
    if timing is not None:
        row.update(images_per_s=setup.batch_size / timing["median_ms"] * 1e3, median_ms=timing["median_ms"],
                   p10_ms=timing["p10_ms"], p90_ms=timing["p90_ms"], rounds=timing["repeats"])
    return row


def step_ratios(rows: list[dict]) -> list[dict]:
    """Per setup and fused mode: RELA-phase over BYOL images/s (goal >= 1.3) and BYOL over supervised
    images/s (goal >= 0.35; 0.375 is parity, see BYOL_PARITY)."""
    out = []
    for setup in dict.fromkeys(r["setup"] for r in rows):
        ips = {(r["step"], r["fused"]): r["images_per_s"] for r in rows if r["setup"] == setup}
        for fused in ("off", "on"):
            byol, rela, supervised = ips.get(("byol", fused)), ips.get(("rela", fused)), ips.get(("supervised", "-"))
            if byol is None or rela is None:
                continue
            out.append({"setup": setup, "fused": fused, "byol_images_per_s": byol, "rela_images_per_s": rela,
                        "supervised_images_per_s": supervised, "rela_over_byol": rela / byol,
                        "byol_over_supervised": byol / supervised, "byol_over_supervised_at_parity": BYOL_PARITY})
    return out


TRAIN_STEP_SETTINGS = ("precision", "channels_last", "input_dtype", "input_channels_last", "compiled", "compile_backend")
PRIOR_SETTINGS = ("precision", "channels_last")


def like_for_like(rows: list[dict], device: torch.device) -> list[dict]:
    """Per setup, what each comparison ran with: the supervised, BYOL and RELA steps (their ratios compare
    them) must share precision, memory format, input and compilation; the prior's forward (the projection's
    bank rate) must run as the target bank does on this device. `same` says whether they did."""
    out = []
    bank = {"precision": prior_precision(device), "channels_last": prior_precision(device) == "bf16"}
    for setup in dict.fromkeys(r["setup"] for r in rows):
        timed = [r for r in rows if r["setup"] == setup and r["images_per_s"] is not None]
        train = [r for r in timed if r["step"] in ("supervised", "byol", "rela")]
        train_settings = {tuple(r[k] for k in TRAIN_STEP_SETTINGS) for r in train}
        prior = next((r for r in timed if r["step"] == "prior forward"), None)
        out.append({"setup": setup,
                    "train_steps": {"steps": sorted({f"{r['step']} (fused {r['fused']})" for r in train}),
                                    "same": len(train_settings) == 1,
                                    "settings": dict(zip(TRAIN_STEP_SETTINGS, *train_settings))
                                    if len(train_settings) == 1 else None},
                    "prior_forward": {"settings": None if prior is None else {k: prior[k] for k in PRIOR_SETTINGS},
                                      "target_bank": bank,
                                      "same": prior is not None and all(prior[k] == bank[k] for k in PRIOR_SETTINGS)}})
    return out


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Loader throughput
# ---------------------------------------------------------------------------------------------------------

def time_loaders(cfg: Config, device: torch.device, precision: str, *, warmup: int, repeats: int) -> list[dict]:
    """images/s of the trainer's own loader on the dataset (built by rela.run.build_run, as `python -m
    rela.train` builds it; both view modes), and of DALI where it would run."""
    kinds = ["torch"] + (["dali"] if device.type == "cuda" and choose_loader(cfg, device) else [])
    chunk = max(4, 2 * cfg.workers)  # batches per repeat: more than a worker pool keeps buffered
    rows = []
    for kind in kinds:
        run_cfg = dataclasses.replace(cfg, prior="none", budget=1.0, loader=kind, precision=precision,
                                      device=device.type, progress=False)
        loader = build_run(run_cfg, DistInfo(), device, run_dir=None, log=RunLog(None, enabled=False)).loader
        for mode in ("rela", "byol"):
            loader.set_view_mode(mode)
            batches = batches_forever(loader.epoch, lambda b: b)
            timing = time_fn(lambda: take(batches, chunk), device=device, warmup=warmup, repeats=repeats)
            batches.close()
            rows.append({"loader": kind, "views": mode, "batch": cfg.batch_size,
                         "size": cfg.image_size, "images_per_s": chunk * cfg.batch_size / timing["median_ms"] * 1e3,
                         "median_ms_per_batch": timing["median_ms"] / chunk})
        del loader
        release_memory(device)
    return rows


def bottlenecks(loader_rows: list[dict], step_rows: list[dict], setup_label: str, fused: str) -> list[dict]:
    """For each loader and view mode: the slower of the loader and the matching step at the dataset's setup."""
    step_ips = {r["step"]: r["images_per_s"] for r in step_rows if r["setup"] == setup_label and r["fused"] == fused}
    out = []
    for row in loader_rows:
        step = step_ips.get(row["views"])
        out.append({**row, "step": f"{row['views']} (fused {fused})", "step_images_per_s": step,
                    "bottleneck": None if step is None else ("loader" if row["images_per_s"] < step else "step")})
    return out


# ---------------------------------------------------------------------------------------------------------
# 2. Target bank cost
# ---------------------------------------------------------------------------------------------------------

def build_fresh_bank(cfg: Config, device: torch.device, bank_dir: Path) -> dict:
    """Builds the bank with the trainer's own rela.run.build_target_bank, in an empty folder, and times it."""
    splits = load_dataset(cfg.dataset, cfg.data, split_seed=cfg.seed, val_fraction=cfg.val_fraction)
    source = build_image_source(cfg, splits.train, device, choose_loader(cfg, device))
    target_dim = build_backbone(cfg.arch).feature_dim
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    bank = build_target_bank(dataclasses.replace(cfg, bank_dir=str(bank_dir), progress=False), splits, source,
                             center_crop_fraction(splits), target_dim, DistInfo(), device, RunLog(None, enabled=False))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    assert not bank.reused, "a fresh bank folder must not hold a bank"
    return {"seconds": seconds, "images": len(splits.train), "dim": bank.dim, "prior_input_size": bank.key["input_size"],
            "precision": bank.key["precision"]}


def time_bank(cfg: Config, device: torch.device, repeats: int) -> dict:
    builds = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="rela-bank-bench-") as bank_dir:
            builds.append(build_fresh_bank(cfg, device, Path(bank_dir)))
    seconds = statistics.median(b["seconds"] for b in builds)
    images = builds[0]["images"]
    # The prior's precision is part of the bank's key; bf16 runs on channels_last (prior_encoder).
    return {"prior": cfg.prior, "arch": cfg.arch, "prior_input_size": builds[0]["prior_input_size"],
            "precision": builds[0]["precision"], "channels_last": builds[0]["precision"] == "bf16",
            "images": images, "dim": builds[0]["dim"], "builds": len(builds),
            "seconds_per_build": [b["seconds"] for b in builds], "seconds": seconds,
            "seconds_per_1000_images": seconds / images * 1000, "images_per_s": images / seconds}


# ---------------------------------------------------------------------------------------------------------
# 3. End to end: honest baselines, paired deltas, time-to-accuracy
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedRun:
    """One run of the end-to-end plan. method: byol | rela | rela-transfer | untrained (budget None)."""
    method: str
    prior: str
    budget: float | None

    @property
    def group(self) -> tuple[str, float | None]:
        return self.method, self.budget


METHOD_LABELS = {"byol": "BYOL", "rela": "RELA", "rela-transfer": "RELA transfer", "untrained": "untrained"}
# --method's display names. The plan's run kinds keep their names whatever the method: "byol" is the SSL
# method alone (BYOL unless --method says otherwise), "rela" is RELA handing over to it.
SSL_LABELS = {"byol": "BYOL", "dino": "DINO", "simclr": "SimCLR", "mocov3": "MoCo v3", "barlowtwins": "Barlow Twins",
              "vicreg": "VICReg", "simsiam": "SimSiam"}


def kind_labels(ssl: str = "byol") -> dict[str, str]:
    """Each run kind's display name when the SSL method is `ssl`."""
    if ssl == "byol":
        return METHOD_LABELS
    name = SSL_LABELS[ssl]
    return {"byol": name, "rela": f"RELA+{name}", "rela-transfer": f"RELA+{name} transfer", "untrained": "untrained"}


def plan_runs(prior: str, budgets: list[float], transfer_prior: str | None) -> list[PlannedRun]:
    """One seed's runs: BYOL-100% (the reference), BYOL at each reduced budget (does RELA add anything over
    simply training less?), RELA at each budget, RELA from a prior trained elsewhere, and the untrained
    backbone (what any learning is measured from)."""
    reduced = sorted(b for b in budgets if b < 1.0)
    plan = [PlannedRun("byol", "none", 1.0)] + [PlannedRun("byol", "none", b) for b in reduced]
    plan += [PlannedRun("rela", prior, b) for b in sorted(budgets)]
    if transfer_prior is not None:
        plan += [PlannedRun("rela-transfer", transfer_prior, b) for b in sorted(budgets)]
    return plan + [PlannedRun("untrained", "none", None)]


def group_label(method: str, budget: float | None, ssl: str = "byol") -> str:
    return kind_labels(ssl)[method] + ("" if budget is None else f" {budget_label(budget)}")


def run_name(planned: PlannedRun, seed: int, ssl: str = "byol") -> str:
    budget = "" if planned.budget is None else f"-{budget_label(planned.budget)}"
    kind = planned.method if ssl == "byol" else planned.method.replace("byol", ssl)
    return f"{kind}{budget}-seed{seed}"


def monitor_curve(run_dir: Path) -> list[list[float]]:
    """[training_clock_s, monitor_knn_top1, step] per kNN-monitor row of the run's metrics.jsonl."""
    curve = []
    with open(run_dir / "metrics.jsonl") as rows:
        for line in rows:
            row = json.loads(line)
            if "monitor_knn_top1" in row:
                curve.append([row["training_clock_s"], row["monitor_knn_top1"], row["step"]])
    return curve


def end_to_end(base: dict, *, prior: str, budgets: list[float], seeds: int, work_dir: Path,
               transfer_prior: str | None = None) -> list[dict]:
    """Every planned run for each seed, seeds outermost so that load drift on a shared machine hits every
    method alike. Each run gets an empty bank folder, so a bank's build is counted in its wall-clock."""
    def run_config(name: str, **options) -> Config:
        return resolve_config({**base, **options, "out": str(work_dir / "runs" / name),
                               "bank_dir": str(work_dir / "banks" / name), "progress": False})

    def quietly(name: str, fn, cfg: Config) -> dict | None:
        log_path = work_dir / "runs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return fn(cfg)

    # Untimed: the first run in a process pays for lazy imports and kernel set-up, which would land on
    # whichever method went first.
    quietly("warm-up", run, run_config("warm-up", prior=prior, budget=min(budgets), epochs=1, stop_after_steps=2))
    runs = []
    for seed in range(seeds):
        for planned in plan_runs(prior, budgets, transfer_prior):
            name = run_name(planned, seed, base.get("method", "byol"))
            load_before = os.getloadavg()[0]
            if planned.method == "untrained":
                row = untrained_row(quietly(name, evaluate_untrained, run_config(name, seed=seed)))
            else:
                cfg = run_config(name, prior=planned.prior, budget=planned.budget, seed=seed)
                row = trained_row(quietly(name, run, cfg), Path(cfg.out), planned.method)
            row = {"run": name, "method": planned.method, "budget": planned.budget, "seed": seed,
                   "prior": planned.prior, **row,
                   # Other work on a shared machine shows here first: the 1-minute load around the run.
                   "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}
            runs.append(row)
            print(f"  {name}: {row['wall_clock_s']:.1f}s (training clock {row['training_clock_s']:.1f}s, bank "
                  f"{row['target_bank_s']:.1f}s), {row['train_steps']} steps, {row['images_seen']} images, linear "
                  f"probe {row['linear_probe_top1']:.2f}%, kNN {row['knn_top1']:.2f}%", flush=True)
    return runs


def trained_row(summary: dict, run_dir: Path, method: str) -> dict:
    end = summary["rela_phase_end_step"]
    return {"wall_clock_s": summary["wall_clock_s"],
            # the run without its kNN monitor: bank, training and evaluation
            "training_clock_s": summary["wall_clock_s"] - summary["monitor_s"], "monitor_s": summary["monitor_s"],
            "target_bank_s": summary["target_bank_s"], "eval_s": summary.get("eval_s"),
            "train_steps": summary["train_steps"], "images_seen": summary["images_seen"],
            "rela_phase_end_step": end, "rela_phase_ended_by": summary.get("rela_phase_ended_by"),
            # Steps spent in the RELA phase: all of them when the phase never ended.
            "rela_phase_fraction": 0.0 if method == "byol" else (1.0 if end is None else end / summary["train_steps"]),
            "linear_probe_top1": summary["linear_probe_top1"], "knn_top1": summary["knn_top1"],
            "linear_probe_top1_std": summary.get("linear_probe_top1_std"),
            "probe_protocol": summary.get("probe_protocol"), "monitor": monitor_curve(run_dir)}


def untrained_row(results: dict) -> dict:
    """The untrained backbone's wall-clock is its evaluation alone (eval_s), which every trained run's
    wall-clock also holds: no bank, no training step, no monitor."""
    return {"wall_clock_s": results["eval_s"], "training_clock_s": results["eval_s"], "monitor_s": 0.0,
            "target_bank_s": 0.0, "eval_s": results["eval_s"], "train_steps": 0, "images_seen": 0,
            "rela_phase_end_step": None, "rela_phase_ended_by": None, "rela_phase_fraction": 0.0,
            "linear_probe_top1": results["linear_probe_top1"], "knn_top1": results["knn_top1"],
            "linear_probe_top1_std": results.get("linear_probe_top1_std"),
            "probe_protocol": results.get("probe_protocol"), "monitor": []}


def budget_label(budget: float) -> str:
    return f"{100 * budget:g}%"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_interval(deltas: list[float], level: float = 0.95) -> list[float] | None:
    """The t-interval of the mean of paired differences (n-1 degrees of freedom); None for one pair."""
    if len(deltas) < 2:
        return None
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency of the package

    mean, std = mean_std(deltas)
    half = t.ppf(0.5 + level / 2, len(deltas) - 1) * std / math.sqrt(len(deltas))
    return [float(mean - half), float(mean + half)]


def interval_text(interval: list[float] | None) -> str:
    return "n/a (1 seed)" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def time_to_target(curve: list[list[float]], target: float) -> float | None:
    """The first training clock (s) at which the monitor's kNN reached the target; None when it never did.
    The monitor runs at epoch ends (or every --monitor-every steps), so this is the first such point."""
    return next((clock for clock, accuracy, _ in curve if accuracy >= target), None)


def median_time(times: list[float | None]) -> float | None:
    """The median over seeds, a seed that never reached the target counting as infinitely slow: None when
    half or more never did."""
    median = statistics.median([math.inf if t is None else t for t in times])
    return None if math.isinf(median) else median


def summarise_runs(runs: list[dict], target_drop_pp: float, ssl: str = "byol") -> tuple[list[dict], dict]:
    """Per (method, budget): the mean and std over seeds and every seed's number; the difference to
    BYOL-100% paired by seed with its mean and 95% t-interval; the wall-clock ratio; the time to reach
    BYOL-100%'s mean final monitor kNN minus `target_drop_pp` points. Returns (groups, time-to-target)."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    reference = groups[("byol", 1.0)]
    reference_by_seed = {r["seed"]: r for r in reference}
    finals = [r["monitor"][-1][1] for r in reference if r["monitor"]]
    target = statistics.fmean(finals) - target_drop_pp if finals else None
    for r in runs:
        r["time_to_target_s"] = None if target is None else time_to_target(r["monitor"], target)
    reference_time = median_time([r["time_to_target_s"] for r in reference])
    table = []
    for (method, budget), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"group": group_label(method, budget, ssl), "method": method, "budget": budget, "prior": rs[0]["prior"],
               "seeds": len(rs), "seed_ids": [r["seed"] for r in rs]}
        for key in ("linear_probe_top1", "knn_top1", "wall_clock_s", "training_clock_s"):
            values = [r[key] for r in rs]
            row[key], row[key + "_std"] = mean_std(values)
            row[key + "_per_seed"] = values
        for key in ("target_bank_s", "train_steps", "images_seen", "rela_phase_fraction"):
            row[key] = statistics.fmean(r[key] for r in rs)
        row["wall_clock_s_median"] = statistics.median(row["wall_clock_s_per_seed"])
        for key, short in (("linear_probe_top1", "linear"), ("knn_top1", "knn")):
            deltas = [r[key] - reference_by_seed[r["seed"]][key] for r in rs]
            row[f"{short}_delta_per_seed"] = deltas
            row[f"{short}_delta"] = statistics.fmean(deltas)
            row[f"{short}_delta_ci95"] = paired_interval(deltas)
        ratios = [r["wall_clock_s"] / reference_by_seed[r["seed"]]["wall_clock_s"] for r in rs]
        row["wall_clock_ratio_per_seed"] = ratios
        row["wall_clock_ratio"] = row["wall_clock_s"] / statistics.fmean(r["wall_clock_s"] for r in reference)
        # Robust to one run slowed by other work on a shared machine; equal to the above when runs agree.
        row["wall_clock_ratio_of_medians"] = row["wall_clock_s_median"] / statistics.median(
            r["wall_clock_s"] for r in reference)
        times = [r["time_to_target_s"] for r in rs]
        row["time_to_target_s_per_seed"] = times
        row["time_to_target_s"] = None if method == "untrained" else median_time(times)
        row["reached_target"] = sum(t is not None for t in times)
        row["time_to_target_ratio"] = (None if row["time_to_target_s"] is None or not reference_time
                                       else row["time_to_target_s"] / reference_time)
        table.append(row)
    order = {"byol": 0, "rela": 1, "rela-transfer": 2, "untrained": 3}
    table.sort(key=lambda row: (order[row["method"]], -(row["budget"] or 0.0)))
    return table, {"target_knn_top1": target, "target_drop_pp": target_drop_pp,
                   "target_source": f"{kind_labels(ssl)['byol']}-100%'s mean final monitor kNN over {len(finals)} seed(s) minus "
                                    f"{target_drop_pp:g} points",
                   "reference_time_s": reference_time,
                   "clock": "training_clock_s: the run's clock (target bank included) without the monitor's time"}


def wall_clock_spread_warning(table: list[dict]) -> str | None:
    """A run whose wall-clock strays far from its seeds' median was most likely slowed by other work."""
    trained = [r for r in table if r["method"] != "untrained"]
    spread = max(r["wall_clock_s_std"] / r["wall_clock_s_median"] for r in trained)
    if spread < 0.25:
        return None
    worst = max(trained, key=lambda r: r["wall_clock_s_std"] / r["wall_clock_s_median"])
    return (f"warning: {worst['group']}'s wall-clock varies by {100 * spread:.0f}% (std/median) over seeds, most "
            f"likely other work on the machine (see load_1min_before/after per run); compare "
            f"wall_clock_ratio_of_medians")


def headline(table: list[dict], ttt: dict, tolerance_pp: float, claim_budget: float = 0.2, ssl: str = "byol"
             ) -> list[str]:
    """The claim, tested as stated: RELA at `claim_budget` within `tolerance_pp` points of BYOL-100% at under
    half its wall-clock; in linear probe, kNN and time-to-target. Says so plainly when it is not met, and
    puts BYOL at the same budget beside it (RELA must beat simply training less)."""
    labels = kind_labels(ssl)
    ssl_name, rela_name = labels["byol"], labels["rela"]
    rows = {(r["method"], r["budget"]): r for r in table}
    rela = rows.get(("rela", claim_budget))
    if rela is None:
        return [f"claim not tested: no {rela_name} run at {budget_label(claim_budget)} (--budgets)"]
    byol = rows[("byol", 1.0)]
    lines = []
    for key, short, name in (("linear_probe_top1", "linear", "linear probe"), ("knn_top1", "knn", "kNN")):
        close = rela[f"{short}_delta"] >= -tolerance_pp
        fast = rela["wall_clock_ratio"] < 0.5
        verdict = "MET" if close and fast else "NOT MET"
        lines.append(
            f"claim ({name}) {verdict}: {rela_name} {budget_label(claim_budget)} {rela[key]:.2f} ± {rela[key + '_std']:.2f}% "
            f"vs {ssl_name}-100% {byol[key]:.2f} ± {byol[key + '_std']:.2f}%, delta {rela[f'{short}_delta']:+.2f} points "
            f"(95% paired CI {interval_text(rela[f'{short}_delta_ci95'])}; {'within' if close else 'NOT within'} "
            f"{tolerance_pp:g}), wall-clock {rela['wall_clock_ratio']:.2f}x {ssl_name}-100%'s "
            f"({'under' if fast else 'NOT under'} half), {rela['seeds']} seed(s)")
    target = ttt["target_knn_top1"]
    if target is None:
        lines.append("claim (time-to-target) not tested: the runs logged no kNN monitor")
    else:
        ratio = rela["time_to_target_ratio"]
        met = ratio is not None and ratio < 0.5
        reached = f"{rela['reached_target']}/{rela['seeds']} seeds reached it"
        if rela["time_to_target_s"] is None:
            how = f"median time not reached ({reached})"
        else:
            how = (f"median {rela['time_to_target_s']:.1f}s ({reached}) vs {ssl_name}-100%'s "
                   + ("never" if ttt["reference_time_s"] is None else f"{ttt['reference_time_s']:.1f}s")
                   + ("" if ratio is None else f", {ratio:.2f}x"))
        lines.append(f"claim (time-to-target) {'MET' if met else 'NOT MET'}: {rela_name} {budget_label(claim_budget)} to "
                     f"monitor kNN >= {target:.2f}% ({ttt['target_source']}): {how}; under half needed")
    same_budget = rows.get(("byol", claim_budget))
    if same_budget is not None:
        gain = rela["linear_probe_top1"] - same_budget["linear_probe_top1"]
        lines.append(
            f"baseline {ssl_name} {budget_label(claim_budget)}: linear {same_budget['linear_probe_top1']:.2f}% (delta "
            f"{same_budget['linear_delta']:+.2f}), kNN {same_budget['knn_top1']:.2f}% (delta "
            f"{same_budget['knn_delta']:+.2f}), wall-clock {same_budget['wall_clock_ratio']:.2f}x; {rela_name} minus {ssl_name} "
            f"at {budget_label(claim_budget)}: linear {gain:+.2f}, "
            f"kNN {rela['knn_top1'] - same_budget['knn_top1']:+.2f} points")
    transfer = rows.get(("rela-transfer", claim_budget))
    if transfer is not None:
        lines.append(
            f"{labels['rela-transfer']} {budget_label(claim_budget)} (prior {transfer_prior_of(table)}): linear "
            f"{transfer['linear_probe_top1']:.2f}% (delta {transfer['linear_delta']:+.2f}, "
            f"{interval_text(transfer['linear_delta_ci95'])}), kNN {transfer['knn_top1']:.2f}% (delta "
            f"{transfer['knn_delta']:+.2f}), wall-clock {transfer['wall_clock_ratio']:.2f}x")
    untrained = rows.get(("untrained", None))
    if untrained is not None:
        lines.append(f"baseline untrained backbone: linear {untrained['linear_probe_top1']:.2f}%, kNN "
                     f"{untrained['knn_top1']:.2f}%")
        for key, name in (("linear_probe_top1", "linear probe"), ("knn_top1", "kNN")):
            if untrained[key] >= rela[key] - tolerance_pp:
                lines.append(f"caution: the untrained backbone's {name} ({untrained[key]:.2f}%) is within "
                             f"{tolerance_pp:g} points of {rela_name} {budget_label(claim_budget)}'s or above it "
                             f"({rela[key]:.2f}%): in {name} these runs show no learning to compare")
    return lines


def transfer_prior_of(table: list[dict]) -> str:
    return next((r["prior"] for r in table if r["method"] == "rela-transfer"), "-")


def summary_display(table: list[dict]) -> list[dict]:
    """The summary as the terminal shows it: mean ± std, every seed's number, paired deltas with intervals."""
    def seeds(values: list) -> str:
        return " ".join("-" if v is None else f"{v:.1f}" for v in values)

    out = []
    for r in table:
        out.append({
            "group": r["group"], "seeds": r["seeds"],
            "linear": f"{r['linear_probe_top1']:.2f} ± {r['linear_probe_top1_std']:.2f}",
            "linear_per_seed": seeds(r["linear_probe_top1_per_seed"]),
            "linear_delta [95% CI]": f"{r['linear_delta']:+.2f} {interval_text(r['linear_delta_ci95'])}",
            "knn": f"{r['knn_top1']:.2f} ± {r['knn_top1_std']:.2f}", "knn_per_seed": seeds(r["knn_top1_per_seed"]),
            "knn_delta [95% CI]": f"{r['knn_delta']:+.2f} {interval_text(r['knn_delta_ci95'])}",
            "wall_clock_s": f"{r['wall_clock_s']:.1f} ± {r['wall_clock_s_std']:.1f}",
            "wall_clock_ratio": r["wall_clock_ratio"], "wall_clock_ratio_of_medians": r["wall_clock_ratio_of_medians"],
            "time_to_target_s": r["time_to_target_s"],
            "reached": "-" if r["method"] == "untrained" else f"{r['reached_target']}/{r['seeds']}",
            "time_to_target_ratio": r["time_to_target_ratio"]})
    return out


# ---------------------------------------------------------------------------------------------------------
# 4. Projection to ImageNet-1K, ResNet-50, 8 GPUs
# ---------------------------------------------------------------------------------------------------------

def project_imagenet(step_rows: list[dict], setup: StepSetup, fused: str, rela_fraction: dict[float, float],
                     *, epochs: int, gpus: int, images: int = IMAGENET_TRAIN_IMAGES) -> dict:
    """Days of a BYOL-100% run and of RELA at each budget, from the measured per-device images/s.

    RELA at budget b trains epochs x b x images, a fraction f of its steps in the RELA phase (at the RELA
    step's rate) and the rest as BYOL, plus a bank: one prior forward per image, sharded over the GPUs.
    """
    ips = {r["step"]: r["images_per_s"] for r in step_rows
           if r["setup"] == setup.label and r["fused"] in (fused, "-") and r["images_per_s"]}
    scale = (PROJECTION_SIZE / setup.image_size) ** 2  # conv cost grows with pixels; heads are small
    byol, rela, prior = (ips[k] / scale for k in ("byol", "rela", "prior forward"))
    byol_s = epochs * images / (byol * gpus)
    rows = [{"run": "byol-100%", "budget": 1.0, "rela_phase_fraction": 0.0, "images_trained": epochs * images,
             "bank_hours": 0.0, "hours": byol_s / 3600, "ratio_to_byol": 1.0}]
    bank_s = images / (prior * gpus)
    for budget, f in sorted(rela_fraction.items()):
        trained = epochs * budget * images
        seconds = trained * (f / rela + (1 - f) / byol) / gpus + bank_s
        rows.append({"run": f"rela-{budget_label(budget)}", "budget": budget, "rela_phase_fraction": f,
                     "images_trained": trained, "bank_hours": bank_s / 3600, "hours": seconds / 3600,
                     "ratio_to_byol": seconds / byol_s})
    measured_at = f"{setup.arch} {setup.image_size} px batch {setup.batch_size} {setup.precision}, fused {fused}"
    basis = (f"measured at {measured_at} on this device" if scale == 1 else
             f"measured at {measured_at} on this device, scaled by pixel count x{scale:.3g} to {PROJECTION_SIZE} px")
    return {"what": f"PROJECTION (not a measurement): ImageNet-1K ({images} images), {epochs} epochs, ResNet-50 at "
                    f"{PROJECTION_SIZE} px on {gpus} of this device, perfect scaling, no data or communication "
                    f"stalls; per-device images/s {basis}",
            "per_device_images_per_s": {"byol": byol, "rela": rela, "prior_forward": prior},
            "epochs": epochs, "gpus": gpus, "images": images, "rows": rows}


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------

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


def plan_setups(args: argparse.Namespace, cfg: Config, num_classes: int, device: torch.device
                ) -> tuple[list[StepSetup], StepSetup]:
    """The dataset's setup, the h100 preset's, and the ResNet-50 the projection is made from."""
    setups = [setup_from_config(cfg.dataset, cfg, args.precision, device, num_classes)]
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = ["images/s counts dataset images; each is two augmented views in BYOL and RELA steps, one in the "
             "supervised step",
             "steps run on synthetic batches resident on the device (no loader); the loader is timed on its own"]
    if "e2e" not in args.skip:
        notes.append("wall_clock_s is the trainer's: target bank (fresh folder per run) + training + evaluation")
    if not cuda:
        notes.append("fused ops on: not timed on the CPU (Triton's interpreter would run); the trainer uses the "
                     "pure-torch references there")
        notes.append("on the CPU the loader and the step share the cores: a run goes at about 1/(1/loader + 1/step)")

    # The dataset's configuration: preset, then what was given here. --steps-only: the imagenet preset's.
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
    if args.steps_only:
        projection_setup = setup_from_config(f"{cfg.arch}-{cfg.image_size}px", cfg, args.precision, device, 1000)
        setups = [projection_setup]
    else:
        setups, projection_setup = plan_setups(args, cfg, splits.num_classes, device)
    payload = {"benchmark": "throughput", "environment": environment(device), "quick": args.quick,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "config": asdict(cfg), "notes": notes, "torch_threads": torch.get_num_threads(),
               # On a shared machine other work changes every number here; the load says how much there was.
               "load_average_start": list(os.getloadavg())}
    data = "synthetic batches only" if splits is None else f"{cfg.dataset} ({len(splits.train)} train images)"
    print(f"throughput benchmark on {payload['environment']['device']}; {data}, {cfg.arch} {cfg.image_size} px batch "
          f"{cfg.batch_size} {args.precision}{' channels_last' if cuda else ''}"
          f"{f', compiled ({cfg.compile_backend})' if setups[0].compile else ''}", flush=True)

    seconds, started = {}, time.perf_counter()

    def section_done(name: str) -> None:
        nonlocal started
        seconds[name] = time.perf_counter() - started
        started = time.perf_counter()

    # 1. Step throughput
    step_rows = []
    for setup in setups:
        print(f"timing steps: {setup.label} ({setup.arch} {setup.image_size} px batch {setup.batch_size} "
              f"{setup.precision})", flush=True)
        step_rows += time_steps(setup, device, warmup=args.step_warmup, rounds=args.step_rounds,
                                repeats=args.step_repeats)
    ratios = step_ratios(step_rows)
    method_rows = []
    if args.methods:
        print(f"timing each method's step against the RELA-phase step: {', '.join(args.methods)}", flush=True)
        method_rows = time_method_steps(setups[0], cfg, device, args.methods, warmup=args.step_warmup,
                                        rounds=args.step_rounds, repeats=args.step_repeats)
    payload["step"] = {"setups": [asdict(s) for s in setups], "rows": step_rows, "ratios": ratios, "methods": method_rows,
                       "like_for_like": like_for_like(step_rows, device),
                       "goals": {"rela_over_byol": 1.3, "byol_over_supervised": 0.35,
                                 "byol_over_supervised_parity": BYOL_PARITY}}
    trainer_fused = "on" if fused_skip_reason(device) is None else "off"
    section_done("step")

    # Loader
    if "loader" not in args.skip:
        print("timing the loader", flush=True)
        loader_rows = time_loaders(cfg, device, args.precision, warmup=2, repeats=5 if args.quick else 10)
        payload["loader"] = {"rows": bottlenecks(loader_rows, step_rows, setups[0].label, trainer_fused)}
        section_done("loader")

    # 2. Target bank
    if "bank" not in args.skip:
        print(f"timing the target bank ({args.bank_builds} fresh build(s), prior {cfg.prior})", flush=True)
        payload["target_bank"] = time_bank(cfg, device, args.bank_builds)
        section_done("bank")

    # 3. End to end
    if "e2e" not in args.skip:
        plan = plan_runs(args.prior, args.budgets, args.transfer_prior)
        print(f"end-to-end runs per seed: {', '.join(group_label(*p.group, args.method) for p in plan)}; {args.seeds} seed(s), "
              f"{cfg.epochs} epochs, recipe {cfg.recipe}", flush=True)
        base = {k: v for k, v in given.items() if k != "prior"}
        with tempfile.TemporaryDirectory(prefix="rela-throughput-") as work_dir:
            runs = end_to_end(base, prior=args.prior, budgets=args.budgets, seeds=args.seeds, work_dir=Path(work_dir),
                              transfer_prior=args.transfer_prior)
        table, ttt = summarise_runs(runs, args.target_drop_pp, args.method)
        payload["end_to_end"] = {"recipe": cfg.recipe, "method": args.method, "prior": args.prior,
                                 "transfer_prior": args.transfer_prior,
                                 "plan": [asdict(p) for p in plan], "runs": runs, "summary": table,
                                 "time_to_target": ttt, "headline": headline(table, ttt, args.tolerance_pp, ssl=args.method),
                                 "warning": wall_clock_spread_warning(table)}
        if "target_bank" in payload:
            rela_runs = [r for r in runs if r["method"] == "rela"]
            payload["target_bank"]["in_runs_seconds_mean"] = statistics.fmean(r["target_bank_s"] for r in rela_runs)
        section_done("e2e")

    # 4. Projection
    if "projection" not in args.skip:
        if args.projection_rela_fraction is not None:
            fractions = {b: args.projection_rela_fraction for b in args.budgets}
            source = "--projection-rela-fraction"
        elif "end_to_end" in payload:
            fractions = {b: statistics.fmean(r["rela_phase_fraction"] for r in payload["end_to_end"]["runs"]
                                             if r["method"] == "rela" and r["budget"] == b) for b in args.budgets}
            source = "measured in this run's end-to-end RELA runs at each budget"
        else:
            fractions, source = {b: 1.0 for b in args.budgets}, "assumed 1.0 (no end-to-end runs)"
        payload["projection"] = project_imagenet(step_rows, projection_setup, trainer_fused, fractions,
                                                 epochs=args.projection_epochs, gpus=args.projection_gpus)
        payload["projection"]["rela_phase_fraction_source"] = source

    payload["benchmark_seconds"] = seconds
    payload["load_average_end"] = list(os.getloadavg())
    report(payload)
    if args.out is not None:
        path = write_json(args.out / f"{args.name}.json", payload)
        print(f"wrote {path}")
        if "end_to_end" in payload:
            from benchmarks.throughput_plot import plot_time_to_accuracy
            e2e = payload["end_to_end"]
            png = plot_time_to_accuracy(e2e["runs"], e2e["summary"], e2e["time_to_target"],
                                        args.out / f"{args.name}.png",
                                        title=f"{kind_labels(args.method)['byol']}: {cfg.dataset}, {cfg.arch}, "
                                              f"{cfg.epochs} epochs, recipe {cfg.recipe}, "
                                              f"{payload['environment']['device']}",
                                        tolerance_pp=args.tolerance_pp)
            print(f"wrote {png}")
    return payload


def report(payload: dict) -> None:
    print("\n== step throughput (images/s; synthetic batches on the device) ==")
    print_table(payload["step"]["rows"], ["setup", "step", "fused", "arch", "batch", "size", "precision",
                                          "channels_last", "compiled", "images_per_s", "median_ms", "p10_ms",
                                          "p90_ms", "rounds", "note"])
    for check in payload["step"]["like_for_like"]:
        train, prior = check["train_steps"], check["prior_forward"]
        print(f"{check['setup']}: supervised, BYOL and RELA steps "
              + (f"alike ({train['settings']})" if train["same"] else "NOT alike (see the rows)")
              + f"; prior forward {prior['settings']} "
              + ("as the target bank runs" if prior["same"] else f"NOT as the target bank runs ({prior['target_bank']})"))
    print("\n== step ratios (goals: RELA/BYOL >= 1.3; BYOL/supervised >= 0.35, parity 0.375) ==")
    print_table(payload["step"]["ratios"], ["setup", "fused", "rela_over_byol", "byol_over_supervised",
                                            "byol_images_per_s", "rela_images_per_s", "supervised_images_per_s"])
    if payload["step"]["methods"]:
        print("\n== each method's own step against the RELA-phase step on its networks (images/s) ==")
        print_table(payload["step"]["methods"], ["setup", "method", "fused", "method_images_per_s", "rela_images_per_s",
                                                 "rela_over_method", "method_median_ms", "rela_median_ms"])
    if "loader" in payload:
        print("\n== loader vs step (images/s) ==")
        print_table(payload["loader"]["rows"], ["loader", "views", "batch", "size", "images_per_s", "step",
                                                "step_images_per_s", "bottleneck"])
    if "target_bank" in payload:
        bank = payload["target_bank"]
        print("\n== target bank (fresh build) ==")
        print_table([bank], ["prior", "arch", "prior_input_size", "images", "dim", "builds", "seconds",
                             "seconds_per_1000_images", "images_per_s", "in_runs_seconds_mean"])
    if "end_to_end" in payload:
        e2e = payload["end_to_end"]
        print(f"\n== end-to-end runs, recipe {e2e['recipe']} (wall_clock_s includes the target bank and the "
              f"evaluation; training_clock_s is it without the kNN monitor; untrained: its evaluation alone) ==")
        print_table(e2e["runs"], ["run", "prior", "wall_clock_s", "training_clock_s", "target_bank_s", "eval_s",
                                  "train_steps", "images_seen", "rela_phase_end_step", "rela_phase_ended_by",
                                  "linear_probe_top1", "knn_top1", "time_to_target_s", "load_1min_before",
                                  "load_1min_after"])
        ttt = e2e["time_to_target"]
        target = "-" if ttt["target_knn_top1"] is None else f"{ttt['target_knn_top1']:.2f}%"
        print(f"\n== wall-clock saving against honest baselines (mean ± std over seeds, every seed; deltas to "
              f"{kind_labels(e2e.get('method', 'byol'))['byol']}-100% paired by seed; time to monitor kNN {target}, the median over seeds) ==")
        print_table(summary_display(e2e["summary"]),
                    ["group", "seeds", "linear", "linear_per_seed", "linear_delta [95% CI]", "knn", "knn_per_seed",
                     "knn_delta [95% CI]", "wall_clock_s", "wall_clock_ratio", "wall_clock_ratio_of_medians",
                     "time_to_target_s", "reached", "time_to_target_ratio"])
        for line in e2e["headline"]:
            print(line)
        if e2e["warning"]:
            print(e2e["warning"])
    if "projection" in payload:
        projection = payload["projection"]
        print(f"\n== {projection['what']}; RELA-phase fraction {projection['rela_phase_fraction_source']} ==")
        print_table(projection["rows"], ["run", "budget", "rela_phase_fraction", "images_trained", "bank_hours",
                                         "hours", "ratio_to_byol"])
    print("\nbenchmark sections took " + ", ".join(f"{k} {v:.0f}s" for k, v in payload["benchmark_seconds"].items()))
    print(f"torch threads {payload['torch_threads']}; load average (1, 5, 15 min) at start "
          f"{', '.join(f'{x:.1f}' for x in payload['load_average_start'])}, at end "
          f"{', '.join(f'{x:.1f}' for x in payload['load_average_end'])}")
    for note in payload["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
