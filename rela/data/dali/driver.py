"""How the host drives a DALI pipeline: reads the files, draws each step's random choices, feeds the
steps and takes them back in order.

- Steps are fed, not read. The host feeds each step's images through an external source in exactly the
  order `BudgetSampler.batches` gives, so an epoch is this rank's share of the budget's subset, each
  index once, in the sampler's whole batches. There is no reader with its own notion of an epoch, shard
  or last-batch policy, which is where DALI loaders in other SSL trainers silently skip or repeat samples.
- Every random choice of a step (crop window, flip, jitter, grayscale, blur, solarize) is drawn on the
  host from a generator seeded with (seed, epoch, step) and fed with the images; the graphs hold no
  random operators. A step's views are thus a function of the step: resuming at `start_step` gives the
  views an uninterrupted run would have had, and feeding a step again gives the same views.
- The view switch is exact. A step's views are fixed when it is fed, and up to `prefetch` steps are fed
  ahead of the one being trained on. Each fed step remembers the view mode and pair it was fed with;
  when `set_view_mode` has changed them since, the loader discards the steps in flight and feeds them
  again with the new views before yielding any of them. So every batch yielded after the call has the
  new views, at the cost of recomputing at most `prefetch` batches once per switch.
- Files are read by a pool of `num_threads` threads (the run's --workers), one task per file, so a batch's
  files are read side by side. Each file's header is read once (PIL, no decode), the first time the file
  is read; later epochs read only its bytes.
- Bad files get the torch loader's handling. The header gives the size the crop window is drawn on; a file
  without a readable header, in a format DALI does not decode (GIF), or over the decode limits
  (datasets.check_decode_size: too many pixels, too elongated) is corrupt. A file that passes but fails in
  DALI's decoder fails its step; the host then finds the file (PIL decode, else DALI one file at a time
  with the same decoder: nvJPEG on the same GPU for a GPU pipeline, since a file can decode on the CPU and
  not there), rebuilds the pipeline (DALI drops a pipeline after an error) and feeds the step again without it.
  Either way a CorruptImageError names the file, or with skip_corrupt the sample is dropped and its index
  added to `skipped`. PNG, BMP, TIFF, WebP and PNM files decode (on the CPU, also under `mixed`).
- A batch whose files were all skipped still makes a step, as in the torch loader: black images under
  the batch's indices (`HostReader.placeholder`). Every rank then runs the same number of steps, so a
  collective of the training step (DDP's all-reduce, NCCL) never waits for a rank that has none.

Nothing here imports DALI at module level: rela.data.dali imports without it.
"""
from __future__ import annotations

import io
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from rela.data.datasets import ArrayImages, CorruptImageError, FileImages, check_decode_size, decode_image
from rela.data.views import ViewSpec, blur_kernel_size

# What PIL calls the formats DALI's decoder reads (MPO: camera JPEGs with a second picture appended).
DALI_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}


# ---- Host side: what a step feeds ------------------------------------------------------------------

@dataclass
class HostBatch:
    index: np.ndarray  # (n,) int64 dataset indices
    position: np.ndarray  # (n,) where each sample sits in the batch it was asked for
    data: list[np.ndarray] | np.ndarray  # encoded files, or uint8 (n, H, W, 3)
    sizes: np.ndarray  # (n, 2) height, width of the decoded images

    def __len__(self) -> int:
        return len(self.index)

    def keep(self, mask: np.ndarray) -> "HostBatch":
        data = [d for d, k in zip(self.data, mask) if k] if isinstance(self.data, list) else self.data[mask]
        return HostBatch(self.index[mask], self.position[mask], data, self.sizes[mask])


class PendingBatch:
    """A batch whose files the reader's pool is reading, one task per file. `result()` waits for them and
    applies the corrupt-file policy in index order, as reading them one after the other would."""

    def __init__(self, tasks: list[Future], assemble: Callable[[list], HostBatch]):
        self._tasks, self._assemble = tasks, assemble

    def result(self) -> HostBatch:
        return self._assemble([task.result() for task in self._tasks])


