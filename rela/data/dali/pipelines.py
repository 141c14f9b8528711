"""The DALI graphs: two augmented views for training, resize + center crop for evaluation.

Each graph is a pure function of what the host feeds it per step: the images (encoded file bytes, or
uint8 HWC arrays) and, per sample, every random choice of the step (crop window, flip, jitter factors,
grayscale, blur, solarize), drawn on the host in driver.py. The graphs hold no random operators, so a
step's views are fixed when the step is fed, and feeding it again gives the same views.

Each graph is a `@pipeline_def` function: called with DALI's pipeline arguments (`batch_size`,
`num_threads`, `device_id`) and its own, it returns an unbuilt Pipeline. `device_id` only moves
operators: with a GPU, JPEG decode becomes `mixed` (nvJPEG, the hardware decoder where present) and the
augmentations run on the GPU; with `device_id=None` the same graph runs on CPU operators (the CPU twin,
what the tests exercise). Every graph has `prefetch_queue_depth=1`: the host decides how many steps are
in flight (driver.py); a deeper queue makes DALI's first schedule_run run ahead on inputs not fed yet.
"""
from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.pipeline import Pipeline

ENCODED = "encoded"  # files: one uint8 1-D array of file bytes per sample
ARRAYS = "images"  # in-memory datasets: one uint8 (H, W, 3) array per sample

# Per-sample inputs of each training view, fed as "view1_<name>" and "view2_<name>".
VIEW_INPUTS = {
    "crop_start": (types.FLOAT, 1),  # (y0, x0) of the crop window, pixels of the decoded image
    "crop_end": (types.FLOAT, 1),  # (y1, x1)
    "flip": (types.INT32, 0),  # 1: mirror horizontally
    "brightness": (types.FLOAT, 0),  # multiplier (1: unchanged)
    "contrast": (types.FLOAT, 0),  # blend factor with the image's mean grey (1: unchanged)
    "saturation": (types.FLOAT, 0),  # blend factor with the pixel's grey (1: unchanged, 0: grayscale)
    "hue": (types.FLOAT, 0),  # rotation of the chroma plane, degrees (fn.hsv's convention)
    "blur_window": (types.INT32, 0),  # Gaussian window, odd; 1 leaves the sample unchanged
    "blur_sigma": (types.FLOAT, 0),
    "solarize": (types.FLOAT, 0),  # 1: invert pixels >= 0.5 (only in views built with solarize=True)
}
# Per-sample inputs of the evaluation graph.
EVAL_INPUTS = {
    "roi_start": (types.FLOAT, 1),  # (y0, x0): the region of the image that becomes the output
    "roi_end": (types.FLOAT, 1),
    "out_size": (types.FLOAT, 1),  # (height, width) of the output
}
# ITU-R 601 luma, the grey of views.py's reference and of fn.hsv.
_LUMA = (0.299, 0.587, 0.114)


def _on_gpu() -> bool:
    """Whether the pipeline being defined runs on a GPU (it was given a device_id)."""
    return Pipeline.current().device_id is not None


# nvJPEG's buffers grow to the largest image met, reallocating (a device sync) each time one is larger;
# NVIDIA's ResNet-50 DALI example pads them to ImageNet's largest images from the start.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512
# The share of JPEGs sent to the hardware decoder (A100, H100/H200: NVJPG engines), the rest to CUDA
# kernels; DALI's suggested split for these GPUs.
HW_DECODER_LOAD = 0.65


def decoder_args(on_gpu: bool) -> dict:
    """fn.decoders.image's arguments. No EXIF rotation: the torch loader (PIL) ignores it too, and crop
    windows are drawn on the header's (unrotated) width and height. On the GPU (`mixed`), fancy chroma
    upsampling as libjpeg-turbo (PIL, and DALI's CPU decoder) does, so a JPEG decodes to the same pixels
    whichever loader made a bank or a batch; and the memory hints. The CPU decoder gets none of these."""
    args = {"device": "mixed" if on_gpu else "cpu", "output_type": types.RGB, "adjust_orientation": False}
    if on_gpu:
        args.update(jpeg_fancy_upsampling=True, device_memory_padding=DEVICE_MEMORY_PADDING,
                    host_memory_padding=HOST_MEMORY_PADDING, hw_decoder_load=HW_DECODER_LOAD)
    return args


