"""What a run is made of, and how it is built from its options: `build_run(cfg, dist, device) -> Run`.

The trainer (`rela.train`) and `benchmarks/throughput.py` both build their runs here, so what a benchmark
times is what `python -m rela.train` runs. Building order matters for exact reproduction: the heads and
the online probe draw their initial weights from torch's global generator, seeded by `--seed`.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rela.config import Config
from rela.data.budget import BudgetSampler
from rela.data.datasets import DatasetSplits, load_dataset, with_norm_stats
from rela.data.factory import build_image_source, create_loaders
from rela.data.interfaces import ImageSource, TrainLoader
from rela.data.views import Normalize, resize_center_crop
from rela.errors import RelaError
from rela.eval.features import bank_crop_fraction, center_crop_fraction
from rela.eval.monitor import KnnMonitor
from rela.methods.byol import target_momentum
from rela.methods.learner import RELA_PHASE, Learner, Phase, method_phase, phase_named
from rela.methods.rela import PhaseController, RelaMap
from rela.methods.registry import build_method, method_class
from rela.models.backbones import build_backbone
from rela.ops._dispatch import use_kernels
from rela.optim import build_optimizer, learning_rate
from rela.prior.specs import load_prior
from rela.prior.target_bank import TargetBank, agreed_fingerprint, prepare_target_bank
from rela.step import make_ema_updater
from rela.utils.checkpoint_files import CheckpointWriter
from rela.utils.device import autocast_dtype_for
from rela.utils.distributed import DistInfo, check_shared_folder
from rela.utils.progress import RunLog


@dataclass
class TrainState:
    """What survives a restart besides the modules, the optimiser, the controller and the loader."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    phase: str = "byol"  # the current phase's name, as saved and logged: "rela", or the method's (--method)
    rela_phase_end_step: int | None = None
    rela_phase_ended_by: str | None = None  # "plateau", "fraction", or "end of training"
    images_seen: int = 0  # by this rank (each rank's is saved)
    elapsed_s: float = 0.0  # wall-clock of the earlier segments of a resumed run (bank build included)
    target_bank_s: float = 0.0
    online_probe_top1: float | None = None  # at the last logging step
    monitor_s: float = 0.0  # the kNN monitor's own time, part of elapsed_s


@dataclass(frozen=True)
class Schedule:
    """The step-indexed schedules: warm-up then cosine or constant learning rate, BYOL's cosine or a constant
    EMA momentum, the RELA phase's set end."""
    total_steps: int
    warmup_steps: int
    peak_lr: float
    base_momentum: float
    rela_end_fixed: int | None  # None: the adaptive rule decides
    constant_lr: bool = False
    constant_momentum: bool = False

    def lr(self, step: int) -> float:
        if self.constant_lr and step >= self.warmup_steps:
            return self.peak_lr
        return learning_rate(step, self.total_steps, self.warmup_steps, self.peak_lr)

    def momentum(self, step: int) -> float:
        return self.base_momentum if self.constant_momentum else target_momentum(step, self.total_steps,
                                                                                  self.base_momentum)


@dataclass
class Run:
    cfg: Config
    dist: DistInfo
    device: torch.device
    run_dir: Path
    log: RunLog
    splits: DatasetSplits
    use_dali: bool
    crop_fraction: float
    train_source: ImageSource
    loader: TrainLoader
    sampler: BudgetSampler
    bank: TargetBank | None
    learner: Learner          # the module that owns every weight
    model: nn.Module          # what the step calls: the learner, or DDP around it
    ema: Callable[[float], None]  # the target network's EMA step: ema(momentum)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    controller: PhaseController
    monitor: KnnMonitor | None
    autocast_dtype: torch.dtype | None
    fused: bool | None
    state: TrainState
    segment_start: float = field(default_factory=time.time)  # start of this process's part of the run
    checkpoints: CheckpointWriter = field(default_factory=CheckpointWriter)  # writes in the background

    @property
    def phase(self) -> Phase:
        """The phase the loop runs now; the train state keeps its name (checkpoints save the name)."""
        return phase_named(self.state.phase)

    @phase.setter
    def phase(self, phase: Phase) -> None:
        self.state.phase = phase.name

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.sampler.steps_per_epoch // self.cfg.grad_accum)

    def elapsed_s(self) -> float:
        """Wall-clock of the whole run so far, across resumes."""
        return self.state.elapsed_s + time.time() - self.segment_start

    def training_clock_s(self) -> float:
        """elapsed_s without the kNN monitor's time: what a run without the monitor would have taken."""
        return self.elapsed_s() - self.state.monitor_s

    def stateful(self) -> dict[str, Any]:
        """The objects whose state a checkpoint holds, by name (each has state_dict and load_state_dict): the
        learner (online, target, map, probe), the optimiser, the phase controller and the loader (sampler and
        augmentation RNG). With `state`, the step state, that is all a run needs to continue exactly;
        rela/checkpoint.py saves and restores this list, nothing else."""
        return {"learner": self.learner, "optimizer": self.optimizer, "controller": self.controller,
                "loader": self.loader}


