"""Run by torchrun from tests/core/test_distributed.py: checks, on real ranks, what the trainer's run is
built of. Rank 0 writes the findings as JSON to the path in argv[1]; the test asserts on them."""
from __future__ import annotations

import json
import sys

import torch

from rela.data.views import Normalize
from rela.eval.features import extract_features
from rela.options import resolve_config
from rela.run import build_run
from rela.utils import distributed as dist_utils
from rela.utils.progress import RunLog


def main(out_path: str, bank_dir: str) -> None:
    cfg = resolve_config({"dataset": "digits", "arch": "small_resnet", "image_size": 16, "batch_size": 16,
                          "budget": 0.3, "epochs": 2,
                          "prior": "none", "device": "cpu", "workers": 0, "progress": False, "bank_dir": bank_dir})
    dist = dist_utils.init_distributed("cpu")
    torch.manual_seed(cfg.seed)
    run = build_run(cfg, dist, torch.device("cpu"), run_dir=None, log=RunLog(None, enabled=False))
    findings = {"world_size": dist.world_size, "epochs": []}
    for epoch in range(2):
        mine = [int(i) for batch in run.loader.epoch(epoch) for i in batch.index.tolist()]
        everyone = dist_utils.gather_objects(mine, dist)
        findings["epochs"].append({"by_rank": everyone, "subset": run.sampler.epoch_subset(epoch).tolist()})

    # Evaluation's features: each rank extracts its shard and the shards are gathered; the result must be
    # the single-process one, row for row.
    common = dict(size=cfg.image_size, crop_fraction=run.crop_fraction,
                  normalize=Normalize(run.splits.mean, run.splits.std, run.device), batch_size=50)
    backbone = run.learner.backbone
    gathered_x, gathered_y = extract_features(backbone, run.train_source, dist=dist, **common)
    alone_x, alone_y = extract_features(backbone, run.train_source, dist=dist_utils.DistInfo(), **common)
    findings["gathered_equals_single_process"] = bool(torch.equal(gathered_y, alone_y)
                                                      and torch.allclose(gathered_x, alone_x, atol=1e-6, rtol=0))
    findings["gathered_rows"] = len(gathered_x)
    findings["train_images"] = len(run.splits.train)
    if dist.is_main:
        with open(out_path, "w") as fh:
            json.dump(findings, fh)
    dist_utils.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
