"""--recipe reference: the reference code's choices, each also an option of its own, end to end."""
from __future__ import annotations

import json

import pytest
import torch

from builders import FAST_ARGS, training_rows
from rela.eval.linear_probe import linear_probe_reference
from rela.options import parse_config
from rela.train import main
from rela.utils.checkpoint_files import latest_checkpoint


def test_reference_recipe_resolves_to_the_reference_choices_under_the_users_flags():
    cfg = parse_config(["--recipe", "reference", "--dataset", "cifar10"])
    assert (cfg.optimizer, cfg.weight_decay, cfg.lr_schedule, cfg.warmup_epochs) == ("adamw", 0.01, "constant", 0)
    assert cfg.lr * cfg.batch_size / 256 == pytest.approx(1e-3)  # the reference's absolute learning rate
    assert (cfg.momentum_schedule, cfg.base_momentum) == ("constant", 0.99)
    assert (cfg.proj_hidden, cfg.proj_dim, cfg.rela_map_bias) == (0, 256, True)
    assert (cfg.rela_views, cfg.probe_protocol) == ("reference", "reference")
    assert cfg.byol_blur is False  # 32 px
    assert parse_config(["--recipe", "reference", "--dataset", "imagefolder", "--image-size", "64"]).byol_blur
    overridden = parse_config(["--recipe", "reference", "--dataset", "cifar10", "--weight-decay", "0.5",
                               "--rela-views", "project"])
    assert overridden.weight_decay == 0.5 and overridden.rela_views == "project"
    project = parse_config(["--dataset", "cifar10"])
    assert (project.lr_schedule, project.momentum_schedule, project.probe_protocol) == ("cosine", "cosine", "project")


def test_reference_recipe_trains_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--device", "cpu", "--recipe", "reference", "--prior", "rand", "--budget", "0.2",
                 "--epochs", "2", "--rela-phase", "0.5", "--log-every", "1", "--probe-epochs", "4",
                 "--out", str(out), "--bank-dir", str(tmp_path / "banks")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["probe_protocol"] == "reference" and summary["linear_probe_top1_std"] is not None
    rows = training_rows(out)
    assert all(r["lr"] == pytest.approx(1e-3) for r in rows) and {r["momentum"] for r in rows} == {0.99}
    assert {r["step_fn"] for r in rows} == {"rela_step", "byol_step"}
    learner = torch.load(latest_checkpoint(out), weights_only=False)["learner"]
    feature_dim = learner["method.projector.0.weight"].shape[1]
    assert learner["method.projector.0.weight"].shape[0] == 2 * feature_dim  # d-2d-256 heads
    assert learner["method.predictor.0.weight"].shape == (2 * feature_dim, 256)
    assert "rela_map.bias" in learner  # affine W


def test_reference_recipe_gives_dino_the_reference_codes_head_and_loss_settings(tmp_path):
    """LINs-lab/ReLA methods/dino.py: d -> 2048 (BN, GELU) -> 256 before 2,048 prototypes, lightly's DINOLoss
    (teacher temperature 0.04 throughout), global crops 0.4-1; the paper's head and temperatures otherwise."""
    cfg = parse_config(["--recipe", "reference", "--dataset", "cifar10", "--method", "dino"])
    assert (cfg.dino_head_layers, cfg.dino_head_bn, cfg.proj_hidden, cfg.proj_dim, cfg.dino_out_dim) == (2, True, 2048, 256, 2048)
    assert (cfg.dino_warmup_teacher_temp, cfg.dino_teacher_temp, cfg.byol_crop_min_scale) == (0.04, 0.04, 0.4)
    assert (cfg.base_momentum, cfg.momentum_schedule) == (0.99, "constant")
    assert parse_config(["--recipe", "reference", "--method", "byol"]).dino_head_layers == 3  # DINO's alone
    project = parse_config(["--dataset", "cifar10", "--method", "dino"])
    assert (project.dino_head_layers, project.dino_head_bn, project.dino_teacher_temp) == (3, False, 0.07)
    out = tmp_path / "run"
    assert main([*FAST_ARGS, "--device", "cpu", "--recipe", "reference", "--method", "dino", "--prior", "rand",
                 "--budget", "0.2", "--epochs", "2", "--rela-phase", "0.5", "--proj-hidden", "64", "--proj-dim", "16",
                 "--dino-out-dim", "32", "--probe-epochs", "2", "--out", str(out), "--bank-dir", str(tmp_path / "banks")]) == 0
    assert {r["step_fn"] for r in training_rows(out)} == {"rela_step", "dino_step"}
    learner = torch.load(latest_checkpoint(out), weights_only=False)["learner"]
    assert {k for k in learner if k.startswith("method.head.mlp.")} == {
        "method.head.mlp.0.weight", "method.head.mlp.0.bias", "method.head.mlp.1.weight", "method.head.mlp.1.bias",
        "method.head.mlp.1.running_mean", "method.head.mlp.1.running_var", "method.head.mlp.1.num_batches_tracked",
        "method.head.mlp.3.weight", "method.head.mlp.3.bias"}  # Linear, BatchNorm, GELU, Linear
    assert learner["method.head.mlp.3.weight"].shape == (16, 64) and learner["method.head.prototypes"].shape == (32, 16)


def test_reference_probe_protocol_reports_the_last_three_epochs():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    labels = torch.arange(400) % 4
    x = centres[labels] + torch.randn(400, 16, generator=g)
    mean, std = linear_probe_reference(x[:300], labels[:300], x[300:], labels[300:], 4, epochs=300, seed=0)
    assert mean > 0.95 and 0 <= std < 0.05
    assert (mean, std) == linear_probe_reference(x[:300], labels[:300], x[300:], labels[300:], 4, epochs=300, seed=0)
    early, _ = linear_probe_reference(x[:300], labels[:300], x[300:], labels[300:], 4, epochs=3, seed=0,
                                      lr=1e-6)
    assert early < 0.9  # it learns over epochs: the last three are not the first


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_views_options_reach_both_loaders(loader):
    from rela.data.budget import BudgetSampler
    from rela.data.datasets import load_dataset
    from rela.data.factory import create_loaders
    from rela.data.views import RELA_VIEW, RELA_VIEW_REFERENCE, Normalize
    from rela.methods.registry import method_class

    def views(*flags: str):
        cfg = parse_config(["--device", "cpu", "--loader", loader, "--workers", "1", *flags])
        splits = load_dataset(cfg.dataset, None)
        made = create_loaders(cfg, splits, BudgetSampler(len(splits.train), 0.2, 16, seed=0),
                              Normalize(splits.mean, splits.std, torch.device("cpu")), torch.device("cpu"), seed=0,
                              method_views=method_class(cfg.method).views)
        made.train_loader.set_view_mode("rela")
        rela = made.train_loader.views
        made.train_loader.set_view_mode("byol")
        return rela, made.train_loader.views

    rela, byol = views("--recipe", "reference", "--image-size", "16")
    assert rela == (RELA_VIEW_REFERENCE, RELA_VIEW_REFERENCE) and all(v.blur_p == 0 for v in byol)
    rela, byol = views()
    assert rela == (RELA_VIEW, RELA_VIEW) and byol[0].blur_p == 1.0
    rela, _ = views("--rela-views", "reference", "--rela-crop-min-scale", "0.3")
    assert rela[0].crop_scale == (0.3, 1.0) and rela[0].grayscale_p == 0.2
