"""All options in one dataclass, with their help, choices and bounds; the presets per dataset (or `--preset`)
and the reference recipe that fill what the user did not set. rela/options.py generates the command line from
the dataclass and applies these layers."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from rela.errors import RelaError


def opt(default: Any, help: str, choices: tuple | None = None, bounds: str | None = None) -> Any:
    """An option. `bounds`: the interval a numeric option's value must lie in, as "[1, inf)" or "(0, 1]"
    (NaN and inf are never inside); every int and float option declares one, and `check_bounds` checks them
    all after parsing, whether the value came from a flag, a config file or a preset."""
    return field(default=default, metadata={"help": help, "choices": choices,
                                            "bounds": Bounds.parse(bounds) if bounds else None})


@dataclass(frozen=True)
class Bounds:
    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> "Bounds":
        low, high = (float(part) for part in text[1:-1].split(","))
        return cls(low, high, text[0] == "(", text[-1] == ")")

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self, kind: type) -> str:
        """"a finite number > 0", "an integer in [0, 256]"."""
        what = "an integer" if kind is int else "a finite number"
        show = (lambda x: str(int(x))) if kind is int else (lambda x: f"{x:g}")
        if math.isinf(self.high):
            return f"{what} {'>' if self.low_open else '>='} {show(self.low)}"
        return (f"{what} in {'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}"
                f"{')' if self.high_open else ']'}")


# --method's values; each names a module of rela/methods/ (rela.methods.registry checks the two agree).
METHOD_NAMES = ("byol", "dino", "simclr", "mocov3", "barlowtwins", "vicreg", "simsiam", "supervised")

@dataclass
class Config:
    # What to train on
    dataset: str = opt("mnist5k", "dataset", ("digits", "mnist5k", "cifar10", "cifar100", "imagefolder"))
    data: str | None = opt(None, "data folder (CIFAR batches, or an ImageFolder tree with optional train/ and val/)")
    preset: str | None = opt(None, "option preset (defaults to the dataset's; 'imagenet' for ImageNet-1K scale)",
                             ("digits", "mnist5k", "cifar10", "cifar100", "imagefolder", "imagenet"))
    recipe: str = opt("project", "'reference' takes every choice of the reference code (LINs-lab/ReLA) that the "
                                 "options below can express; each is also an option of its own (README: Differences "
                                 "from the reference code)", ("project", "reference"))
    image_size: int = opt(224, "training crop size in pixels", bounds='[1, 4096]')
    val_fraction: float = opt(0.2, "held-out fraction for validation when the data has no val split", bounds='(0, 1)')
    skip_corrupt: bool = opt(False, "skip images that fail to decode (and report how many) instead of stopping")
    norm_stats: str = opt("dataset", "mean and std that normalise the views, the prior's input (rand priors) and "
                                     "evaluation: the dataset's own, or ImageNet's at every dataset (the reference's)",
                          ("dataset", "imagenet"))
    # What to train
    arch: str = opt("resnet50", "backbone: resnet18, resnet50, resnet18_cifar, resnet50_cifar, small_resnet, or "
                                "timm:NAME (any timm model, randomly initialised; pip install timm)")
    method: str = opt("byol", "self-supervised method of the phase after RELA (rela/methods/; each brings its "
                              "own heads, loss, teacher, views and defaults)", METHOD_NAMES)
    proj_hidden: int = opt(4096, "projector/predictor hidden width (0: twice the backbone's width, the reference's)",
                           bounds='[0, inf)')
    proj_dim: int = opt(256, "projection width (DINO: the head's bottleneck)", bounds='[1, inf)')
    # The methods' own options (their per-preset defaults are in their modules, over the dataset preset)
    temperature: float = opt(0.2, "SimCLR's and MoCo v3's softmax temperature", bounds='(0, inf)')
    dino_out_dim: int = opt(65536, "DINO: output width K of the head (prototypes)", bounds='[1, inf)')
    dino_student_temp: float = opt(0.1, "DINO: student softmax temperature", bounds='(0, inf)')
    dino_teacher_temp: float = opt(0.07, "DINO: teacher softmax temperature after the warm-up", bounds='(0, inf)')
    dino_warmup_teacher_temp: float = opt(0.04, "DINO: teacher temperature at the start of the warm-up",
                                          bounds='(0, inf)')
    dino_warmup_teacher_epochs: float = opt(30.0, "DINO: epochs of the teacher temperature's linear warm-up",
                                            bounds='[0, inf)')
    dino_center_momentum: float = opt(0.9, "DINO: momentum of the teacher-output centre", bounds='[0, 1]')
    dino_head_layers: int = opt(3, "DINO: linear layers of the head's MLP before the prototypes (3: the paper's; "
                                   "2: the reference code's)", bounds='[1, inf)')
    dino_head_bn: bool = opt(False, "DINO: BatchNorm after each hidden layer of the head (the reference code's)")
    barlow_lambda: float = opt(0.0051, "Barlow Twins: weight of the off-diagonal (redundancy) terms", bounds='[0, inf)')
    vicreg_sim_weight: float = opt(25.0, "VICReg: weight of the invariance (MSE) term", bounds='[0, inf)')
    vicreg_var_weight: float = opt(25.0, "VICReg: weight of the variance (std hinge) term", bounds='[0, inf)')
    vicreg_cov_weight: float = opt(1.0, "VICReg: weight of the covariance term", bounds='[0, inf)')
    # RELA
    prior: str = opt("rand", "prior: none | rand | torchvision:NAME[:WEIGHTS.pth] | timm:NAME[:WEIGHTS.safetensors|.pth] "
                             "| torchscript:PATH | run:DIR")
    prior_size: int | None = opt(None, "prior input size (default: 224 for torchvision/torchscript priors, "
                                       "the training size for rand, the run's size for run:)", bounds='[1, 4096]')
    prior_seed: int | None = opt(None, "seed of a randomly initialised prior (default: --seed, so that --prior rand "
                                       "is the student's own initial network, as in the reference code)",
                                       bounds='[0, 2147483647]')
    rela_phase: str = opt("adaptive", "end of the RELA phase: 'adaptive' (loss plateau) or a fraction of "
                                      "the training steps, e.g. 0.3")
    rela_threshold: float = opt(0.995, "adaptive rule: end when rho = exp(-max(slow - fast, 0)) >= this",
                                bounds='(0, 1]')
    rela_averaging_scale: float = opt(1.0, "adaptive rule: shorten the fast and slow averages' memory this many times "
                                           "(decays 1 - S*0.001 and 1 - S*0.01; 1 is the reference's) for short runs",
                                           bounds='(0, 99]')
    rela_train_map: bool = opt(False, "train the linear map W from features to targets (fixed random by default)")
    rela_map_bias: bool = opt(False, "give W a bias (an affine map, nn.Linear's initialisation, as in the reference)")
    handover: str = opt("linear", "how the RELA loss hands over to the method's, L = lambda L_rela + (1 - lambda) "
                                  "L_method: 'linear' (1 -> 0 over --handover-steps steps after the RELA phase ends; "
                                  "the default: on BYOL it keeps what the RELA phase taught, README results), 'hard' "
                                  "(lambda 1 -> 0 at once, the reference's), 'rho' (in the RELA phase, lambda falls "
                                  "from 1 at rho = --handover-rho-start to 0 at --rela-threshold)",
                        ("linear", "hard", "rho"))
    handover_steps: int | None = opt(None, "--handover linear: steps over which lambda falls to 0 (default: a tenth "
                                           "of the run's steps)", bounds='[1, inf)')
    handover_rho_start: float = opt(0.9, "--handover rho: the rho at which the method's loss starts to mix in",
                                    bounds='(0, 1)')
    handover_teacher_reset: bool = opt(True, "at the hand-over, set the method's EMA teacher to the student's weights "
                                             "(--no-handover-teacher-reset keeps the teacher, as the reference does)")
    rela_views: str = opt("project", "RELA's views: 'project' (crop 0.25-1, flip, light jitter p=0.3) or "
                                     "'reference' (crop 0.5-1, flip, jitter 0.8/0.8/0.8/0.2 p=0.8, grayscale p=0.2)",
                          ("project", "reference"))
    rela_crop_min_scale: float | None = opt(None, "smallest random-crop scale of RELA's views (default: the "
                                                  "views' own, 0.25 project, 0.5 reference)", bounds='(0, 1]')
    byol_crop_min_scale: float | None = opt(None, "smallest random-crop scale of the SSL method's views (default: the "
                                                  "method's own, 0.08 for BYOL)", bounds='(0, 1]')
    byol_blur: bool = opt(True, "Gaussian blur in the SSL method's views (the reference leaves it out of BYOL's on 32 px "
                                "CIFAR)")
    bank_dir: str = opt(".rela_cache", "folder for target banks, keyed by dataset, prior and preprocessing")
    target_bank: str | None = opt(None, "use this target bank file (error if its key or shape does not match)")
    bank_batch_size: int = opt(256, "batch size of the prior's pass over the training set", bounds='[1, inf)')
    bank_crop_fraction: float | None = opt(None, "centre fraction of each image the prior sees, resized to its input "
                                                 "(default: evaluation's, 1 for in-memory datasets and 0.875 for "
                                                 "files; 1: the whole frame, the reference's)", bounds='(0, 1]')
    prior_precision: str = opt("auto", "precision of the prior's pass (auto: bf16 autocast on CUDA, fp32 elsewhere; "
                                       "bf16 on a CPU is CPU autocast, slow; fp32 is the reference's); part of the "
                                       "bank's key", ("auto", "fp32", "bf16"))
    # Budget and schedule
    budget: float = opt(1.0, "fraction of the training set drawn afresh each epoch, in (0, 1]", bounds='(0, 1]')
    epochs: int = opt(100, "epochs (each over the budgeted subset)", bounds='[1, inf)')
    batch_size: int = opt(256, "global batch size (all ranks, all accumulation steps)", bounds='[1, inf)')
    grad_accum: int = opt(1, "gradient accumulation steps per optimiser step", bounds='[1, inf)')
    optimizer: str = opt("lars", "optimiser", ("adamw", "lars"))
    lr: float = opt(0.2, "learning rate per 256 images (scaled linearly with the batch size)", bounds='(0, inf)')
    weight_decay: float = opt(1.5e-6, "weight decay (not on biases and norm layers)", bounds='[0, inf)')
    warmup_epochs: float = opt(10.0, "linear warm-up epochs, then the --lr-schedule", bounds='[0, inf)')
    lr_schedule: str = opt("cosine", "learning rate after the warm-up: cosine decay to 0, or constant",
                           ("cosine", "constant"))
    base_momentum: float = opt(0.996, "EMA momentum of the target network at the start", bounds='[0, 1]')
    momentum_schedule: str = opt("cosine", "EMA momentum: cosine from --base-momentum to 1.0 (BYOL's), or constant",
                                 ("cosine", "constant"))
    # Evaluation
    knn_k: int = opt(20, "neighbours of the kNN classifier", bounds='[1, inf)')
    knn_temperature: float = opt(0.07, "temperature of the kNN classifier's votes", bounds='(0, inf)')
    probe_epochs: int = opt(100, "epochs of the offline linear probe on frozen features", bounds='[1, inf)')
    probe_protocol: str = opt("project", "linear probe: 'project' (standardised features, AdamW 1e-2 + cosine, "
                                         "final accuracy) or 'reference' (raw features, Adam 3e-4, mean and std of "
                                         "the last 3 epochs' accuracy)", ("project", "reference"))
    eval_batch_size: int = opt(256, "batch size of feature extraction", bounds='[1, inf)')
    monitor_every: int = opt(0, "kNN monitor on fixed subsets of the splits, logged with the time: every N steps "
                                "(0: at each epoch's end)", bounds='[0, inf)')
    monitor: bool = opt(True, "run the kNN monitor (its own time is reported apart: monitor_s)")
    monitor_size: int = opt(1000, "training images in the kNN monitor's memory bank (and half as many queries)",
                            bounds='[1, inf)')
    # Machinery
    seed: int = opt(0, "random seed", bounds='[0, 2147483647]')
    out: str | None = opt(None, "run folder: config.json, metrics.jsonl, checkpoints, summary.json "
                                "(default: runs/DATASET-DATE-TIME, a new one each run)")
    resume: str | None = opt(None, "'auto' to continue from the run folder's latest checkpoint, or a checkpoint path")
    dist_timeout: float = opt(1800.0, "seconds a torchrun collective (NCCL, gloo) waits for the slowest rank before "
                                      "failing (torch's NCCL default is 600: less than a rank may wait for a bank "
                                      "that another run is building)", bounds='(0, inf)')
    device: str = opt("auto", "device", ("auto", "cpu", "cuda"))
    precision: str = opt("auto", "training precision (auto: bf16 autocast on CUDA, fp32 on CPU)", ("auto", "fp32", "bf16"))
    channels_last: bool | None = opt(None, "channels_last memory format (default: on for CUDA)")
    compile: str = opt("auto", "torch.compile the backbones in place, after the EMA is prepared (auto: on for CUDA)",
                       ("auto", "on", "off"))
    compile_backend: str = opt("inductor", "torch.compile backend (e.g. aot_eager to debug a compile problem)")
    fused_ops: str = opt("auto", "Triton fused losses and EMA (auto: on for CUDA)", ("auto", "on", "off"))
    loader: str = opt("auto", "data loader (auto: dali where installed and on a GPU)", ("auto", "torch", "dali"))
    workers: int = opt(4, "decoding workers per rank (file datasets)", bounds='[0, 256]')
    sync_bn: bool | None = opt(None, "synchronise BatchNorm statistics across ranks (CUDA only; default: on under "
                                     "--recipe reference with more than one CUDA rank, as the reference, else off)")
    ckpt_every: int = opt(500, "checkpoint every N steps (and at each epoch end, unless --ckpt-minutes)",
                          bounds='[1, inf)')
    ckpt_minutes: float = opt(0.0, "also checkpoint when this many minutes have passed since the last one (rank 0's "
                                   "clock, read at logging steps), instead of at every epoch end (0: off)",
                                   bounds='[0, inf)')
    log_every: int = opt(20, "log metrics every N steps", bounds='[1, inf)')
    logger: str = opt("jsonl", "where metrics go, a comma list: jsonl (metrics.jsonl, always written), tensorboard "
                               "(also RUN/tensorboard/ events; pip install tensorboard)")
    curves: bool = opt(True, "write curves.png (losses, rho, schedules, throughput, kNN monitor) at the end of a run")
    stop_after_steps: int | None = opt(None, "stop (with a checkpoint) after this many steps, as if interrupted",
                                       bounds='[1, inf)')
    deterministic: bool = opt(False, "deterministic algorithms (slower; for exact resume checks)")
    progress: bool = opt(True, "show a progress bar on rank 0")


PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(arch="small_resnet", image_size=16, epochs=30, batch_size=64, optimizer="adamw", lr=2e-3,
                   weight_decay=1e-4, warmup_epochs=2, base_momentum=0.99, proj_hidden=512, proj_dim=128,
                   budget=0.2, workers=0, bank_batch_size=256, knn_k=20, probe_epochs=100, log_every=10,
                   ckpt_every=200),
    # The default job: 500 steps of real 28x28 digits at 16 px, under 3 minutes on 2 CPU cores. The rule's
    # averages are 5x shorter than the reference's (--rela-averaging-scale): with the reference's, a RELA loss
    # that levels off near 0.87 cannot end the phase before ~1,000 steps. Measured (seed 0, scale 5, the RELA
    # loss of a 500-step run): the rule fires at step ~160.
    "mnist5k": dict(arch="small_resnet", image_size=16, epochs=20, batch_size=32, optimizer="adamw", lr=4e-3,
                    weight_decay=1e-4, warmup_epochs=2, base_momentum=0.99, proj_hidden=512, proj_dim=128,
                    budget=0.2, workers=0, bank_batch_size=256, knn_k=20, probe_epochs=100, log_every=10,
                    ckpt_every=200, rela_averaging_scale=5.0, monitor_size=300, monitor_every=50),
    "cifar10": dict(arch="resnet18_cifar", image_size=32, epochs=200, batch_size=256, optimizer="adamw",
                    lr=1e-3, weight_decay=1e-4, warmup_epochs=10, base_momentum=0.99, proj_hidden=2048,
                    proj_dim=256, workers=0, knn_k=200),
    "imagefolder": dict(arch="resnet18", image_size=64, epochs=100, batch_size=256, optimizer="adamw",
                        lr=1e-3, weight_decay=1e-4, warmup_epochs=10, base_momentum=0.99, proj_hidden=2048,
                        proj_dim=256, knn_k=200),
    "imagenet": dict(arch="resnet50", image_size=224, epochs=100, batch_size=4096, optimizer="lars", lr=0.2,
                     weight_decay=1.5e-6, warmup_epochs=10, base_momentum=0.996, proj_hidden=4096,
                     proj_dim=256, knn_k=200, workers=8),
}
PRESETS["cifar100"] = PRESETS["cifar10"]

# The reference code's choices (LINs-lab/ReLA: main.py's defaults, methods/byol.py, boostor/rela.py,
# metrics/lineareval.py). Applied over the preset, under the user's own flags. Its lr is absolute (1e-3
# at any batch size): --lr is per 256 images here, so rela/options.py converts it (reference_recipe).
# Its SyncBatchNorm with more than one GPU depends on the ranks, not an option: rela/run.py's
# sync_batchnorm_wanted decides it from --recipe.
REFERENCE_RECIPE: dict[str, Any] = dict(
    optimizer="adamw", weight_decay=0.01, warmup_epochs=0.0, lr_schedule="constant", base_momentum=0.99,
    momentum_schedule="constant", proj_hidden=0, proj_dim=256, rela_map_bias=True, rela_views="reference",
    probe_protocol="reference", rela_averaging_scale=1.0, norm_stats="imagenet", bank_crop_fraction=1.0,
    prior_precision="fp32", handover="hard", handover_teacher_reset=False)
REFERENCE_LR = 1e-3


def value_type(hint: Any) -> Any:
    """What an option's value is when given: `int | None` -> int, `bool` -> bool."""
    given = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return given[0] if len(given) == 1 else hint