class HostReader:
    """Reads index batches for the pipelines: file bytes and header sizes (files, on a pool of `num_threads`
    threads, one task per file: file reads release the GIL) or array slices. Applies the corrupt-file policy."""

    def __init__(self, dataset: ArrayImages | FileImages, *, skip_corrupt: bool, num_threads: int,
                 device_id: int | None = None):
        self.dataset, self.skip_corrupt = dataset, skip_corrupt
        self.device_id = device_id  # the pipelines' GPU (None: CPU), where a failed decode is diagnosed
        self.files = isinstance(dataset, FileImages)
        self.skipped: set[int] = set()
        self._pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="rela-dali-read") \
            if self.files else None
        # Each file's (height, width) from its header, kept from its first read on (0: not read yet).
        self._sizes = np.zeros((len(dataset), 2), dtype=np.int32) if self.files else None

    def submit(self, indices: np.ndarray) -> Future | PendingBatch:
        """The batch of `indices`, read in the background (files) or at once (arrays): `.result()` gives it."""
        if self._pool is None:
            return _done(self.read(indices))
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        tasks = [self._pool.submit(self._read_or_error, i) for i in index.tolist()]
        return PendingBatch(tasks, lambda results: self._assemble(index, results))

    def read(self, indices: np.ndarray) -> HostBatch:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not self.files:
            images = self.dataset.images[index]
            sizes = np.tile(np.array(images.shape[1:3], dtype=np.int64), (len(index), 1))
            return HostBatch(index, np.arange(len(index)), images, sizes)
        return self._assemble(index, [self._read_or_error(i) for i in index.tolist()])

    def _assemble(self, index: np.ndarray, results: list) -> HostBatch:
        """The batch of `index` from each file's (bytes, size) or CorruptImageError: raises the first error, or
        (skipping) drops the files at fault."""
        data, sizes, ok = [], np.zeros((len(index), 2), dtype=np.int64), np.ones(len(index), dtype=bool)
        for k, (i, result) in enumerate(zip(index.tolist(), results)):
            if isinstance(result, CorruptImageError):
                if not self.skip_corrupt:
                    raise result
                self.skipped.add(i)
                data.append(None)
                ok[k] = False
            else:
                data.append(result[0])
                sizes[k] = result[1]
        return HostBatch(index, np.arange(len(index)), data, sizes).keep(ok)

    def placeholder(self, indices: np.ndarray) -> HostBatch:
        """Black images under `indices`: what a batch whose samples were all skipped feeds instead."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not self.files:
            return HostBatch(index, np.arange(len(index)), np.zeros_like(self.dataset.images[index]),
                             np.tile(np.array(self.dataset.images.shape[1:3], dtype=np.int64), (len(index), 1)))
        black = _black_png()
        return HostBatch(index, np.arange(len(index)), [black] * len(index),
                         np.tile(np.array(_PLACEHOLDER_SIZE, dtype=np.int64), (len(index), 1)))

    def _read_or_error(self, i: int) -> tuple[np.ndarray, tuple[int, int]] | CorruptImageError:
        try:
            return self._read_file(i)
        except CorruptImageError as err:
            return err

    def _read_file(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """File `i`'s bytes and (height, width); its header is checked on its first read only."""
        path = self.dataset.path(i)
        try:
            encoded = np.fromfile(path, dtype=np.uint8)
        except (OSError, ValueError) as err:
            raise CorruptImageError(path, str(err) or type(err).__name__) from None
        known = self._sizes[i].copy()  # a copy: another thread may be writing the row
        if not known.all():
            known = np.array(_header_size(path, encoded), dtype=np.int32)
            self._sizes[i] = known
        return encoded, (int(known[0]), int(known[1]))

    def drop_undecodable(self, batch: HostBatch, error: Exception) -> HostBatch:
        """`batch` failed in DALI's decoder: finds the files at fault, raises for the first or (skipping)
        returns the batch without them. Re-raises `error` if every file decodes on its own."""
        bad = np.zeros(len(batch), dtype=bool)
        first: CorruptImageError | None = None
        for k, i in enumerate(batch.index.tolist()):
            try:
                decode_image(self.dataset.path(i))
            except CorruptImageError as err:
                bad[k], first = True, first or err
        if not bad.any():  # PIL reads them all: ask DALI's decoder itself (on the GPU: nvJPEG), one at a time
            bad = ~_dali_decodes(batch.data, self.device_id)
            if bad.any():
                first = CorruptImageError(self.dataset.path(int(batch.index[bad.argmax()])),
                                          f"DALI's decoder fails on it ({_first_line(error)}); --loader torch reads it")
        if not bad.any():
            raise error
        if not self.skip_corrupt:
            raise first
        self.skipped.update(batch.index[bad].tolist())
        return batch.keep(~bad)


