"""The two augmented views: BYOL's asymmetric pair and RELA's pair, applied to whole batches.

`ViewSpec` is the one description of a view that both loaders (torch here, DALI in rela/data/dali/)
implement. `augment_batch` applies a spec to a uint8 batch on its own device, one sample's parameters at
a time drawn from a generator, so the view switch takes effect at exactly the step the trainer asks for
(no worker process has prefetched batches with the old views).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


@dataclass(frozen=True)
class ViewSpec:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


# BYOL (Grill et al. 2020, table 6): the views differ only in blur and solarize probabilities.
BYOL_VIEWS = (ViewSpec(blur_p=1.0, solarize_p=0.0), ViewSpec(blur_p=0.1, solarize_p=0.2))
# RELA regresses static targets computed on the center crop. The project's views keep its colours close
# to that: a light jitter, no grayscale, no blur or solarize, but crops from a quarter of the image.
RELA_VIEW = ViewSpec(crop_scale=(0.25, 1.0), jitter_p=0.3, brightness=0.2, contrast=0.2, saturation=0.1,
                     hue=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
RELA_VIEWS = (RELA_VIEW, RELA_VIEW)
# The reference code's (LINs-lab/ReLA boostor/rela.py TransformReLA): RandomResizedCrop(0.5, 1), flip,
# ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2.
RELA_VIEW_REFERENCE = ViewSpec(crop_scale=(0.5, 1.0), jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8,
                               hue=0.2, grayscale_p=0.2, blur_p=0.0, solarize_p=0.0)
VIEW_MODES = {"byol": BYOL_VIEWS, "rela": RELA_VIEWS}


def view_modes(rela_views: str = "project", byol_blur: bool = True, method: str = "byol",
               method_views: tuple[ViewSpec, ViewSpec] = BYOL_VIEWS) -> dict[str, tuple[ViewSpec, ViewSpec]]:
    """The view pair of each mode: RELA's 'project' or 'reference' views under "rela"; the SSL method's own
    pair (its module's `views`) under its name, with or without blur."""
    ssl = method_views if byol_blur else tuple(replace(v, blur_p=0.0) for v in method_views)
    rela = {"project": RELA_VIEWS, "reference": (RELA_VIEW_REFERENCE, RELA_VIEW_REFERENCE)}[rela_views]
    return {method: ssl, "rela": rela}


def view_pair(mode: str, crop_min_scale: float | None = None, modes: dict | None = None
              ) -> tuple[ViewSpec, ViewSpec]:
    """The two specs of `mode` ('rela' or a method's name) in `modes` (default VIEW_MODES), with the crop's smallest
    scale overridden if given."""
    pair = (modes or VIEW_MODES)[mode]
    if crop_min_scale is None:
        return pair
    return tuple(replace(v, crop_scale=(crop_min_scale, v.crop_scale[1])) for v in pair)


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the side, odd, as in BYOL (23 px at 224)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _coin(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def _per_sample(value: int | torch.Tensor, n: int, device) -> torch.Tensor:
    """(n,) float32 on `device`: a tensor converted on its device, an int filled in (no host-to-device copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).expand(n)
    return torch.full((n,), float(value), device=device)


def random_crop_boxes(n: int, height: int | torch.Tensor, width: int | torch.Tensor, spec: ViewSpec,
                      gen: torch.Generator, device) -> torch.Tensor:
    """RandomResizedCrop's boxes (x1, y1, x2, y2) in pixels, as torchvision draws them: 10 tries per sample
    of an area (a fraction `crop_scale` of the image's) and a ratio (log-uniform in `crop_ratio`), the first
    that fits; else the largest central box whose ratio is within `crop_ratio` (the whole image if its own
    ratio is). height, width: every image's (ints), or each sample's own ((n,) tensors on `device`)."""
    tries = 10
    height, width = _per_sample(height, n, device), _per_sample(width, n, device)
    area = (height * width)[:, None]
    scale = _uniform(n * tries, *spec.crop_scale, gen, device).view(n, tries) * area
    log_ratio = _uniform(n * tries, math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), gen, device)
    ratio = torch.exp(log_ratio).view(n, tries)
    w = torch.sqrt(scale * ratio).round()
    h = torch.sqrt(scale / ratio).round()
    ok = (w >= 1) & (h >= 1) & (w <= width[:, None]) & (h <= height[:, None])
    found = ok.any(1)
    pick = ok.float().argmax(1, keepdim=True)  # the first try that fits
    low, high = spec.crop_ratio
    fallback_w = torch.where(width / height > high, torch.round(height * high).clamp(min=1), width)
    fallback_h = torch.where(width / height < low, torch.round(width / low).clamp(min=1), height)
    w = torch.where(found, w.gather(1, pick)[:, 0], fallback_w)
    h = torch.where(found, h.gather(1, pick)[:, 0], fallback_h)
    x1 = torch.floor(torch.rand(n, generator=gen, device=device) * (width - w + 1))
    y1 = torch.floor(torch.rand(n, generator=gen, device=device) * (height - h + 1))
    x1 = torch.where(found, x1, torch.floor((width - w) / 2))
    y1 = torch.where(found, y1, torch.floor((height - h) / 2))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor[:, None, None, None] * a + (1 - factor[:, None, None, None]) * b).clamp_(0, 1)


_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_MATRICES: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _yiq_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB -> YIQ and its inverse, made once per device and dtype: built from a Python list and inverted
    on the device for every view, they cost two host syncs per view (a pageable copy, linalg.inv's check).
    Inverted on the CPU in `dtype`, as the CPU path always did, then copied once."""
    key = (device, dtype)
    if key not in _YIQ_MATRICES:
        to_yiq = torch.tensor(_RGB_TO_YIQ, dtype=dtype)
        _YIQ_MATRICES[key] = (to_yiq.to(device), torch.linalg.inv(to_yiq).to(device))
    return _YIQ_MATRICES[key]


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    # A hue shift is a rotation of the chroma plane; in YIQ it is a plain 2-D rotation.
    to_yiq, from_yiq = _yiq_matrices(x.device, x.dtype)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    angle = turns * 2 * math.pi
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    return torch.einsum("ij,bjhw->bihw", from_yiq, yiq).clamp_(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    n, c, h, w = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, k)
    flat = x.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def augment_batch(images: torch.Tensor, spec: ViewSpec, out_size: int, gen: torch.Generator,
                  extents: torch.Tensor | None = None) -> torch.Tensor:
    """One view of a batch.

    images: (B, 3, H, W) uint8 on any device. Returns (B, 3, out_size, out_size) float32 in [0, 1]
    (normalisation is the caller's). Random parameters come from `gen`, which lives on images' device.
    extents: None, every image fills its H x W; or (B, 2) int64 on images' device, each image's own (height,
    width), held in a canvas as the torch loader lays files out (loader.py `frame_canvas`): at the top left,
    transposed where height > width, its last row and column repeated once past it. Crops are then drawn
    within each image's own extent and come out in its own orientation.
    """
    n = images.shape[0]
    device = images.device
    x = images.float().div_(255)
    if extents is None:
        boxes = random_crop_boxes(n, images.shape[2], images.shape[3], spec, gen, device)
    else:
        height, width = extents.unbind(1)
        boxes = random_crop_boxes(n, height, width, spec, gen, device)
        transposed = height > width
        boxes = torch.where(transposed[:, None], boxes.view(n, 2, 2).flip(-1).reshape(n, 4), boxes)
    rois = torch.cat([torch.arange(n, device=device, dtype=x.dtype)[:, None], boxes], dim=1)
    # roi_align samples a bilinear grid per output bin: crop and resize of every sample in one call.
    x = roi_align(x, rois, output_size=out_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    if extents is not None:
        x = torch.where(transposed[:, None, None, None], x.transpose(-1, -2), x)
    flip = _coin(n, spec.flip_p, gen, device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if spec.jitter_p > 0:
        jitter = _coin(n, spec.jitter_p, gen, device)
        one = torch.ones(n, device=device)
        b = torch.where(jitter, _uniform(n, 1 - spec.brightness, 1 + spec.brightness, gen, device), one)
        c = torch.where(jitter, _uniform(n, 1 - spec.contrast, 1 + spec.contrast, gen, device), one)
        s = torch.where(jitter, _uniform(n, 1 - spec.saturation, 1 + spec.saturation, gen, device), one)
        x = (x * b[:, None, None, None]).clamp_(0, 1)
        x = _blend(x, _grey(x).mean((1, 2, 3), keepdim=True).expand_as(x), c)
        x = _blend(x, _grey(x).expand_as(x), s)
        if spec.hue > 0:
            turns = torch.where(jitter, _uniform(n, -spec.hue, spec.hue, gen, device), one * 0)
            x = _rotate_hue(x, turns)
    if spec.grayscale_p > 0:
        grey = _coin(n, spec.grayscale_p, gen, device)
        x = torch.where(grey[:, None, None, None], _grey(x).expand_as(x), x)
    if spec.blur_p > 0:
        blur = _coin(n, spec.blur_p, gen, device)
        sigma = _uniform(n, *spec.blur_sigma, gen, device)
        x = torch.where(blur[:, None, None, None], _gaussian_blur(x, sigma, blur_kernel_size(out_size)), x)
    if spec.solarize_p > 0:
        solarize = _coin(n, spec.solarize_p, gen, device)
        x = torch.where(solarize[:, None, None, None] & (x >= 0.5), 1 - x, x)
    return x


class Normalize:
    """(x - mean) / std per channel, cast and laid out for the model."""

    def __init__(self, mean, std, device, dtype=torch.float32, channels_last: bool = False):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.dtype, self.channels_last = dtype, channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - self.mean) / self.std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def resize_center_crop(images: torch.Tensor, size: int, crop_fraction: float) -> torch.Tensor:
    """Deterministic eval/prior preprocessing: resize the shorter side to size / crop_fraction, then
    take the central size x size. images: (B, 3, H, W) uint8 -> float32 in [0, 1]."""
    x = images.float().div_(255)
    h, w = x.shape[-2:]
    short = round(size / crop_fraction)
    new_h, new_w = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top: top + size, left: left + size].clamp_(0, 1)
