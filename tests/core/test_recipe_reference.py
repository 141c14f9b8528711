"""--recipe reference restores every choice of the reference code (LINs-lab/ReLA) that an option can express:
the rule's averages at scale 1, ImageNet's normalisation, the prior's whole-frame crop in fp32, SyncBatchNorm
with several CUDA ranks. Each is also an option of its own, and the user's flag wins over the recipe."""
from __future__ import annotations

import pytest
import torch

from builders import FAST_ARGS
from rela.data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_dataset
from rela.errors import RelaError
from rela.options import parse_config, resolve_config
from rela.prior.target_bank import prior_precision
from rela.run import build_run, sync_batchnorm_wanted
from rela.utils.distributed import DistInfo
from rela.utils.progress import RunLog

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _build(tmp_path, *flags: str):
    """A run of the digits dataset (a fifth of it to train on: a bank in ~0.5 s) with a rand prior, its bank in
    tmp_path/banks, no monitor."""
    cfg = parse_config([*FAST_ARGS, "--val-fraction", "0.8", "--prior", "rand", "--no-monitor",
                        "--bank-dir", str(tmp_path / "banks"), *flags])
    torch.manual_seed(cfg.seed)
    return build_run(cfg, DistInfo(), CPU, run_dir=None, log=RunLog(None, enabled=False))


def test_reference_recipe_takes_the_reference_averages_over_the_mnist5k_preset():
    assert resolve_config({"dataset": "mnist5k"}).rela_averaging_scale == 5.0  # the preset's
    assert resolve_config({"dataset": "mnist5k", "recipe": "reference"}).rela_averaging_scale == 1.0
    assert resolve_config({"dataset": "digits", "recipe": "reference"}).rela_averaging_scale == 1.0
    assert resolve_config({"dataset": "mnist5k", "recipe": "reference",
                           "rela_averaging_scale": 5.0}).rela_averaging_scale == 5.0  # the user's flag wins


def test_reference_recipe_hands_over_at_once_and_keeps_the_teacher():
    project = resolve_config({"dataset": "mnist5k"})
    assert (project.handover, project.handover_teacher_reset) == ("linear", True)  # the project's default
    reference = resolve_config({"dataset": "mnist5k", "recipe": "reference"})
    assert (reference.handover, reference.handover_teacher_reset) == ("hard", False)
    assert parse_config(["--recipe", "reference", "--handover", "rho"]).handover == "rho"  # the user's flag wins
    assert parse_config(["--no-handover-teacher-reset"]).handover_teacher_reset is False


def test_imagenet_statistics_reach_the_loader_the_prior_and_evaluation(tmp_path, monkeypatch):
    assert resolve_config({"dataset": "mnist5k"}).norm_stats == "dataset"
    assert resolve_config({"dataset": "mnist5k", "recipe": "reference"}).norm_stats == "imagenet"
    import rela.run

    built = []

    class RecordedNormalize(rela.run.Normalize):
        def __init__(self, mean, std, *args, **kwargs):
            built.append((tuple(mean), tuple(std)))
            super().__init__(mean, std, *args, **kwargs)

    monkeypatch.setattr(rela.run, "Normalize", RecordedNormalize)
    run = _build(tmp_path, "--norm-stats", "imagenet")
    imagenet = (IMAGENET_MEAN, IMAGENET_STD)
    assert built[0] == imagenet  # the training views' (the loader's)
    assert built[1] == imagenet  # the rand prior's input
    assert f"mean={list(IMAGENET_MEAN)} std={list(IMAGENET_STD)}" in run.bank.key["preprocessing"]
    assert (run.splits.mean, run.splits.std) == imagenet  # evaluation, the monitor and backbone.pt read these
    dataset_stats = load_dataset("digits", None)
    assert (dataset_stats.mean, dataset_stats.std) != imagenet


def test_the_standalone_evaluator_normalises_as_the_run_did(tmp_path, monkeypatch):
    import rela.eval.standalone as standalone
    from rela.models.backbones import build_backbone

    path = tmp_path / "weights.pth"
    torch.save(build_backbone("small_resnet").state_dict(), path)
    seen = {}

    def fake_evaluate_frozen(backbone, train_source, val_source, splits, cfg, **kwargs):
        seen["stats"] = (splits.mean, splits.std)
        return {}

    monkeypatch.setattr(standalone, "evaluate_frozen", fake_evaluate_frozen)
    args = standalone.build_parser().parse_args([str(path), "--dataset", "digits", "--arch", "small_resnet",
                                                 "--device", "cpu", "--norm-stats", "imagenet"])
    standalone.evaluate_backbone(args)
    assert seen["stats"] == (IMAGENET_MEAN, IMAGENET_STD)
    assert "norm_stats" in standalone.FROM_RUN  # a run's own choice carries over


def test_a_changed_bank_crop_fraction_rebuilds_the_bank(tmp_path):
    assert resolve_config({"dataset": "imagefolder"}).bank_crop_fraction is None  # evaluation's rule
    assert resolve_config({"dataset": "imagefolder", "recipe": "reference"}).bank_crop_fraction == 1.0
    first = _build(tmp_path)
    assert "fraction=1.0" in first.bank.key["preprocessing"]  # in-memory digits: the whole frame
    cropped = _build(tmp_path, "--bank-crop-fraction", "0.5")
    assert not cropped.bank.reused and "fraction=0.5" in cropped.bank.key["preprocessing"]
    assert cropped.crop_fraction == 1.0  # evaluation's crop is not the bank's
    assert _build(tmp_path, "--bank-crop-fraction", "0.5").bank.reused
    with pytest.raises(RelaError, match="--bank-crop-fraction"):
        parse_config([*FAST_ARGS, "--bank-crop-fraction", "0"])


def test_the_prior_precision_is_chosen_and_keys_the_bank(tmp_path):
    assert resolve_config({"dataset": "mnist5k"}).prior_precision == "auto"
    assert resolve_config({"dataset": "mnist5k", "recipe": "reference"}).prior_precision == "fp32"
    assert (prior_precision(CUDA, "auto"), prior_precision(CUDA, "fp32"), prior_precision(CPU, "auto")) == (
        "bf16", "fp32", "fp32")
    fp32 = _build(tmp_path)
    assert fp32.bank.key["precision"] == "fp32"
    bf16 = _build(tmp_path, "--prior-precision", "bf16")  # CPU autocast
    assert bf16.bank.key["precision"] == "bf16" and not bf16.bank.reused
    assert torch.isfinite(bf16.bank.targets.float()).all()


def test_sync_batchnorm_follows_the_reference_recipe_with_several_cuda_ranks():
    reference = resolve_config({"dataset": "mnist5k", "recipe": "reference"})
    assert sync_batchnorm_wanted(reference, 2, CUDA)
    assert not sync_batchnorm_wanted(reference, 1, CUDA)  # one rank: nothing to synchronise
    assert not sync_batchnorm_wanted(reference, 2, CPU)  # no CPU SyncBatchNorm: a CPU run does not fail
    assert not sync_batchnorm_wanted(resolve_config({"dataset": "mnist5k"}), 2, CUDA)  # the project's per-rank BN
    assert not sync_batchnorm_wanted(resolve_config({"recipe": "reference", "sync_bn": False}), 2, CUDA)
    assert sync_batchnorm_wanted(resolve_config({"sync_bn": True}), 2, CUDA)
    with pytest.raises(RelaError, match="--sync-bn needs CUDA"):
        sync_batchnorm_wanted(resolve_config({"sync_bn": True}), 1, CPU)
