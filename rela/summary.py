"""The end of a run: `evaluate(run)` (linear probe and kNN on frozen backbone features) and
`write_summary(run, results)` (summary.json, backbone.pt and backbone.safetensors, the closing log line)."""
from __future__ import annotations

import time

from rela.data.factory import build_image_source
from rela.eval.frozen import evaluate_frozen
from rela.models.export import save_backbone, write_backbone_safetensors
from rela.run import Run
from rela.utils import distributed as dist_utils
from rela.utils.digest import state_digest
from rela.utils.faults import kill_point
from rela.utils.files import atomic_write_json, write_errors_named


def skipped_on_every_rank(skipped: set[int], dist: dist_utils.DistInfo) -> set[int]:
    """The indices of corrupt files skipped on any rank (a source's `skipped` is its own rank's). Collective."""
    return set().union(*dist_utils.gather_objects(sorted(skipped), dist))


def evaluate(run: Run) -> dict:
    """Linear-probe and kNN top-1 (percent) of the online backbone on the held-out split, and the
    evaluation's own time. Collective: each rank keeps its block of the training features, the validation
    split's are gathered (rela/eval/frozen.py)."""
    cfg = run.cfg
    # Parameters must agree across ranks after training itself. Buffers need not: DDP broadcasts BN
    # statistics only at the start of a forward, so each rank ends with its own last batch's. Rank 0's,
    # for every rank, so that replicas (and evaluation shards) agree.
    digests = {"replica_parameter_digests": dist_utils.gather_objects(state_digest(run.learner, "parameters"), run.dist),
               "replica_buffer_digests_before_broadcast": dist_utils.gather_objects(
                   state_digest(run.learner, "buffers"), run.dist)}
    dist_utils.broadcast_buffers_(run.learner)
    start = time.time()
    val_source = build_image_source(cfg, run.splits.val, run.device, run.use_dali)
    results = evaluate_frozen(run.learner.backbone, run.train_source, val_source, run.splits, cfg, dist=run.dist,
                              autocast_dtype=run.autocast_dtype, protocols=[cfg.probe_protocol],
                              # tests: a death during evaluation
                              after_features=lambda: kill_point("evaluate", run.state.step))[cfg.probe_protocol]
    # Corrupt validation files (--skip-corrupt) are left out of the scores: counted, every rank's.
    skipped_val = skipped_on_every_rank(val_source.skipped, run.dist)
    return {**results, "eval_s": time.time() - start, "skipped_corrupt_in_validation": len(skipped_val), **digests}


def write_summary(run: Run, results: dict) -> dict:
    """summary.json and backbone.pt on rank 0; the summary (every rank gets it). Collective."""
    cfg, state, dist = run.cfg, run.state, run.dist
    # every rank's, not only rank 0's
    skipped_train = skipped_on_every_rank(run.loader.skipped, dist)
    skipped = skipped_train | skipped_on_every_rank(run.train_source.skipped, dist)
    images_seen = sum(dist_utils.gather_objects(state.images_seen, dist))
    replica_digests = dist_utils.gather_objects(state_digest(run.learner), dist)
    summary = {
        **results,
        "replica_weights_identical": len(set(replica_digests)) == 1, "replica_weight_digests": replica_digests,
        "online_probe_top1": state.online_probe_top1, "wall_clock_s": run.elapsed_s(), "monitor_s": state.monitor_s,
        "train_steps": state.step, "images_seen": images_seen,
        "rela_phase_end_step": state.rela_phase_end_step, "rela_phase_ended_by": state.rela_phase_ended_by,
        "target_bank_s": state.target_bank_s,
        "rela_plateau_step": int(run.controller.plateau_step.item()) if run.bank is not None else None,
        "prior": cfg.prior, "budget": cfg.budget, "epochs": cfg.epochs, "world_size": dist.world_size,
        "skipped_corrupt": len(skipped), "skipped_corrupt_in_training": len(skipped_train),
        "device": str(run.device),
    }
    if dist.is_main:
        kept = "the run's checkpoints are intact: --resume auto evaluates again and writes it"
        with write_errors_named(run.run_dir / "backbone.pt", kept):
            save_backbone(run.run_dir / "backbone.pt", run.learner.backbone, arch=cfg.arch, image_size=cfg.image_size,
                          mean=run.splits.mean, std=run.splits.std)
        with write_errors_named(run.run_dir / "backbone.safetensors", kept):
            write_backbone_safetensors(run.run_dir / "backbone.pt")  # the same weights, for users without rela
        with write_errors_named(run.run_dir / "summary.json", kept):
            atomic_write_json(summary, run.run_dir / "summary.json")
        run.log.info(f"linear probe top-1 {summary['linear_probe_top1']:.2f}%, kNN top-1 {summary['knn_top1']:.2f}%, "
                     f"{summary['wall_clock_s']:.1f}s, {state.step} steps, {images_seen} images"
                     + (f", {len(skipped)} corrupt training images skipped" if skipped else "")
                     + (f", {summary['skipped_corrupt_in_validation']} corrupt validation images left out of the "
                        "scores" if summary.get("skipped_corrupt_in_validation") else ""))
        print(f"linear_probe_top1={summary['linear_probe_top1']:.2f} knn_top1={summary['knn_top1']:.2f}")
    return summary
