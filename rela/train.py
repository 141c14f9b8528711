"""python -m rela.train: a self-supervised method (BYOL by default) accelerated by RELA, on one CPU, one GPU,
or many under torchrun.

A run in four steps: `build_run` (rela/run.py: data, prior and target bank, networks, optimiser,
schedules, phase controller), `train` (below: the RELA phase, the hand-over, the method's phase),
`evaluate` and `write_summary` (rela/summary.py: linear probe, kNN, summary.json).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from rela.checkpoint import restore_checkpoint, save_checkpoint
from rela.config import Config, config_to_dict
from rela.data.interfaces import TrainBatch
from rela.errors import RelaError
from rela.options import parse_config
from rela.plots import write_curves_logged
from rela.prior.specs import code_warning
from rela.methods.handover import handover_steps_for, linear_weight, reset_teacher_, rho_weight
from rela.methods.learner import method_phase
from rela.run import Run, build_run, configure_backends, wrap_for_ranks
from rela.step import train_step
from rela.summary import evaluate, write_summary
from rela.utils import distributed as dist_utils
from rela.utils.checkpoint_files import latest_checkpoint, latest_intact_checkpoint
from rela.utils.device import pick_device
from rela.utils import faults
from rela.utils.faults import kill_point, poisoned_lr
from rela.utils.files import atomic_write_json, write_errors_named
from rela.utils.locks import lock_run_folder
from rela.utils.nonfinite import NonFiniteLossGuard
from rela.utils.signals import EXIT_REQUEUE, StopRequested, defer_signals, stop_due, stop_on_signals
from rela.utils.progress import Progress, RunLog


def run(cfg: Config) -> dict | None:
    """Trains, evaluates and writes the summary; None when stopped early as asked (--stop-after-steps)."""
    start_time = time.time()
    if cfg.deterministic:
        # cuBLAS reads this when it makes its first handle, and torch's deterministic mode raises on a CUDA
        # matmul without it: set before any CUDA work (a value the user exported wins).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts > 0 and cfg.resume is None:  # a fresh start over the dead attempt's folder would lose its steps
        raise RelaError(f"torchrun restarted this run (attempt {restarts + 1}, --max-restarts) but --resume is not "
                        "set: pass --resume auto so a restarted attempt continues from the last checkpoint")
    device = pick_device(cfg.device)
    dist = dist_utils.init_distributed(device.type, cfg.dist_timeout)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    configure_backends(device, cfg.deterministic)
    torch.manual_seed(cfg.seed)
    run_dir = _run_folder(cfg, dist)
    dist_utils.check_shared_folder(run_dir, "--out", dist)  # checkpoints are read back by every rank
    lock = lock_run_folder(run_dir, dist)  # a second run on the same --out is refused, not interleaved
    if dist.is_main:
        (run_dir / REQUEUE_MARKER).unlink(missing_ok=True)  # this attempt takes over from the stopped one
    log = RunLog(run_dir, dist.is_main, loggers=cfg.logger)
    r = None
    if (warning := code_warning(cfg.prior)) is not None:
        log.info(warning)
    faults.arm()  # tests' fault injection: the RELA_* variables, read once for this run
    try:
        r = build_run(cfg, dist, device, run_dir, log, start_time)
        resume_from = dist_utils.gather_objects(_resume_path(cfg, run_dir, log), dist)[0]  # rank 0's, for all
        if resume_from is not None:
            restore_checkpoint(r, resume_from)
            r.model = wrap_for_ranks(r.learner, dist, device, r.phase)
            if dist.is_main:
                log.trim_metrics(after_step=r.state.step)  # rows logged after the checkpoint are logged again
            log.info(f"resumed from {resume_from} at step {r.state.step} (epoch {r.state.epoch}, phase {r.state.phase})")
        elif dist.is_main:
            log.trim_metrics(after_step=-1)  # a fresh start: rows of an attempt killed before its first checkpoint go
        if dist.is_main:
            with write_errors_named(run_dir / "config.json"):
                atomic_write_json(config_to_dict(cfg), run_dir / "config.json")
        finished = train(r)
        if not finished:
            return None
        summary = write_summary(r, evaluate(r))
        if dist.is_main and cfg.curves:
            write_curves_logged(run_dir, log)  # curves.png; a plotting error is logged, never raised
        return summary
    except StopRequested as stop:
        if dist.is_main:  # torchrun exits 1 whatever its workers' status: the job script reads this file instead
            atomic_write_json({"exit": EXIT_REQUEUE, "reason": str(stop),
                               "step": r.state.step if r is not None else None}, run_dir / REQUEUE_MARKER)
        raise
    finally:
        faults.disarm()
        log.close()
        if lock is not None:
            lock.release()
        # The run (DDP's reducer among it) goes before the process group: a reducer that holds the group's
        # last reference destroys it with the GIL held, which can deadlock with a gloo worker thread still
        # freeing a finished collective (seen with torch 2.11 at the end of a 2-rank CPU run).
        r = None
        gc.collect()
        dist_utils.shutdown()


def evaluate_untrained(cfg: Config) -> dict:
    """The baseline a learning claim is measured against: this run's backbone at its initialisation (the
    same architecture and seed, so the same weights its training would start from), evaluated as a
    trained run is. No bank, no training step, nothing written."""
    cfg = dataclasses.replace(cfg, prior="none", monitor=False, progress=False)
    torch.manual_seed(cfg.seed)
    untrained = build_run(cfg, dist_utils.DistInfo(), pick_device(cfg.device), run_dir=None,
                          log=RunLog(None, enabled=False))
    return evaluate(untrained)


def train(run: Run) -> bool:
    """The loop over epochs and optimiser steps. False when it stopped early as asked (a checkpoint is saved)."""
    cfg, state = run.cfg, run.state
    run.log.info(f"{run.schedule.total_steps} steps ({run.steps_per_epoch}/epoch, {run.sampler.subset_size} "
                 f"images/epoch at budget {cfg.budget}); phase {state.phase}"
                 + (f", RELA targets {run.bank.dim}-d" if run.bank else ""))
    bar = Progress(total=run.schedule.total_steps, desc="train", unit="step", enabled=run.dist.is_main and cfg.progress,
                   initial=state.step)
    window = _Window()
    guard = NonFiniteLossGuard(run.device)  # no checkpoint of weights that a NaN or inf loss produced
    if run.monitor is not None and state.step == 0:
        _monitor(run)  # where every curve starts: the untrained network
    defer_signals(True)  # SIGTERM, SIGUSR1: checkpoint and stop at the next step boundary
    try:
        while state.epoch < cfg.epochs:
            epoch_over = False
            for micro_batches, epoch_over in _epoch_steps(run, window):
                _optimizer_step(run, micro_batches, epoch_over, window, bar, guard)
                kill_point("after-step", state.step)  # tests: a death between a log row and a checkpoint
                if run.phase.is_rela and _rela_phase_over(run):
                    _hand_over(run, ended_by="plateau" if run.schedule.rela_end_fixed is None else "fraction")
                    _log_hand_over(run)
                if epoch_over:
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                if _monitor_due(run, epoch_over):
                    _monitor(run)
                stop = _checkpoint_and_stop(run, epoch_over, guard)
                if stop is not None:
                    run.checkpoints.wait()
                    if stop == _STOP_AFTER_STEPS:
                        run.log.info(f"stopping after step {state.step} as asked (--stop-after-steps); "
                                     "resume with --resume auto")
                        return False
                    raise StopRequested(f"{stop} received: stopped after step {state.step} with a checkpoint; "
                                        "resume with --resume auto")
            if not epoch_over:  # the epoch's last batches held only skipped files
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
        guard.check(run.dist, run.run_dir)
    finally:
        defer_signals(False)
        bar.close()
        run.checkpoints.wait()  # the last checkpoint is on disk before anything reads or resumes from it
    if run.phase.is_rela:  # the loss never plateaued: the whole run was the RELA phase
        state.rela_phase_end_step, state.rela_phase_ended_by = state.step, "end of training"
    return True


def _epoch_steps(run: Run, window: "_Window") -> Iterator[tuple[list[TrainBatch], bool]]:
    """The rest of the current epoch as optimiser steps: (micro-batches, whether it is the epoch's last)."""
    cfg, state = run.cfg, run.state
    batches = iter(run.loader.epoch(state.epoch, start_step=state.step_in_epoch * cfg.grad_accum))
    micro_left = run.sampler.steps_per_epoch - state.step_in_epoch * cfg.grad_accum
    while micro_left > 0:
        micro_batches = []
        for _ in range(min(cfg.grad_accum, micro_left)):
            with window.waiting():
                batch = next(batches, None)  # None: the epoch's last batches held only skipped files
            if batch is not None:
                micro_batches.append(batch)
        if not micro_batches:
            return
        micro_left = max(micro_left - cfg.grad_accum, 0)
        yield micro_batches, micro_left == 0


def _optimizer_step(run: Run, micro_batches: list[TrainBatch], epoch_over: bool, window: "_Window",
                    bar: Progress, guard: NonFiniteLossGuard) -> None:
    """One step of the current phase, its counters, the controller's update and, at logging steps (every
    --log-every and at each epoch's end), a metrics row."""
    state, phase = run.state, run.phase
    lr, momentum = poisoned_lr(state.step, run.schedule.lr(state.step)), run.schedule.momentum(state.step)
    run.learner.method.schedule(state.step, run.steps_per_epoch)
    rela_weight = _rela_weight(run)
    loss, probe_loss, probe_accuracy, rela_loss = train_step(
        run.model, run.optimizer, run.ema, micro_batches, phase=phase, bank=run.bank, lr=lr,
        momentum=momentum, autocast_dtype=run.autocast_dtype, fused=run.fused, rela_weight=rela_weight)
    seen = sum(len(b.index) for b in micro_batches)  # this rank's: the summary adds up the ranks'
    window.images += seen * run.dist.world_size
    state.images_seen += seen
    state.step += 1
    state.step_in_epoch += 1
    guard.observe(loss, state.step)
    if phase.is_rela and rela_loss is not None:  # the controller follows the RELA loss, blended or not
        run.controller.update(dist_utils.all_reduce_mean_(rela_loss.float().clone()), state.step)
    log_now = _log_step(run, epoch_over)
    if log_now:
        guard.check(run.dist, run.run_dir)
        elapsed = window.elapsed()
        record = {"step": state.step, "epoch": state.epoch, "phase": state.phase,
                  # what really ran: the learner's step function and the views the loader made
                  "step_fn": run.learner.last_step_fn, "views": micro_batches[-1].views,
                  "loss": loss.item(), "rela_weight": rela_weight,
                  "rela_loss": None if rela_loss is None else rela_loss.item(), "probe_loss": probe_loss.item(),
                  "online_probe_top1": 100 * probe_accuracy.item(), "rho": run.controller.rho.item(),
                  "rela_threshold": run.cfg.rela_threshold,
                  "lr": lr, "momentum": momentum, "images_per_s": window.images / max(elapsed, 1e-9),
                  "data_wait_fraction": window.wait_s / max(elapsed, 1e-9)}
        run.log.metrics(record)
        state.online_probe_top1 = record["online_probe_top1"]
        bar.update(0, loss=f"{record['loss']:.4f}", phase=state.phase, rho=f"{record['rho']:.4f}")
        window.reset()
    bar.update(1)


def _rela_weight(run: Run) -> float:
    """lambda of this step, L = lambda L_rela + (1 - lambda) L_method (rela/methods/handover.py): 1 in the RELA
    phase and 0 after it, but over the blend of --handover linear (after the phase) or rho (within it)."""
    cfg, state, phase = run.cfg, run.state, run.phase
    if run.bank is None:
        return 0.0
    if cfg.handover == "linear" and not phase.is_rela:
        return linear_weight(state.step - state.rela_phase_end_step,
                             handover_steps_for(cfg.handover_steps, run.schedule.total_steps))
    if cfg.handover == "rho" and phase.is_rela:
        return rho_weight(run.controller.rho_before(), cfg.handover_rho_start, cfg.rela_threshold)
    return phase.rela_weight


def _log_step(run: Run, epoch_over: bool) -> bool:
    """Every --log-every steps and at each epoch's end: where the host reads the device's numbers."""
    return run.state.step % run.cfg.log_every == 0 or epoch_over


_STOP_AFTER_STEPS = "--stop-after-steps"


def _checkpoint_and_stop(run: Run, epoch_over: bool, guard: NonFiniteLossGuard) -> str | None:
    """The step boundary's one decision: whether to stop here (a stop signal's name, or _STOP_AFTER_STEPS) and
    whether to checkpoint (when due, and always before a stop). Every checkpoint comes after the non-finite
    guard's check, so no weights that a NaN or inf loss produced are saved."""
    cfg, state = run.cfg, run.state
    stop = stop_due(run.dist, run.device, _log_step(run, epoch_over))
    if stop is None and cfg.stop_after_steps is not None and state.step >= cfg.stop_after_steps \
            and state.epoch < cfg.epochs:
        stop = _STOP_AFTER_STEPS
    if stop is not None or _checkpoint_due(run, epoch_over):
        guard.check(run.dist, run.run_dir)
        save_checkpoint(run)
    return stop


def _checkpoint_due(run: Run, epoch_over: bool) -> bool:
    """Every --ckpt-every steps; and at each epoch end, or with --ckpt-minutes once that long has passed
    (rank 0's clock decides for every rank, read at logging steps, where the host syncs anyway)."""
    cfg, step = run.cfg, run.state.step
    if step % cfg.ckpt_every == 0:
        return True
    if cfg.ckpt_minutes <= 0:
        return epoch_over
    if step % cfg.log_every:
        return False
    due = time.time() - run.checkpoints.last_submitted >= 60 * cfg.ckpt_minutes
    return dist_utils.broadcast_flag(due, run.device)


def _monitor_due(run: Run, epoch_over: bool) -> bool:
    every = run.cfg.monitor_every
    return run.monitor is not None and (run.state.step % every == 0 if every else epoch_over)


def _monitor(run: Run) -> None:
    """The kNN monitor's row in metrics.jsonl, with the run's clock at this step with and without the
    monitor's own time (time-to-accuracy is read off `training_clock_s`)."""
    state = run.state
    start = time.time()
    accuracy = run.monitor(run.learner.backbone)
    state.monitor_s += time.time() - start
    run.log.metrics({"step": state.step, "epoch": state.epoch, "phase": state.phase, "monitor_knn_top1": accuracy,
                     "wall_clock_s": run.elapsed_s(), "training_clock_s": run.training_clock_s()})


def _log_hand_over(run: Run) -> None:
    """The switch step as a metrics row (TensorBoard's rela/switch_step, curves.png's marker)."""
    state = run.state
    run.log.metrics({"step": state.step, "epoch": state.epoch, "phase": state.phase,
                     "rela_phase_end_step": state.rela_phase_end_step, "rela_phase_ended_by": state.rela_phase_ended_by,
                     "wall_clock_s": run.elapsed_s()})


def _rela_phase_over(run: Run) -> bool:
    """Checked after every RELA step: at the set step (--rela-phase FRACTION), or once the adaptive rule
    fired, as the host learns it a step later without waiting for the device (PhaseController)."""
    fixed_end = run.schedule.rela_end_fixed
    if fixed_end is not None:
        return run.state.step >= fixed_end
    return run.controller.ended_before()


def _hand_over(run: Run, ended_by: str) -> None:
    """From the RELA phase to the SSL method's: the step function and the loader's views change from the next step."""
    state, phase = run.state, method_phase(run.cfg.method)
    run.phase, state.rela_phase_end_step, state.rela_phase_ended_by = phase, state.step, ended_by
    kill_point("hand-over", state.step)  # tests: a death at the switch step
    if run.cfg.handover_teacher_reset:
        reset_teacher_(run.learner.method.teacher_pair())
    run.loader.set_view_mode(phase.views)
    if run.dist.enabled:
        run.model = wrap_for_ranks(run.learner, run.dist, run.device, phase)
    run.log.info(f"RELA phase over at step {state.step} (rho {run.controller.rho.item():.4f}); {phase.name} from here"
                 + (f"; DDP wrapped again (find_unused_parameters={run.model.find_unused_parameters})"
                    if run.dist.enabled else ""))


class _Window:
    """Images and time spent waiting for data since the last logged row (images/s, data-wait fraction)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.wait_s = time.time(), 0, 0.0

    def elapsed(self) -> float:
        return time.time() - self.start

    @contextmanager
    def waiting(self):
        begin = time.time()
        try:
            yield
        finally:
            self.wait_s += time.time() - begin


def _run_folder(cfg: Config, dist: dist_utils.DistInfo) -> Path:
    """--out, or a new runs/DATASET-DATE-TIME (named by rank 0), created and checked writable. A fresh run
    never writes into a folder that holds another run's checkpoints (they would be pruned, and --resume auto
    would pick them up), nor into a folder of other files (config.json, summary.json and backbone.pt would
    overwrite theirs), nor inside the data folder (its files would become part of the data)."""
    if cfg.out is not None:
        run_dir = Path(cfg.out)
    else:
        run_dir = Path(dist_utils.gather_objects(f"runs/{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}", dist)[0])
    # Rank 0 alone checks and creates the folder, and every rank stops alike on its answer: a rank that looked
    # for itself could find rank 0's write probe there and call the folder foreign.
    problem = _run_folder_problem(cfg, run_dir) if dist.is_main else None
    problem = dist_utils.broadcast_object(problem, dist)  # every rank stops alike
    if problem is not None:
        raise RelaError(problem)
    return run_dir


def _run_folder_problem(cfg: Config, run_dir: Path) -> str | None:
    """Why `run_dir` cannot hold this run (one line), or None once it exists and takes a file."""
    if cfg.data is not None and run_dir.resolve().is_relative_to(Path(cfg.data).resolve()):
        return (f"--out {run_dir} is inside the data folder {cfg.data}: the run's files would be read as data; "
                "pass an --out outside it")
    if cfg.resume is None and latest_checkpoint(run_dir) is not None:
        return f"{run_dir} already holds a run's checkpoints: --resume auto continues it; pass another --out for a new run"
    fresh = cfg.resume is None or (cfg.resume == "auto" and latest_checkpoint(run_dir) is None)
    if fresh and (foreign := _foreign_files(run_dir)):
        return (f"--out {run_dir} is not empty and is not a run folder of rela.train (it holds "
                f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): pass a new or empty folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644))
        os.unlink(probe)
    except OSError as err:
        return f"cannot write the run folder {run_dir}: {err.strerror or err} (errno {err.errno})"
    return None


# A run stopped by SIGTERM or SIGUSR1 leaves this beside its checkpoint: {"exit": 75, "reason", "step"}. Under
# torchrun, whose own exit status is 1 whatever its workers' (75 included), a job script requeues on it.
REQUEUE_MARKER = "requeue.json"
# What a run of this trainer leaves in its folder before config.json is written (the run lock, TensorBoard's
# folder, a temporary file of an atomic write, the requeue marker of a run stopped that early).
_EARLY_RUN_FILES = (".lock", "tensorboard", REQUEUE_MARKER)


def _foreign_files(run_dir: Path) -> list[str]:
    """The names in `run_dir` that show it is not a run folder of rela.train; [] for a missing or empty folder
    or a run's (its config.json holds this trainer's options)."""
    if not run_dir.is_dir():
        return []
    names = sorted(p.name for p in run_dir.iterdir())
    config = run_dir / "config.json"
    if config.is_file():
        try:
            saved = json.loads(config.read_bytes())
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and {"dataset", "arch", "method", "seed", "prior"} <= saved.keys():
            return []
        return ["config.json (not a config of rela.train)", *[n for n in names if n != "config.json"]]
    return [n for n in names if n not in _EARLY_RUN_FILES and ".tmp-" not in n]


def _resume_path(cfg: Config, run_dir: Path, log: RunLog) -> Path | None:
    """--resume auto: the newest intact checkpoint (a damaged newer one is named and passed over), or
    None in a folder without any, so a restarted job can always pass --resume auto."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return latest_intact_checkpoint(run_dir, warn=log.info)
    path = Path(cfg.resume)
    if not path.is_file():
        raise RelaError(f"--resume {path}: no such checkpoint")
    return path


def main(argv: list[str] | None = None) -> int:
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        with stop_on_signals():
            run(parse_config(argv))
    except RelaError as err:
        print(f"rela.train: error: {err}", file=sys.stderr)
        return 1
    except StopRequested as stop:  # preemption: the job is to be requeued with --resume auto
        print(f"rela.train: {stop}", file=sys.stderr)
        return EXIT_REQUEUE
    finally:  # main() is also called in-process (tests, benchmarks): leave torch as we found it
        torch.use_deterministic_algorithms(deterministic_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
