import numpy as np
import pytest
import torch

from rela.prior.pca import pca_from_sums


def numpy_targets(x: np.ndarray, k: int) -> np.ndarray:
    """The definition, in float64 NumPy: centre, top-k principal axes, project, standardise."""
    centred = x - x.mean(0)
    covariance = centred.T @ centred / len(x)
    values, vectors = np.linalg.eigh(covariance)
    vectors = vectors[:, ::-1][:, :k]
    projected = centred @ vectors
    return (projected - projected.mean(0)) / projected.std(0)


@pytest.mark.parametrize("n,d,k", [(200, 16, 8), (50, 64, 10), (500, 7, 7), (33, 5, 1)])
def test_pca_targets_match_numpy_float64(n, d, k):
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d) * 5
    t = torch.from_numpy(x)
    projection = pca_from_sums(t.sum(0), t.T @ t, n, k)
    ours = projection.apply(t).double().numpy()
    reference = numpy_targets(x, k)
    assert ours.shape == (n, k)
    # Axes are defined up to sign: align each column's sign, then compare.
    signs = np.sign((ours * reference).sum(0))
    np.testing.assert_allclose(ours, reference * signs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ours.std(0), 1, atol=1e-5)


def test_pca_drops_directions_without_variance():
    rng = np.random.default_rng(0)
    x = np.zeros((100, 6))
    x[:, :3] = rng.normal(size=(100, 3))  # three dimensions carry everything
    t = torch.from_numpy(x)
    projection = pca_from_sums(t.sum(0), t.T @ t, 100, 6)
    assert projection.components.shape == (6, 3)
    assert torch.isfinite(projection.apply(t)).all()


def test_pca_sign_convention_is_deterministic():
    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.normal(size=(80, 10)))
    a = pca_from_sums(t.sum(0), t.T @ t, 80, 4).components
    b = pca_from_sums(t.sum(0), t.T @ t, 80, 4).components
    assert torch.equal(a, b)
    assert (a[a.abs().argmax(0), torch.arange(4)] > 0).all()