def _images(source: str, on_gpu: bool):
    if source == ENCODED:
        encoded = fn.external_source(name=ENCODED, dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, **decoder_args(on_gpu))
    if source == ARRAYS:
        images = fn.external_source(name=ARRAYS, dtype=types.UINT8, ndim=3, layout="HWC")
        return images.gpu() if on_gpu else images
    raise ValueError(f"unknown image source {source!r}")


def view_inputs(solarize: bool) -> dict:
    """The per-sample inputs of a view; one that never solarizes has no solarize op and input."""
    return {name: kind for name, kind in VIEW_INPUTS.items() if solarize or name != "solarize"}


def _inputs(spec: dict, prefix: str = "") -> dict:
    return {name: fn.external_source(name=prefix + name, dtype=dtype, ndim=ndim)
            for name, (dtype, ndim) in spec.items()}


def _view(images, prefix: str, *, solarize: bool, on_gpu: bool, size: int, mean, std, dtype, layout: str):
    """One view, in views.augment_batch's order: crop + resize, brightness, contrast, saturation + hue
    (+ grayscale), blur, solarize; then normalise, mirror, cast and lay out in one pass."""
    p = _inputs(view_inputs(solarize), prefix)

    def on_device(node):  # arithmetic needs its per-sample scalars where the images are
        return node.gpu() if on_gpu else node

    x = fn.resize(images, roi_start=p["crop_start"], roi_end=p["crop_end"], size=(size, size),
                  interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)  # 0..255
    x = dmath.clamp(x * on_device(p["brightness"] * (1 / 255)), 0.0, 1.0)
    channel_mean = fn.reductions.mean(x, axes=(0, 1))
    grey_mean = _LUMA[0] * channel_mean[0] + _LUMA[1] * channel_mean[1] + _LUMA[2] * channel_mean[2]
    contrast = on_device(p["contrast"])
    x = dmath.clamp(contrast * x + (1 - contrast) * grey_mean, 0.0, 1.0)
    # fn.hsv scales and rotates the chroma plane of YIQ, exactly views.py's saturation blend with the
    # pixel's luma and its hue rotation; grayscale is saturation 0 in the same pass.
    x = dmath.clamp(fn.hsv(x, saturation=p["saturation"], hue=p["hue"], dtype=types.FLOAT), 0.0, 1.0)
    x = fn.gaussian_blur(x, window_size=p["blur_window"], sigma=p["blur_sigma"])
    if solarize:  # a fused arithmetic expression: costly on the CPU, so left out where never used
        flag = on_device(p["solarize"])
        x = x + flag * (x >= 0.5) * (1 - 2 * x)
    # Flipping last is equivalent (every op after the crop is mirror-symmetric) and free in this pass.
    return fn.crop_mirror_normalize(x, mirror=p["flip"], mean=list(mean), std=list(std), dtype=dtype,
                                    output_layout=layout)


@pipeline_def(prefetch_queue_depth=1)
def train_pipeline(source: str, *, size: int, mean, std, half: bool, channels_last: bool,
                   solarize: tuple[bool, bool] = (True, True)):
    """Outputs (view1, view2): (B, 3, size, size) float ('CHW') or (B, size, size, 3) ('HWC', for
    channels_last), float16 if `half` else float32, normalised with mean/std (fractions of 1).
    solarize: which views have the solarize op."""
    on_gpu = _on_gpu()
    images = _images(source, on_gpu)
    common = dict(on_gpu=on_gpu, size=size, mean=mean, std=std,
                  dtype=types.FLOAT16 if half else types.FLOAT, layout="HWC" if channels_last else "CHW")
    return (_view(images, "view1_", solarize=solarize[0], **common),
            _view(images, "view2_", solarize=solarize[1], **common))


@pipeline_def(prefetch_queue_depth=1)
def eval_pipeline(source: str):
    """Output: uint8 (B, 3, H, W): each sample's region `roi_start..roi_end` resized (bilinear,
    antialiased) to its `out_size`. Resize + center crop is one resize of the region the crop keeps."""
    images = _images(source, _on_gpu())
    p = _inputs(EVAL_INPUTS)
    x = fn.resize(images, roi_start=p["roi_start"], roi_end=p["roi_end"], size=p["out_size"],
                  interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.transpose(x, perm=(2, 0, 1))


@pipeline_def(batch_size=1, device_id=None, prefetch_queue_depth=1)
def decode_pipeline():
    """Decode of one file at a time with the training graphs' decoder (`mixed` when given a device_id,
    else the CPU's): finds which file of a failed batch DALI cannot decode."""
    return _images(ENCODED, _on_gpu())