def numeric_options() -> dict[str, type]:
    """Config's int and float options (bools are not numbers here), by name: each declares its bounds."""
    hints = typing.get_type_hints(Config)
    return {f.name: value_type(hints[f.name]) for f in dataclasses.fields(Config)
            if value_type(hints[f.name]) in (int, float)}


def check_bounds(cfg: Config) -> None:
    """Every numeric option inside its declared bounds (NaN and inf never are), before any work is done:
    one line naming the first option that is not, e.g. "--lr must be a finite number > 0, got nan"."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for name, kind in numeric_options().items():
        value, bounds = getattr(cfg, name), fields[name].metadata["bounds"]
        if value is None:
            continue  # an optional option left to its default's rule
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
            raise RelaError(f"--{name.replace('_', '-')} must be {bounds.describe(kind)}, got {shorten(repr(value))}")
        if value not in bounds:
            raise RelaError(f"{flag} must be {bounds.describe(kind)}, got {value}")


def shorten(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters for a message: a user's value may be megabytes long."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def validate(cfg: Config) -> None:
    check_bounds(cfg)
    if cfg.rela_phase != "adaptive":
        try:
            fraction = float(cfg.rela_phase)
        except ValueError:
            raise RelaError(f"--rela-phase must be 'adaptive' or a fraction in (0, 1], got "
                            f"{shorten(repr(cfg.rela_phase))}") from None
        if not 0.0 < fraction <= 1.0:
            raise RelaError(f"--rela-phase fraction must be in (0, 1], got {fraction}")
    if cfg.handover == "rho" and cfg.handover_rho_start >= cfg.rela_threshold:
        raise RelaError(f"--handover-rho-start {cfg.handover_rho_start} must be below --rela-threshold "
                        f"{cfg.rela_threshold}: lambda falls from 1 at the one to 0 at the other")
    if not cfg.logger or not set(cfg.logger.replace(" ", "").split(",")) <= {"jsonl", "tensorboard"}:
        raise RelaError(f"--logger takes a comma list of jsonl, tensorboard; got {shorten(repr(cfg.logger))}")
    if cfg.resume not in (None, "auto") and not cfg.resume.endswith(".pt"):
        raise RelaError(f"--resume takes 'auto' or a checkpoint .pt file, got {shorten(repr(cfg.resume))}")
    if cfg.resume is not None and cfg.out is None:
        raise RelaError("--resume needs --out: the folder of the run to continue")


# Options that fix a run's trajectory: a resumed run must have the same ones.
TRAJECTORY_OPTIONS = ("dataset", "data", "image_size", "arch", "prior", "prior_seed", "prior_size", "budget", "epochs",
                      "batch_size", "grad_accum", "optimizer", "lr", "weight_decay", "warmup_epochs", "base_momentum",
                      "proj_hidden", "proj_dim", "rela_phase", "rela_threshold", "rela_averaging_scale", "rela_train_map", "seed",
                      "handover", "handover_steps", "handover_rho_start", "handover_teacher_reset",
                      "rela_map_bias", "rela_views", "byol_blur", "lr_schedule", "momentum_schedule",
                      "rela_crop_min_scale", "byol_crop_min_scale", "val_fraction", "sync_bn", "method", "temperature", "dino_out_dim",
                      "dino_student_temp", "dino_teacher_temp", "dino_warmup_teacher_temp", "dino_warmup_teacher_epochs",
                      "dino_center_momentum", "dino_head_layers", "dino_head_bn", "barlow_lambda", "vicreg_sim_weight", "vicreg_var_weight",
                      "vicreg_cov_weight", "recipe", "norm_stats", "bank_crop_fraction", "prior_precision")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
