"""python -m rela.train: BYOL accelerated by RELA, on one CPU, one GPU, or many under torchrun.

Reads top to bottom: options, data, prior and target bank, networks, optimiser, resume, the loop
(RELA phase, then BYOL), evaluation, summary.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rela.config import TRAJECTORY_OPTIONS, Config, config_to_dict, parse_config
from rela.data.budget import BudgetSampler
from rela.data.datasets import DatasetSplits, load_dataset
from rela.data.loader import ImageSource, TorchTrainLoader, default_decode_size
from rela.data.views import Normalize, resize_center_crop
from rela.errors import RelaError
from rela.eval.features import extract_features
from rela.eval.knn import knn_accuracy
from rela.eval.linear_probe import linear_probe_accuracy
from rela.methods.byol import ByolNetworks, target_momentum
from rela.methods.learner import Learner
from rela.methods.rela import PhaseController, RelaMap
from rela.models.backbones import build_backbone
from rela.optim import build_optimizer, learning_rate
from rela.prior.specs import load_prior
from rela.prior.target_bank import TargetBank, prepare_target_bank
from rela.step import make_ema_updater, train_step
from rela.utils import distributed as dist_utils
from rela.utils.checkpoint import (atomic_torch_save, atomic_write_json, checkpoint_path, latest_checkpoint,
                                   load_checkpoint, prune_checkpoints, standalone_state_dict)
from rela.utils.digest import state_digest
from rela.utils.progress import Progress, RunLog


@dataclass
class TrainState:
    """What survives a restart besides the modules and the optimiser."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    phase: str = "byol"
    rela_phase_end_step: int | None = None
    rela_phase_ended_by: str | None = None  # "plateau", "fraction", or "end of training"
    images_seen: int = 0
    elapsed_s: float = 0.0
    target_bank_s: float = 0.0
    online_probe_top1: float | None = None  # at the last logging step


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RelaError("--device cuda asked for, but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_image_source(cfg: Config, dataset, device: torch.device, use_dali: bool):
    if use_dali:
        from rela.data.dali import DaliImageSource
        return DaliImageSource(dataset, device, num_threads=max(1, cfg.workers), skip_corrupt=cfg.skip_corrupt)
    return ImageSource(dataset, device, num_workers=cfg.workers, skip_corrupt=cfg.skip_corrupt)


def choose_loader(cfg: Config, device: torch.device) -> bool:
    """True for DALI. auto: DALI where it is installed and a GPU is present."""
    if cfg.loader == "torch" or (cfg.loader == "auto" and device.type != "cuda"):
        return False
    from rela.data.dali import dali_available
    if cfg.loader == "dali":
        if not dali_available():
            raise RelaError("--loader dali: NVIDIA DALI is not installed (pip install '.[dali]')")
        return True
    return dali_available()


def build_train_loader(cfg: Config, splits: DatasetSplits, source, sampler: BudgetSampler, normalize: Normalize,
                       seed: int, use_dali: bool):
    crop_min = {"byol": cfg.byol_crop_min_scale, "rela": cfg.rela_crop_min_scale}
    decode_size = splits.native_size or default_decode_size(cfg.image_size)
    if use_dali:
        from rela.data.dali import DaliTrainLoader
        return DaliTrainLoader(splits.train, sampler, image_size=cfg.image_size, normalize=normalize, seed=seed,
                               device=source.device, crop_min_scale=crop_min, num_threads=max(1, cfg.workers),
                               skip_corrupt=cfg.skip_corrupt, decode_size=decode_size)
    return TorchTrainLoader(source, sampler, image_size=cfg.image_size, decode_size=decode_size,
                            normalize=normalize, seed=seed, crop_min_scale=crop_min)


def run(cfg: Config) -> dict | None:
    start_time = time.time()
    device = pick_device(cfg.device)
    dist = dist_utils.init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    run_dir = _run_folder(cfg, dist)
    log = RunLog(run_dir, dist.is_main)
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise RelaError(f"--batch-size {cfg.batch_size} must divide by ranks x --grad-accum "
                        f"({dist.world_size} x {cfg.grad_accum})")
    micro_batch = cfg.batch_size // (dist.world_size * cfg.grad_accum)
    autocast_dtype = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")) else None
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    fused = {"auto": None, "on": True, "off": False}[cfg.fused_ops]

    # Data
    splits = load_dataset(cfg.dataset, cfg.data, split_seed=cfg.seed, val_fraction=cfg.val_fraction)
    use_dali = choose_loader(cfg, device)
    crop_fraction = 1.0 if splits.in_memory else 0.875  # small images keep their whole frame
    train_source = build_image_source(cfg, splits.train, device, use_dali)
    log.info(f"{cfg.dataset}: {len(splits.train)} train / {len(splits.val)} val images, {splits.num_classes} "
             f"classes; {dist.world_size} rank(s) on {device}; loader {'dali' if use_dali else 'torch'}")

    # Prior and target bank
    backbone = build_backbone(cfg.arch, seed=cfg.seed)
    prior_seed = cfg.seed + 1 if cfg.prior_seed is None else cfg.prior_seed
    prior = load_prior(cfg.prior, arch=cfg.arch, image_size=cfg.image_size, seed=prior_seed,
                       prior_size=cfg.prior_size, data_mean=splits.mean, data_std=splits.std)
    bank: TargetBank | None = None
    if prior is not None:
        prior_normalize = Normalize(prior.mean, prior.std, device)

        def load_prior_images(indices: torch.Tensor) -> torch.Tensor:
            images = train_source.load(indices, size=prior.input_size, crop_fraction=crop_fraction)
            return prior_normalize(resize_center_crop(images, prior.input_size, 1.0))

        bank = prepare_target_bank(
            prior, load_prior_images, num_rows=len(splits.train), dataset_fingerprint=splits.train.fingerprint(),
            dataset_name=cfg.dataset, crop_fraction=crop_fraction, target_dim=backbone.feature_dim,
            bank_dir=Path(cfg.bank_dir), batch_size=cfg.bank_batch_size, dist=dist, device=device, log=log,
            explicit_path=Path(cfg.target_bank) if cfg.target_bank else None, show_progress=cfg.progress)
        log.info(f"target bank ready in {bank.build_seconds:.1f}s ({'reused' if bank.reused else 'built'})")

    # Networks
    nets = ByolNetworks(backbone, cfg.proj_hidden, cfg.proj_dim)
    rela_map = RelaMap(backbone.feature_dim, bank.dim, cfg.rela_train_map, seed=cfg.seed + 2) if bank else None
    learner = Learner(nets, rela_map, splits.num_classes)
    if cfg.sync_bn and device.type != "cuda":
        raise RelaError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)")
    if cfg.sync_bn and dist.enabled:
        learner = nn.SyncBatchNorm.convert_sync_batchnorm(learner)
    learner = learner.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    ema = make_ema_updater(learner, fused)
    peak_lr = cfg.lr * cfg.batch_size / 256
    optimizer = build_optimizer(learner.named_parameters(), cfg.optimizer, peak_lr, cfg.weight_decay)
    model = learner
    if dist.enabled:
        # In the RELA phase the projector and predictor get no gradient, so DDP must look for unused ones.
        model = DistributedDataParallel(learner, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=bank is not None)

    # Schedule, loader, controller
    sampler = BudgetSampler(len(splits.train), cfg.budget, micro_batch, seed=cfg.seed, rank=dist.rank,
                            world_size=dist.world_size)
    # Views leave the loader in the autocast dtype (bf16 on CUDA) and layout the model wants.
    normalize = Normalize(splits.mean, splits.std, device, dtype=autocast_dtype or torch.float32,
                          channels_last=channels_last)
    loader = build_train_loader(cfg, splits, train_source, sampler, normalize, seed=cfg.seed * 7919 + dist.rank,
                                use_dali=use_dali)
    steps_per_epoch = -(-sampler.steps_per_epoch // cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    rela_end_fixed = None if cfg.rela_phase == "adaptive" else max(1, round(float(cfg.rela_phase) * total_steps))
    controller = PhaseController(device, threshold=cfg.rela_threshold)
    if bank is not None and rela_end_fixed is None and total_steps < controller.earliest_plateau_step():
        log.info(f"note: the adaptive rule cannot end the RELA phase in {total_steps} steps (its moving averages "
                 f"need {controller.earliest_plateau_step()} or more): this run stays in RELA throughout; "
                 "--rela-phase FRACTION hands over to BYOL at a set point")
    state = TrainState(phase="rela" if bank is not None else "byol",
                       target_bank_s=bank.build_seconds if bank else 0.0)

    # Resume
    resume_path = _gather_objects(_resume_path(cfg, run_dir), dist)[0]  # rank 0's choice, for every rank
    if resume_path is not None:
        saved = load_checkpoint(resume_path)
        _check_resumable(saved, cfg, dist, resume_path)
        learner.load_state_dict(saved["learner"])
        optimizer.load_state_dict(saved["optimizer"])
        controller.load_state_dict(saved["controller"])
        loader.load_state_dict(saved["loader"][dist.rank])
        state = TrainState(**saved["train_state"])
        if dist.is_main:
            log.trim_metrics(after_step=state.step)  # rows logged after the checkpoint are logged again
        log.info(f"resumed from {resume_path} at step {state.step} (epoch {state.epoch}, phase {state.phase})")
    else:
        loader.set_view_mode(state.phase)
    if dist.is_main:
        atomic_write_json(config_to_dict(cfg), run_dir / "config.json")
    log.info(f"{total_steps} steps ({steps_per_epoch}/epoch, {sampler.subset_size} images/epoch at budget "
             f"{cfg.budget}); phase {state.phase}" + (f", RELA targets {bank.dim}-d" if bank else ""))

    # The loop
    def save_checkpoint() -> None:
        loader_states = _gather_objects(loader.state_dict(), dist)
        if dist.is_main:
            state.elapsed_s += time.time() - segment_start[0]
            segment_start[0] = time.time()
            atomic_torch_save({"learner": standalone_state_dict(learner), "optimizer": optimizer.state_dict(),
                               "controller": controller.state_dict(), "loader": loader_states,
                               "train_state": state.__dict__, "config": config_to_dict(cfg),
                               "world_size": dist.world_size},
                              checkpoint_path(run_dir, state.step))
            prune_checkpoints(run_dir)
        dist_utils.barrier()

    segment_start = [start_time if resume_path is None else time.time()]
    bar = Progress(total=total_steps, desc="train", unit="step", enabled=dist.is_main and cfg.progress,
                   initial=state.step)
    stopped_early = False
    window_start, window_images, window_wait = time.time(), 0, 0.0
    while state.epoch < cfg.epochs and not stopped_early:
        batches = iter(loader.epoch(state.epoch, start_step=state.step_in_epoch * cfg.grad_accum))
        micro_left = sampler.steps_per_epoch - state.step_in_epoch * cfg.grad_accum
        while micro_left > 0:
            lr = learning_rate(state.step, total_steps, warmup_steps, peak_lr)
            momentum = target_momentum(state.step, total_steps, cfg.base_momentum)
            micro_batches = []
            for _ in range(min(cfg.grad_accum, micro_left)):
                wait_start = time.time()
                batch = next(batches, None)  # None: the epoch's last batches held only skipped files
                window_wait += time.time() - wait_start
                if batch is not None:
                    micro_batches.append(batch)
            micro_left = max(micro_left - cfg.grad_accum, 0) if micro_batches else 0
            if not micro_batches:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
                continue
            loss, probe_loss, probe_accuracy = train_step(
                model, optimizer, ema, micro_batches, phase=state.phase, bank=bank, lr=lr, momentum=momentum,
                autocast_dtype=autocast_dtype, fused=fused)
            seen = sum(len(b.index) for b in micro_batches) * dist.world_size
            window_images += seen
            state.images_seen += seen
            state.step += 1
            state.step_in_epoch += 1
            if state.phase == "rela":
                controller.update(dist_utils.all_reduce_mean_(loss.detach().float().clone()), state.step)
            log_now = state.step % cfg.log_every == 0 or micro_left == 0
            if log_now:
                elapsed = time.time() - window_start
                record = {"step": state.step, "epoch": state.epoch, "phase": state.phase,
                          "loss": loss.item(), "probe_loss": probe_loss.item(),
                          "online_probe_top1": 100 * probe_accuracy.item(), "rho": controller.rho.item(),
                          "lr": lr, "momentum": momentum, "images_per_s": window_images / max(elapsed, 1e-9),
                          "data_wait_fraction": window_wait / max(elapsed, 1e-9)}
                log.metrics(record)
                state.online_probe_top1 = record["online_probe_top1"]
                bar.update(0, loss=f"{record['loss']:.4f}", phase=state.phase, rho=f"{record['rho']:.4f}")
                window_start, window_images, window_wait = time.time(), 0, 0.0
            bar.update(1)
            if state.phase == "rela" and _rela_phase_over(state.step, rela_end_fixed, controller, log_now):
                state.phase, state.rela_phase_end_step = "byol", state.step
                state.rela_phase_ended_by = "plateau" if rela_end_fixed is None else "fraction"
                loader.set_view_mode("byol")
                log.info(f"RELA phase over at step {state.step} (rho {controller.rho.item():.4f}); BYOL from here")
            if micro_left == 0:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            checkpointed = state.step % cfg.ckpt_every == 0 or micro_left == 0
            if checkpointed:
                save_checkpoint()
            if cfg.stop_after_steps is not None and state.step >= cfg.stop_after_steps and state.epoch < cfg.epochs:
                if not checkpointed:
                    save_checkpoint()
                log.info(f"stopping after step {state.step} as asked (--stop-after-steps); resume with --resume auto")
                stopped_early = True
                break
    bar.close()
    if stopped_early:
        dist_utils.shutdown()
        return None

    if state.phase == "rela":  # the loss never plateaued: the whole run was the RELA phase
        state.rela_phase_end_step, state.rela_phase_ended_by = state.step, "end of training"

    # Evaluation and summary
    dist_utils.broadcast_buffers_(learner)
    eval_start = time.time()
    summary = _evaluate(cfg, learner.nets.backbone, splits, train_source, device, dist, crop_fraction, autocast_dtype,
                        use_dali)
    eval_s = time.time() - eval_start
    state.elapsed_s += time.time() - segment_start[0]
    skipped = set(getattr(train_source, "skipped", set())) | set(getattr(loader, "skipped", set()))
    skipped = set().union(*_gather_objects(sorted(skipped), dist))  # every rank's, not only rank 0's
    replica_digests = _gather_objects(state_digest(learner), dist)
    summary.update({
        "replica_weights_identical": len(set(replica_digests)) == 1, "replica_weight_digests": replica_digests,
        "online_probe_top1": state.online_probe_top1, "wall_clock_s": state.elapsed_s, "eval_s": eval_s,
        "train_steps": state.step,
        "images_seen": state.images_seen,
        "rela_phase_end_step": state.rela_phase_end_step, "rela_phase_ended_by": state.rela_phase_ended_by,
        "target_bank_s": state.target_bank_s,
        "rela_plateau_step": int(controller.plateau_step.item()) if bank is not None else None,
        "prior": cfg.prior, "budget": cfg.budget, "epochs": cfg.epochs, "world_size": dist.world_size,
        "skipped_corrupt": len(skipped), "device": str(device),
    })
    if dist.is_main:
        atomic_torch_save({"arch": cfg.arch, "state_dict": standalone_state_dict(learner.nets.backbone),
                           "image_size": cfg.image_size, "mean": list(splits.mean), "std": list(splits.std)},
                          run_dir / "backbone.pt")
        atomic_write_json(summary, run_dir / "summary.json")
        log.info(f"linear probe top-1 {summary['linear_probe_top1']:.2f}%, kNN top-1 {summary['knn_top1']:.2f}%, "
                 f"{summary['wall_clock_s']:.1f}s, {state.step} steps, {state.images_seen} images"
                 + (f", {len(skipped)} corrupt images skipped" if skipped else ""))
        print(f"linear_probe_top1={summary['linear_probe_top1']:.2f} knn_top1={summary['knn_top1']:.2f}")
    dist_utils.shutdown()
    return summary


def _rela_phase_over(step: int, fixed_end: int | None, controller: PhaseController, can_read: bool) -> bool:
    if fixed_end is not None:
        return step >= fixed_end
    # Reading the flag is a host sync: only at logging steps, where we sync anyway.
    return can_read and bool(controller.done.item())


def _gather_objects(obj, dist: dist_utils.DistInfo) -> list:
    if not dist.enabled:
        return [obj]
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _run_folder(cfg: Config, dist: dist_utils.DistInfo) -> Path:
    """--out, or a new runs/DATASET-DATE-TIME (named by rank 0). A fresh run never writes into a folder that
    holds another run's checkpoints: they would be pruned, and --resume auto would pick them up."""
    if cfg.out is not None:
        run_dir = Path(cfg.out)
    else:
        run_dir = Path(_gather_objects(f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}", dist)[0])
    if cfg.resume is None and latest_checkpoint(run_dir) is not None:
        raise RelaError(f"{run_dir} already holds a run's checkpoints: --resume auto continues it; "
                        "pass another --out for a new run")
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _resume_path(cfg: Config, run_dir: Path) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(cfg.resume)
    if not path.is_file():
        raise RelaError(f"--resume {path}: no such checkpoint")
    return path


def _check_resumable(saved: dict, cfg: Config, dist: dist_utils.DistInfo, path: Path) -> None:
    """A resumed run continues the same trajectory: same options that shape it, same number of ranks."""
    before = saved.get("config", {})
    now = config_to_dict(cfg)
    changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}" for k in TRAJECTORY_OPTIONS
               if before.get(k) != now[k]]
    if saved.get("world_size", 1) != dist.world_size:
        changed.append(f"ranks {saved.get('world_size', 1)} -> {dist.world_size}")
    if changed:
        raise RelaError(f"cannot resume {path} with other settings: {'; '.join(changed)}")


