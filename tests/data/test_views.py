import pytest
import torch

from rela.data.views import BYOL_VIEWS, RELA_VIEWS, ViewSpec, augment_batch, random_crop_boxes, resize_center_crop


def test_crop_boxes_stay_inside_and_respect_scale():
    g = torch.Generator().manual_seed(0)
    spec = ViewSpec(crop_scale=(0.2, 0.5))
    boxes = random_crop_boxes(2000, 40, 60, spec, g, "cpu")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 40).all()
    area = w * h / (40 * 60)
    assert area.min() >= 0.15 and area.max() <= 0.55  # rounding to whole pixels moves it a little


@pytest.mark.parametrize("spec", [*BYOL_VIEWS, RELA_VIEWS[0]])
def test_views_have_right_shape_and_range(spec):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = augment_batch(images, spec, 24, g)
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_flip_grayscale_and_solarize_frequencies():
    """Each op, alone at p=0.5, hits about half the samples (binomial bounds, 6 sigma)."""
    n = 2000
    g = torch.Generator().manual_seed(2)
    ramp = torch.linspace(0, 255, 16).round().to(torch.uint8)
    images = torch.zeros(n, 3, 16, 16, dtype=torch.uint8)
    images[:, 0] = ramp  # red ramps left to right, green/blue zero
    plain = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0,
                     blur_p=0, solarize_p=0)
    bound = 6 * (n * 0.25) ** 0.5
    flipped = augment_batch(images, ViewSpec(**{**plain.__dict__, "flip_p": 0.5}), 16, g)
    n_flip = (flipped[:, 0, 0, 0] > flipped[:, 0, 0, -1]).sum().item()
    grey = augment_batch(images, ViewSpec(**{**plain.__dict__, "grayscale_p": 0.5}), 16, g)
    n_grey = (grey[:, 1].amax((1, 2)) > 0.1).sum().item()
    solar = augment_batch(images, ViewSpec(**{**plain.__dict__, "solarize_p": 0.5}), 16, g)
    n_solar = (solar[:, 0, 0, -1] < 0.5).sum().item()
    for count in (n_flip, n_grey, n_solar):
        assert abs(count - n / 2) < bound, count


def test_resize_center_crop_takes_the_centre():
    images = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    images[..., 10:30, 10:30] = 255
    out = resize_center_crop(images, 20, 0.5)  # no resize (shorter side 40 = 20 / 0.5), central 20x20
    assert out.shape == (1, 3, 20, 20) and out.min() == 1.0
