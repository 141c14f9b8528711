"""The trainer pairs image i with the target bank's row i, and row i is PCA(prior(image i)).

The images show their own index in grey bands (tests/builders.py), so the index can be read back from
any view the loaders make. The prior is a TorchScript module whose features are the bands' means: the
bank's rows are then known up to the PCA's choice of axes, which the Gram matrix does not see."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rela.methods.learner as learner_module
from builders import FAST_ARGS, decode_ids, write_striped_cifar10
from rela.prior.specs import IMAGENET_MEAN, IMAGENET_STD
from rela.train import main

PER_BATCH = 12  # 60 training images, ids 0..59


class BandMeans(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 3)).reshape(x.shape[0], 8, 4).mean(-1)


def whitened_gram(features: np.ndarray) -> np.ndarray:
    """Y Y^T for Y the standardised principal components of `features` (float64, every non-null axis)."""
    centred = features - features.mean(0)
    covariance = centred.T @ centred / len(features)
    return centred @ np.linalg.pinv(covariance, rcond=1e-6, hermitian=True) @ centred.T


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_each_image_is_trained_towards_its_own_target(tmp_path, monkeypatch, loader):
    data = write_striped_cifar10(tmp_path / "cifar", per_batch=PER_BATCH)
    prior_file = tmp_path / "bands.pt"
    torch.jit.script(BandMeans()).save(str(prior_file))

    seen = []  # (ids read from view 1, from view 2, the targets the step was given)
    real_rela_step = learner_module.rela_step

    def spy(backbone, rela_map, view1, view2, targets, **kwargs):
        seen.append((decode_ids(view1), decode_ids(view2), targets.detach().cpu().clone()))
        return real_rela_step(backbone, rela_map, view1, view2, targets, **kwargs)

    monkeypatch.setattr(learner_module, "rela_step", spy)
    banks = tmp_path / "banks"
    assert main([*FAST_ARGS, "--device", "cpu", "--loader", loader, "--dataset", "cifar10", "--data", str(data),
                 "--image-size", "32", "--prior", f"torchscript:{prior_file}", "--prior-size", "32",
                 "--budget", "1.0", "--epochs", "2", "--rela-phase", "1.0", "--rela-crop-min-scale", "1.0",
                 "--batch-size", str(PER_BATCH),  # divides the 60 images: every epoch trains on each of them
                 "--out", str(tmp_path / "run"), "--bank-dir", str(banks)]) == 0

    (bank_file,) = banks.glob("bank-*.pt")
    bank = torch.load(bank_file, weights_only=False)["targets"].double()
    n = 5 * PER_BATCH
    assert bank.shape == (n, 6)  # the two reference bands are constant: 6 axes of variance

    # Row i of the bank is image i's: its Gram matrix is that of the prior's features in dataset order.
    ids = np.arange(n)
    levels = np.where((ids[:, None] >> np.arange(6)) & 1, 200.0, 60.0) / 255
    images = np.concatenate([np.full((n, 1), 200 / 255), levels, np.full((n, 1), 60 / 255)], axis=1)
    mean, std = np.array(IMAGENET_MEAN)[None, :, None], np.array(IMAGENET_STD)[None, :, None]
    expected = whitened_gram(((images[:, None, :] - mean) / std).mean(1))  # the prior's input: (n, 3, 8) bands
    # The targets are stored in bf16 (half an ulp is 2^-9 of a value): each product of two of them is off by
    # at most about 2^-8 of its size; a row of another image would be off by whole units.
    gram, bound = (bank @ bank.T).numpy(), (bank.abs() @ bank.abs().T).numpy()
    assert (np.abs(gram - expected) <= 1e-3 + 2 ** -7 * bound).all(), np.abs(gram - expected).max()

    # Every step gave each image of its batch that image's row, in both views, through the whole run.
    assert seen, "the RELA step never ran"
    for ids1, ids2, targets in seen:
        assert (ids1 == ids2).all()
        torch.testing.assert_close(targets.double(), bank[torch.as_tensor(ids1)], atol=1e-6, rtol=0)
    assert set(np.concatenate([s[0] for s in seen]).tolist()) == set(range(n))