def build_run(cfg: Config, dist: DistInfo, device: torch.device, run_dir: Path, log: RunLog,
              start_time: float | None = None) -> Run:
    """Everything a run needs, freshly initialised (a resume then restores its state into it)."""
    start_time = time.time() if start_time is None else start_time
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise RelaError(f"--batch-size {cfg.batch_size} must divide by ranks x --grad-accum "
                        f"({dist.world_size} x {cfg.grad_accum})")
    micro_batch = cfg.batch_size // (dist.world_size * cfg.grad_accum)
    autocast_dtype = autocast_dtype_for(cfg.precision, device)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    fused = {"auto": None, "on": True, "off": False}[cfg.fused_ops]
    sync_bn = sync_batchnorm_wanted(cfg, dist.world_size, device)  # --sync-bn off CUDA: an error before any work
    if fused:
        try:
            use_kernels(True, device)
        except RuntimeError as err:  # no Triton, or CPU tensors without the interpreter: one line, before any work
            raise RelaError(f"--fused-ops on: {err}") from None

    splits = with_norm_stats(load_dataset(cfg.dataset, cfg.data, split_seed=cfg.seed, val_fraction=cfg.val_fraction),
                             cfg.norm_stats)
    sampler = BudgetSampler(len(splits.train), cfg.budget, micro_batch, seed=cfg.seed, rank=dist.rank,
                            world_size=dist.world_size)
    # Views leave the loader in the autocast dtype (bf16 on CUDA) and layout the model wants.
    normalize = Normalize(splits.mean, splits.std, device, dtype=autocast_dtype or torch.float32,
                          channels_last=channels_last)
    loaders = create_loaders(cfg, splits, sampler, normalize, device, seed=cfg.seed * 7919 + dist.rank,
                             method_views=method_class(cfg.method).views)
    crop_fraction = center_crop_fraction(splits)
    log.info(f"{cfg.dataset}: {len(splits.train)} train / {len(splits.val)} val images, {splits.num_classes} "
             f"classes; {dist.world_size} rank(s) on {device}; loader {'dali' if loaders.use_dali else 'torch'}")

    backbone = build_backbone(cfg.arch, seed=cfg.seed)
    bank = build_target_bank(cfg, splits, loaders.train_source, bank_crop_fraction(splits, cfg.bank_crop_fraction),
                             backbone.feature_dim, dist, device, log)

    learner, model, ema, optimizer = build_networks(cfg, backbone, bank.dim if bank else None, splits.num_classes,
                                                    dist, device, channels_last=channels_last, fused=fused)

    if sync_bn and cfg.sync_bn is None:
        log.info(f"SyncBatchNorm across the {dist.world_size} CUDA ranks: --recipe reference, as the reference code "
                 "(--no-sync-bn keeps per-rank BN)")
    if sync_bn and compiles(cfg, device):
        log.info("note: --sync-bn with --compile: torch.compile breaks the graph at every SyncBatchNorm layer "
                 "(its collectives are not traced; pytorch/pytorch#161302), so the backbone runs as many small "
                 "graphs; --no-sync-bn (per-rank BN, the project's default) compiles to one graph")
    schedule = _build_schedule(cfg, -(-sampler.steps_per_epoch // cfg.grad_accum))
    controller = PhaseController(device, threshold=cfg.rela_threshold, averaging_scale=cfg.rela_averaging_scale)
    if bank is not None and schedule.rela_end_fixed is None and schedule.total_steps < controller.earliest_plateau_step():
        log.info(f"note: the adaptive rule cannot end the RELA phase in {schedule.total_steps} steps (its moving "
                 f"averages need {controller.earliest_plateau_step()} or more): this run stays in RELA throughout; "
                 "--rela-phase FRACTION hands over to the method at a set point")
    monitor = _build_monitor(cfg, splits, loaders.use_dali, crop_fraction, dist, device, autocast_dtype) if cfg.monitor else None
    phase = RELA_PHASE if bank is not None else method_phase(cfg.method)
    state = TrainState(phase=phase.name, target_bank_s=bank.build_seconds if bank else 0.0)
    loaders.train_loader.set_view_mode(phase.views)
    return Run(cfg=cfg, dist=dist, device=device, run_dir=run_dir, log=log, splits=splits, use_dali=loaders.use_dali,
               crop_fraction=crop_fraction, train_source=loaders.train_source, loader=loaders.train_loader, sampler=sampler, bank=bank,
               learner=learner, model=model, ema=ema, optimizer=optimizer, schedule=schedule,
               controller=controller, monitor=monitor, autocast_dtype=autocast_dtype, fused=fused, state=state,
               segment_start=start_time)


def build_target_bank(cfg: Config, splits: DatasetSplits, train_source: ImageSource, crop_fraction: float,
                      target_dim: int, dist: DistInfo, device: torch.device, log: RunLog) -> TargetBank | None:
    """The prior's PCA-reduced features of every training image (None for --prior none); `crop_fraction`: the
    centre of each image the prior sees (rela.eval.features.bank_crop_fraction)."""
    prior_seed = cfg.seed if cfg.prior_seed is None else cfg.prior_seed  # rand: the student's own initial network
    prior = load_prior(cfg.prior, arch=cfg.arch, image_size=cfg.image_size, seed=prior_seed,
                       prior_size=cfg.prior_size, data_mean=splits.mean, data_std=splits.std)
    if prior is None:
        return None
    prior_normalize = Normalize(prior.mean, prior.std, device)

    def load_prior_images(indices: torch.Tensor) -> torch.Tensor:
        images = train_source.load(indices, size=prior.input_size, crop_fraction=crop_fraction)
        return prior_normalize(resize_center_crop(images, prior.input_size, 1.0))

    # Under torchrun every node must see one bank folder, and rank 0's fingerprint keys the bank for all.
    list_dir = None if cfg.target_bank else Path(cfg.bank_dir)
    if list_dir is not None:
        check_shared_folder(list_dir, "--bank-dir", dist)
    bank = prepare_target_bank(
        prior, load_prior_images, num_rows=len(splits.train),
        dataset_fingerprint=agreed_fingerprint(splits.train, dist, list_dir),
        dataset_name=cfg.dataset, crop_fraction=crop_fraction, target_dim=target_dim,
        bank_dir=Path(cfg.bank_dir), batch_size=cfg.bank_batch_size, dist=dist, device=device, log=log,
        explicit_path=Path(cfg.target_bank) if cfg.target_bank else None, show_progress=cfg.progress,
        precision=cfg.prior_precision)
    log.info(f"target bank ready in {bank.build_seconds:.1f}s ({'reused' if bank.reused else 'built'})")
    return bank


def build_networks(cfg: Config, backbone: nn.Module, target_dim: int | None, num_classes: int, dist: DistInfo,
                   device: torch.device, *, channels_last: bool, fused: bool | None
                   ) -> tuple[Learner, nn.Module, Callable[[float], None], torch.optim.Optimizer]:
    """The learner (the SSL method's networks, RELA's map W when there is a target bank, the online probe)
    on its device; its EMA step; its optimiser; and what the step calls (DDP around the learner under
    torchrun)."""
    method = build_method(cfg, backbone, num_classes)
    rela_map = (RelaMap(backbone.feature_dim, target_dim, cfg.rela_train_map, seed=cfg.seed + 2, bias=cfg.rela_map_bias)
                if target_dim else None)
    learner = Learner(method, rela_map, num_classes)
    if sync_batchnorm_wanted(cfg, dist.world_size, device):
        learner = nn.SyncBatchNorm.convert_sync_batchnorm(learner)
    learner = learner.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    ema = make_ema_updater(learner, fused)  # before the optimiser and DDP: it moves weights into flat buffers
    if compiles(cfg, device):
        # In place (Module.compile): parameter names keep no `_orig_mod.` prefix, so checkpoints and
        # backbone.pt read the same compiled or not. After the EMA's flattening, which swaps storages.
        for module in learner.method.backbones():
            module.compile(backend=cfg.compile_backend)
    optimizer = build_optimizer(learner.named_parameters(), cfg.optimizer, peak_learning_rate(cfg), cfg.weight_decay)
    model = wrap_for_ranks(learner, dist, device, RELA_PHASE if rela_map is not None else method_phase(cfg.method))
    return learner, model, ema, optimizer


def sync_batchnorm_wanted(cfg: Config, world_size: int, device: torch.device) -> bool:
    """Whether the learner's BatchNorm layers become SyncBatchNorm: --sync-bn or --no-sync-bn as given, and by
    default under --recipe reference when more than one CUDA rank trains (the reference code's Lightning setting
    with several GPUs). One rank has nothing to synchronise; an explicit --sync-bn off CUDA is an error (torch's
    SyncBatchNorm has no CPU implementation)."""
    if cfg.sync_bn and device.type != "cuda":
        raise RelaError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)")
    wanted = cfg.recipe == "reference" and device.type == "cuda" if cfg.sync_bn is None else cfg.sync_bn
    return wanted and world_size > 1


def compiles(cfg: Config, device: torch.device) -> bool:
    """Whether the backbones are compiled: --compile on, or auto on CUDA."""
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def wrap_for_ranks(learner: Learner, dist: DistInfo, device: torch.device, phase: Phase) -> nn.Module:
    """What the step calls: the learner itself, or DDP around it under torchrun, set for `phase`.

    DDP looks for parameters without a gradient only where there are some: in the RELA phase (the method's
    heads), and after it only when W is trainable (the method does not use it). That search costs a pass over
    the graph every step, so the trainer wraps the learner again at the hand-over. broadcast_buffers=False:
    BN statistics stay each rank's own while training (batch statistics drive the training forward), and
    rank 0's are broadcast once before evaluation; gradient_as_bucket_view spares a copy of every gradient.
    """
    if not dist.enabled:
        return learner
    rela_map = learner.rela_map
    unused = phase.is_rela or (rela_map is not None and rela_map.weight.requires_grad)
    # torch 2.14 renames broadcast_buffers (deprecated) to forward_sync_buffers; older ones know only the first.
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGUMENTS
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(learner, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=unused, gradient_as_bucket_view=True, **no_buffer_sync)


_DDP_ARGUMENTS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """What fast PyTorch trainers turn on for CUDA: cuDNN's autotuner (not under --deterministic, which asks
    for repeatable kernels) and TF32 for float32 matmuls and convolutions. Nothing changes elsewhere."""
    if device.type != "cuda":
        return
    # The legacy flags on purpose: torch 2.9+ has per-backend fp32_precision, but mixing the two APIs raises,
    # and torch.compile's Inductor (2.11, 2.14) still reads the legacy ones (tried on both, CPU compile).
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def peak_learning_rate(cfg: Config) -> float:
    """--lr is per 256 images: scaled linearly with the global batch size."""
    return cfg.lr * cfg.batch_size / 256


def _build_monitor(cfg: Config, splits: DatasetSplits, use_dali: bool, crop_fraction: float, dist: DistInfo,
                   device: torch.device, autocast_dtype: torch.dtype | None) -> KnnMonitor:
    def source(dataset, size: int):
        subset = dataset.subset(KnnMonitor.subset_indices(len(dataset), size, cfg.seed), f"{dataset.name}/monitor")
        return build_image_source(cfg, subset, device, use_dali)

    return KnnMonitor(source(splits.train, cfg.monitor_size), source(splits.val, cfg.monitor_size // 2),
                      num_classes=splits.num_classes, size=cfg.image_size, crop_fraction=crop_fraction,
                      normalize=Normalize(splits.mean, splits.std, device), dist=dist, k=cfg.knn_k,
                      temperature=cfg.knn_temperature, batch_size=cfg.eval_batch_size, autocast_dtype=autocast_dtype)


def _build_schedule(cfg: Config, steps_per_epoch: int) -> Schedule:
    total_steps = cfg.epochs * steps_per_epoch
    rela_end_fixed = None if cfg.rela_phase == "adaptive" else max(1, round(float(cfg.rela_phase) * total_steps))
    return Schedule(total_steps=total_steps, warmup_steps=max(1, int(cfg.warmup_epochs * steps_per_epoch)),
                    peak_lr=peak_learning_rate(cfg), base_momentum=cfg.base_momentum, rela_end_fixed=rela_end_fixed,
                    constant_lr=cfg.lr_schedule == "constant", constant_momentum=cfg.momentum_schedule == "constant")