def _header_size(path, encoded: np.ndarray) -> tuple[int, int]:
    """(height, width) from a file's header (PIL, no decode); raises CorruptImageError naming `path` for a file
    DALI cannot or should not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded.tobytes())) as image:  # reads the header only
            fmt, (width, height) = image.format, image.size
    except Image.UnidentifiedImageError:  # its message names the BytesIO, not the file
        raise CorruptImageError(path, "not an image file PIL can identify") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # as datasets.decode_image
        raise CorruptImageError(path, str(err) or type(err).__name__) from None
    if fmt not in DALI_FORMATS:
        raise CorruptImageError(path, f"DALI does not decode {fmt} images (--loader torch does)")
    check_decode_size(path, width, height)  # DALI decodes the whole image
    return height, width


_PLACEHOLDER_SIZE = (32, 32)  # (height, width); any size: every graph resizes


def _black_png() -> np.ndarray:
    """A black RGB PNG (lossless: decodes to zeros exactly, on the CPU and under `mixed`)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", _PLACEHOLDER_SIZE[::-1]).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


def _dali_decodes(encoded: list[np.ndarray], device_id: int | None = None) -> np.ndarray:
    """Which files DALI's decoder reads, one file per run: the CPU decoder, or with a `device_id` the
    GPU pipelines' own (`mixed`: nvJPEG, the hardware decoder) on that GPU."""
    from rela.data.dali.pipelines import ENCODED, decode_pipeline

    def fresh():
        pipe = decode_pipeline(num_threads=1, device_id=device_id)
        pipe.build()
        return pipe

    ok = np.ones(len(encoded), dtype=bool)
    pipe = fresh()
    for k, data in enumerate(encoded):
        pipe.feed_input(ENCODED, [data])
        pipe.schedule_run()
        try:
            pipe.outputs()
        except RuntimeError:
            ok[k] = False
            pipe = fresh()
    return ok


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "failure" in line or "Failed" in line or "rror" in line]
    return (useful or lines or [type(error).__name__])[-1]


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


# ---- Parameters drawn on the host ------------------------------------------------------------------

def draw_view_params(spec: ViewSpec, sizes: np.ndarray, out_size: int, rng: np.random.Generator
                     ) -> dict[str, np.ndarray]:
    """Every random choice of one view for a batch, as pipelines.VIEW_INPUTS.

    sizes: (n, 2) height, width of the images. The crop window follows views.random_crop_boxes
    (RandomResizedCrop: 10 tries, then the largest central window within the ratio range). Everything is
    drawn whatever the spec's probabilities, so the draws of a step do not depend on the view mode.
    """
    n, tries = len(sizes), 10
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    area = (height * width)[:, None]
    scale = rng.uniform(*spec.crop_scale, (n, tries)) * area
    ratio = np.exp(rng.uniform(math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), (n, tries)))
    w, h = np.round(np.sqrt(scale * ratio)), np.round(np.sqrt(scale / ratio))
    ok = (w >= 1) & (h >= 1) & (w <= width[:, None]) & (h <= height[:, None])
    first, found = ok.argmax(1), ok.any(1)
    low, high = spec.crop_ratio
    fallback_w = np.where(width / height > high, np.maximum(1, np.round(height * high)), width)
    fallback_h = np.where(width / height < low, np.maximum(1, np.round(width / low)), height)
    w = np.where(found, w[np.arange(n), first], fallback_w)
    h = np.where(found, h[np.arange(n), first], fallback_h)
    x0 = np.where(found, np.floor(rng.random(n) * (width - w + 1)), np.floor((width - w) / 2))
    y0 = np.where(found, np.floor(rng.random(n) * (height - h + 1)), np.floor((height - h) / 2))

    def coin(p: float) -> np.ndarray:
        return rng.random(n) < p

    def factor(strength: float, where: np.ndarray, neutral: float = 1.0) -> np.ndarray:
        return np.where(where, rng.uniform(neutral - strength, neutral + strength, n), neutral)

    flip = coin(spec.flip_p)
    jitter = coin(spec.jitter_p)
    brightness, contrast = factor(spec.brightness, jitter), factor(spec.contrast, jitter)
    saturation = factor(spec.saturation, jitter)
    hue_turns = factor(spec.hue, jitter, neutral=0.0)
    grayscale, blur, solarize = coin(spec.grayscale_p), coin(spec.blur_p), coin(spec.solarize_p)
    sigma = rng.uniform(*spec.blur_sigma, n)
    # A Gaussian's weights beyond 3 sigma sum to 0.3%: the window stops there (never wider than the
    # spec's), which keeps the blur within a level of the full window at a fraction of its cost.
    window = np.minimum(blur_kernel_size(out_size), 2 * np.ceil(3 * sigma) + 1)
    f32 = np.float32
    return {
        "crop_start": np.stack([y0, x0], 1).astype(f32),
        "crop_end": np.stack([y0 + h, x0 + w], 1).astype(f32),
        "flip": flip.astype(np.int32),
        "brightness": brightness.astype(f32),
        "contrast": contrast.astype(f32),
        "saturation": np.where(grayscale, 0.0, saturation).astype(f32),
        "hue": hue_degrees(hue_turns).astype(f32),
        "blur_window": np.where(blur, window, 1).astype(np.int32),
        "blur_sigma": sigma.astype(f32),
        "solarize": solarize.astype(f32),
    }