def _evaluate(cfg: Config, backbone: nn.Module, splits: DatasetSplits, train_source, device, dist, crop_fraction,
              autocast_dtype, use_dali: bool) -> dict:
    val_source = build_image_source(cfg, splits.val, device, use_dali)
    normalize = Normalize(splits.mean, splits.std, device)
    common = dict(size=cfg.image_size, crop_fraction=crop_fraction, normalize=normalize,
                  batch_size=cfg.eval_batch_size, dist=dist, autocast_dtype=autocast_dtype, show_progress=cfg.progress)
    train_x, train_y = extract_features(backbone, train_source, **common)
    val_x, val_y = extract_features(backbone, val_source, **common)
    linear = linear_probe_accuracy(train_x, train_y, val_x, val_y, splits.num_classes, epochs=cfg.probe_epochs,
                                   seed=cfg.seed)
    knn = knn_accuracy(train_x, train_y, val_x, val_y, splits.num_classes, k=cfg.knn_k,
                       temperature=cfg.knn_temperature)
    return {"linear_probe_top1": 100 * linear, "knn_top1": 100 * knn}


def main(argv: list[str] | None = None) -> int:
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        cfg = parse_config(argv)
        run(cfg)
    except RelaError as err:
        print(f"rela.train: error: {err}", file=sys.stderr)
        return 1
    finally:  # main() is also called in-process (tests, benchmarks): leave torch as we found it
        torch.use_deterministic_algorithms(deterministic_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