def hue_degrees(turns: np.ndarray) -> np.ndarray:
    """views._rotate_hue's turns as fn.hsv's hue argument (degrees, the other way round)."""
    return -360.0 * turns


def eval_params(sizes: np.ndarray, mode: str, size: int, crop_fraction: float, in_memory: bool
                ) -> dict[str, np.ndarray]:
    """The eval graph's inputs (pipelines.EVAL_INPUTS) for ImageSource's two modes.

    'eval': shorter side to round(size / crop_fraction), then the central size x size, with the torch
    loader's rounding; as one resize of the region the crop keeps. 'train': the whole image, squashed to
    size x size (files) or as stored (arrays).
    """
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    n = len(sizes)
    if mode == "train":
        out = sizes.astype(np.float64) if in_memory else np.full((n, 2), float(size))
        return {"roi_start": np.zeros((n, 2), np.float32), "roi_end": sizes.astype(np.float32),
                "out_size": out.astype(np.float32)}
    if mode != "eval":
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    short = round(size / crop_fraction)
    # Python's round (half to even) on each image, as loader._pil_square and views.resize_center_crop.
    long_h = np.array([max(short, round(h * short / w)) for h, w in zip(height, width)], dtype=np.float64)
    long_w = np.array([max(short, round(w * short / h)) for h, w in zip(height, width)], dtype=np.float64)
    new_h = np.where(height <= width, short, long_h)
    new_w = np.where(height <= width, long_w, short)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    start = np.stack([top * height / new_h, left * width / new_w], 1)
    end = np.stack([(top + size) * height / new_h, (left + size) * width / new_w], 1)
    return {"roi_start": start.astype(np.float32), "roi_end": end.astype(np.float32),
            "out_size": np.full((n, 2), size, dtype=np.float32)}


# ---- Driving a pipeline step by step ---------------------------------------------------------------

@dataclass
class Step:
    position: int  # in the list of batches being iterated
    key: object  # what the step was fed with that may change (the view mode and pair)
    host: HostBatch


class _StepFailed(Exception):
    def __init__(self, step: Step, error: Exception):
        super().__init__(str(error))
        self.step, self.error = step, error


class FedPipeline:
    """A graph of pipelines.py fed by the host one step at a time, from a HostReader over `dataset`.
    Steps come out in the order they were fed; `in_flight` holds the steps fed and not yet taken.

    graph: a `@pipeline_def` function taking the input's name (pipelines.ENCODED for files,
    pipelines.ARRAYS for arrays) and DALI's pipeline arguments; it is built again at each restart.
    """

    def __init__(self, dataset: ArrayImages | FileImages, device: torch.device, graph: Callable, *,
                 num_threads: int, skip_corrupt: bool, prefetch: int):
        from rela.data.dali.pipelines import ARRAYS, ENCODED

        self.reader = HostReader(dataset, skip_corrupt=skip_corrupt, num_threads=num_threads,
                                 device_id=_device_id(device))
        self.data_name = ENCODED if self.reader.files else ARRAYS
        self.device, self.prefetch = device, max(1, prefetch)
        self._graph, self._num_threads = graph, num_threads
        self.batch_size = 0
        self.pipe = None
        self.in_flight: deque[Step] = deque()
        self.generation = 0
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def begin(self, batch_size: int) -> int:
        """Starts a new iteration: drops what an abandoned one left in flight; returns its token."""
        self.drain()
        if self.pipe is None or batch_size > self.batch_size:
            self.batch_size = max(batch_size, self.batch_size)
            self.restart()
        self.generation += 1
        return self.generation

    def restart(self) -> list[Step]:
        """A fresh pipeline (DALI gives up a pipeline after an error); returns the steps dropped."""
        dropped = list(self.in_flight)
        self.in_flight.clear()
        self.pipe = None  # let DALI release the old one before the new one allocates
        self.pipe = self._graph(self.data_name, batch_size=self.batch_size, num_threads=self._num_threads,
                                device_id=_device_id(self.device))
        self.pipe.build()
        return dropped

    def feed(self, inputs: dict[str, object], step: Step) -> None:
        for name, value in inputs.items():
            self.pipe.feed_input(name, np.ascontiguousarray(value) if isinstance(value, np.ndarray) else value)
        self.pipe.schedule_run()
        self.in_flight.append(step)

    def take(self) -> tuple[Step, list[torch.Tensor]]:
        step = self.in_flight.popleft()
        try:
            outputs = self.pipe.share_outputs()
        except RuntimeError as err:
            self.in_flight.appendleft(step)
            raise _StepFailed(step, err) from None
        try:
            tensors = [self._to_torch(out) for out in outputs]
            if self._copy_stream is not None:
                # The step's kernels wait for the copies on the device; the host goes on at once.
                torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            return step, tensors
        finally:
            self.pipe.release_outputs()

    def drain(self) -> list[Step]:
        """Takes and discards every step in flight; returns them."""
        steps = list(self.in_flight)
        try:
            while self.in_flight:
                self.take()
        except _StepFailed:
            self.restart()
        return steps

    def steps(self, batches: list[np.ndarray], inputs_for: Callable[[HostBatch, int], dict],
              key: Callable[[], object] = lambda: None) -> Iterator[tuple[Step, list[torch.Tensor]]]:
        """Feeds `batches` in order, keeping up to `prefetch` steps in flight; yields each step with its
        outputs. Steps fed under another `key()` than the current one are fed again before any is yielded.
        A batch whose samples were all skipped as corrupt is fed as `reader.placeholder` (black images):
        every batch makes a step."""
        token = self.begin(max((len(b) for b in batches), default=1))
        reads: dict[int, Future | PendingBatch] = {}
        next_feed = taken = 0
        while taken < len(batches):
            if self.generation != token:
                raise RuntimeError("this iterator was superseded by a newer one on the same DALI loader")
            if any(step.key != key() for step in self.in_flight):
                for step in self.drain():  # fed before the switch: feed them again with what is current now
                    reads[step.position] = _done(step.host)
                next_feed = taken
            for ahead in range(next_feed, min(next_feed + self.prefetch + 2, len(batches))):
                if ahead not in reads:
                    reads[ahead] = self.reader.submit(batches[ahead])
            while len(self.in_flight) < self.prefetch and next_feed < len(batches):
                host = (reads.pop(next_feed, None) or self.reader.submit(batches[next_feed])).result()
                if not len(host):
                    host = self.reader.placeholder(batches[next_feed])
                self.feed(inputs_for(host, next_feed), Step(next_feed, key(), host))
                next_feed += 1
            try:
                step, outputs = self.take()
            except _StepFailed as failed:
                for step in self.restart():
                    reads[step.position] = _done(step.host)
                reads[failed.step.position] = _done(self.reader.drop_undecodable(failed.step.host, failed.error))
                next_feed = failed.step.position
                continue
            taken = step.position + 1
            yield step, outputs

    def _to_torch(self, tensor_list) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        tensor = tensor_list.as_tensor()
        shape, dtype = tensor.shape(), to_torch_type[tensor.dtype]
        if self._copy_stream is None:
            return feed_ndarray(tensor, torch.empty(shape, dtype=dtype))
        # DALI reuses its buffer once released. Given a stream, feed_ndarray copies without blocking and
        # makes DALI's own stream wait for the copy (DALI's copy_to_external: the source's order waits on
        # the copy's), so the buffer is not written again before the copy has read it, with no host sync.
        with torch.cuda.stream(self._copy_stream):
            out = torch.empty(shape, dtype=dtype, device=self.device)
            feed_ndarray(tensor, out, cuda_stream=self._copy_stream)
        out.record_stream(torch.cuda.current_stream(self.device))  # freed only once the step has used it
        return out


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()

