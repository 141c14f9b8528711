"""Training and validation images: in-memory arrays (digits, MNIST-5k, CIFAR) and files (ImageFolder trees).

Every dataset answers `len()`, `labels` (int64, one per image), `fingerprint()` (what the target bank
is keyed by) and `read(i)` (one image as uint8 HWC RGB). Images are decoded by the loaders, never here
at start-up, so a 1.28M-image tree opens in seconds.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rela.data.mnist5k import MNIST5K_MEAN, MNIST5K_STD, read_mnist5k
from rela.errors import RelaError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class ArrayImages:
    """Images held in memory as one uint8 array (N, H, W, 3)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise RelaError(f"{name}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> np.ndarray:
        return self.images[index]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(str(self.images.shape).encode())
        digest.update(self.images.tobytes())
        digest.update(self.labels.tobytes())
        return f"{self.name}:array:{digest.hexdigest()[:16]}"

    def names_digest(self) -> str:
        """What every rank must agree on before using rank 0's fingerprint: here the shape and labels."""
        return hashlib.sha256(str(self.images.shape).encode() + self.labels.tobytes()).hexdigest()[:16]

    def subset(self, indices: np.ndarray, name: str) -> "ArrayImages":
        return ArrayImages(self.images[indices], self.labels[indices], name)


class FileImages:
    """Image files with integer labels (class sub-folders); decoded on demand."""

    def __init__(self, root: Path, files: list[str], labels: np.ndarray, name: str):
        self.root = Path(root)
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def read(self, index: int, draft_size: int | None = None) -> np.ndarray:
        """Decodes image `index` to uint8 RGB; raises CorruptImageError naming the file."""
        return decode_image(self.path(index), draft_size)

    def fingerprint(self) -> str:
        # Name, size and modification time (ns) of each file, not a hash of its bytes: reading all of
        # ImageNet (1.28M files, ~140 GB) at every start would take longer than many runs, while a stat
        # is cheap. An edit in place changes the mtime even when it keeps the size. The price: a copy
        # that does not keep mtimes (cp without -p), or a touch, rebuilds the bank once. Under torchrun only
        # rank 0 takes it (rela.prior.target_bank.agreed_fingerprint): a node's staged copy has other mtimes.
        digest = hashlib.sha256()
        for line in self.stat_lines():
            digest.update(line)
        return f"{self.name}:files:{len(self.files)}:{digest.hexdigest()[:16]}"

    def stat_lines(self):
        """One line per file, b"name\\0size\\0mtime_ns\\0label\\n", in index order: what the fingerprint hashes."""
        for rel, label in zip(self.files, self.labels.tolist()):
            try:
                stat = os.stat(self.root / rel)
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:  # a broken link or a link loop: the loaders name it (or skip it)
                size, mtime = -1, -1
            # surrogateescape: a file name that is not UTF-8 hashes as its bytes on disk.
            yield f"{rel}\0{size}\0{mtime}\0{label}\n".encode(errors="surrogateescape")

    def names_digest(self) -> str:
        """The relative names and labels, in index order, without touching the files (no stat): two copies of
        a tree on two nodes agree on it whatever their modification times."""
        digest = hashlib.sha256()
        for rel, label in zip(self.files, self.labels.tolist()):
            digest.update(f"{rel}\0{label}\n".encode(errors="surrogateescape"))
        return digest.hexdigest()[:16]

    def subset(self, indices: np.ndarray, name: str) -> "FileImages":
        return FileImages(self.root, [self.files[i] for i in indices], self.labels[indices], name)


def shown(path) -> str:
    """`path` for a message: a name that is not UTF-8 (kept by Python as surrogates, which a strict stream
    cannot write) shows its odd bytes as \\x escapes."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class CorruptImageError(RelaError):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot decode image {shown(path)}: {shown(reason)} (pass --skip-corrupt to skip such files)")
        self.path = path


# Decoded images larger than this are refused as corrupt (--skip-corrupt skips them): a PNG of 169
# megapixels is ~23 kB on disk and ~2.7 GB decoded (Pillow only refuses over 2 x 89.5M pixels, and only
# warns below). 64 megapixels (8192 x 8192) is above any photo a training set holds.
MAX_DECODE_PIXELS = 8192 * 8192
# Images more elongated than this (longer side over shorter) are refused the same way: a 1,000,000 x 1 PNG
# is ~1 kB on disk and 3 MB decoded, but resizing its shorter side to an evaluation size (256 px) asks for
# a 256M x 256 image. Panoramas stay well within it (about 10:1); at 100:1 the evaluation resize of a
# 592 px side (518 / 0.875) is at most 35 megapixels.
MAX_ASPECT_RATIO = 100


def check_decode_size(path: Path, width: int, height: int) -> None:
    """Raises CorruptImageError naming `path` if an image of width x height pixels (read from its header) is
    over MAX_DECODE_PIXELS or more elongated than MAX_ASPECT_RATIO. Both loaders call it before decoding."""
    if width * height > MAX_DECODE_PIXELS:
        raise CorruptImageError(path, f"{width} x {height} pixels ({width * height / 1e6:.0f} megapixels) "
                                      f"is over the decode limit of {MAX_DECODE_PIXELS / 1e6:.0f} megapixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise CorruptImageError(path, f"{width} x {height} pixels is more elongated than the limit of "
                                      f"{MAX_ASPECT_RATIO}:1 (resizing it would take far more memory than the file)")


def decode_image(path: Path, draft_size: int | None = None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if draft_size is not None and image.format == "JPEG":
                # JPEG's DCT scaling decodes at 1/2, 1/4 or 1/8 size for a fraction of the cost.
                image.draft("RGB", (draft_size, draft_size))
            check_decode_size(path, *image.size)  # what will be decoded, read from the header (after the draft)
            return _to_rgb(image)
    except CorruptImageError:
        raise
    except Exception as err:  # PIL reports bad data as OSError, ValueError, EOFError, struct.error,
        # DecompressionBombError...: whatever it is, the file is unusable and the user needs its name.
        raise CorruptImageError(path, str(err) or type(err).__name__) from None


def _to_rgb(image) -> np.ndarray:
    """uint8 HWC RGB of any PIL mode. PIL's own conversion clips 16-bit (I;16, I) and float (F) grey levels
    at 255, so a 16-bit PNG would come out white: those are scaled to 8 bits here instead (I;16 and I as
    0..65535, F as 0..1), as DALI's decoder does. Everything else (L, P, CMYK, RGBA, LA, 1, ...) is PIL's
    conversion; alpha is dropped."""
    if image.mode.startswith("I") or image.mode == "F":
        levels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
        grey = np.clip(np.rint(levels * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


@dataclass
class DatasetSplits:
    train: ArrayImages | FileImages
    val: ArrayImages | FileImages
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Square side the images naturally have (arrays) or are decoded to before cropping (files).
    native_size: int

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, ArrayImages)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

DATASETS = ("digits", "mnist5k", "cifar10", "cifar100", "imagefolder")


def with_norm_stats(splits: DatasetSplits, stats: str) -> DatasetSplits:
    """`splits` with the mean and std that normalise their images (--norm-stats): "dataset" keeps their own,
    "imagenet" takes ImageNet's at every dataset, as the reference code does. Every use of the statistics (the
    loader's Normalize, a rand prior's input, evaluation, the kNN monitor, backbone.pt) reads them here."""
    if stats == "dataset":
        return splits
    if stats == "imagenet":
        return replace(splits, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    raise RelaError(f"--norm-stats must be 'dataset' or 'imagenet', got {stats!r}")


def load_dataset(name: str, path: str | None, *, split_seed: int = 0, val_fraction: float = 0.2) -> DatasetSplits:
    if name == "digits":
        return _load_digits(split_seed, val_fraction)
    if name == "mnist5k":
        return _load_mnist5k(split_seed, val_fraction)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, _existing_folder(path, name), split_seed, val_fraction)
    if name == "imagefolder":
        return _load_imagefolder(_existing_folder(path, name), split_seed, val_fraction)
    raise RelaError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _existing_folder(path: str | None, dataset: str) -> Path:
    if not path:
        raise RelaError(f"--dataset {dataset} needs --data PATH")
    folder = Path(path)
    if not folder.is_dir():
        raise RelaError(f"data folder {folder} does not exist")
    try:
        empty = not any(folder.iterdir())
    except OSError as err:
        raise RelaError(f"cannot list data folder {folder}: {err.strerror or err}") from None
    if empty:
        raise RelaError(f"data folder {folder} is empty")
    return folder


def _held_out_split(n: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _load_digits(split_seed: int, val_fraction: float) -> DatasetSplits:
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 grey levels 0..16, upsampled once (bilinear) to 32x32 so crops keep some detail.
    grey = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    grey = torch.nn.functional.interpolate(grey, size=(32, 32), mode="bilinear", align_corners=False)
    images = (grey.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    images = images.permute(0, 2, 3, 1).contiguous().numpy()
    full = ArrayImages(images, digits.target, "digits")
    train_idx, val_idx = _held_out_split(len(full), split_seed, val_fraction)
    mean, std = (0.2,) * 3, (0.33,) * 3  # measured on the upsampled images
    return DatasetSplits(full.subset(train_idx, "digits/train"), full.subset(val_idx, "digits/val"),
                         10, mean, std, 32)


def _load_mnist5k(split_seed: int, val_fraction: float) -> DatasetSplits:
    images, labels = read_mnist5k()
    full = ArrayImages(images, labels, "mnist5k")
    train_idx, val_idx = _held_out_split(len(full), split_seed, val_fraction)
    return DatasetSplits(full.subset(train_idx, "mnist5k/train"), full.subset(val_idx, "mnist5k/val"),
                         10, MNIST5K_MEAN, MNIST5K_STD, 28)


class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR python batch, which may come from anywhere: a pickle can name any function to call, and
    plain pickle.load would call it. Only what the batches hold is let through: numpy's array reconstruction
    and dtypes (numpy 1's and 2's module paths, every pickle protocol), the bytes of a protocol-2 pickle, and
    plain builtin types; anything else is refused before it is looked up, so nothing of it runs."""

    ALLOWED = {
        *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
          for name in ("_reconstruct", "scalar")),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle: _codecs.encode(text, "latin1")
        *(("builtins", name) for name in ("bytes", "bytearray", "int", "float", "complex", "str", "list", "tuple",
                                          "dict", "set", "frozenset", "bool")),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused: the file asks the unpickler for {module}.{name}, which could "
                                         "run code (a CIFAR batch holds only numpy arrays, lists and numbers)")
        return super().find_class(module, name)


def _load_cifar(name: str, folder: Path, split_seed: int, val_fraction: float) -> DatasetSplits:
    # Accept the folder itself or its standard sub-folder (cifar-10-batches-py, cifar-100-python).
    for candidate in (folder, folder / "cifar-10-batches-py", folder / "cifar-100-python"):
        train_files = sorted(candidate.glob("data_batch_*")) if name == "cifar10" else [candidate / "train"]
        if train_files and all(f.is_file() for f in train_files):
            folder = candidate
            break
    else:
        expected = "data_batch_1..5 and test_batch" if name == "cifar10" else "train and test"
        raise RelaError(f"{folder} holds no {name} python-pickle batches (expected {expected})")
    test_file = folder / ("test_batch" if name == "cifar10" else "test")
    label_key = b"labels" if name == "cifar10" else b"fine_labels"

    num_classes = 10 if name == "cifar10" else 100

    def read_batches(files):
        images, labels = [], []
        for f in files:
            try:
                with open(f, "rb") as fh:
                    batch = CifarUnpickler(fh, encoding="bytes").load()
                data, batch_labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
            except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, IndexError,
                    AttributeError, ImportError) as err:
                raise RelaError(f"cannot read CIFAR batch {f}: {err or type(err).__name__}") from None
            # Checked, not reshaped blindly: (N, 32, 32, 3) or grey (3N, 1024) data would reshape without
            # complaint into the wrong images.
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
                raise RelaError(f"CIFAR batch {f}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072) "
                                "rows of 32x32 RGB planes")
            if batch_labels.shape != (len(data),) or not np.issubdtype(batch_labels.dtype, np.integer):
                raise RelaError(f"CIFAR batch {f}: {batch_labels.shape} labels of {batch_labels.dtype} for "
                                f"{len(data)} images, expected one integer label per image")
            if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < num_classes:
                raise RelaError(f"CIFAR batch {f}: labels span {batch_labels.min()}..{batch_labels.max()}, "
                                f"expected 0..{num_classes - 1} for {name}")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(batch_labels.astype(np.int64))
        return np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)

    train_images, train_labels = read_batches(train_files)
    train = ArrayImages(train_images, train_labels, f"{name}/train")
    if test_file.is_file():
        val = ArrayImages(*read_batches([test_file]), f"{name}/test")
    else:
        train_idx, val_idx = _held_out_split(len(train), split_seed, val_fraction)
        train, val = train.subset(train_idx, f"{name}/train"), train.subset(val_idx, f"{name}/val")
    return DatasetSplits(train, val, num_classes, CIFAR_MEAN, CIFAR_STD, 32)


def _scan_class_folders(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise RelaError(f"{root} has no class sub-folders (expected ROOT/CLASS/IMAGE.jpg)")
    if len(classes) == 1:
        raise RelaError(f"{root} has one class folder ({shown(classes[0])}): the linear probe and the kNN need "
                        "at least two classes (expected ROOT/CLASS/IMAGE.jpg)")
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = _image_files(root / cls)
        if not found:
            raise RelaError(f"class folder {shown(root / cls)} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "remove it or add its images")
        files.extend(os.path.relpath(f, root) for f in found)
        labels.extend([label] * len(found))
    return files, np.asarray(labels, dtype=np.int64), classes


def list_class_folders(root: Path) -> list[str]:
    """The image files of ROOT/CLASS/..., relative to root, in index order (what a dataset of `root` lists)."""
    return _scan_class_folders(Path(root))[0]


def _image_files(folder: Path) -> list[str]:
    """The image files under `folder`, sorted, following symbolic links to folders.

    A link that leads back to a folder above it (a loop) is an error naming it: followed, it would list the
    same images again and again until the path grows too long. An unreadable folder is an error too (os.walk
    would skip it silently). A file with an image suffix that is a broken link or a link loop is listed, so
    that decoding names it, or skips it under --skip-corrupt, like any file that does not decode.
    """
    found: list[str] = []

    def visit(path: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as err:
            raise RelaError(f"cannot list folder {shown(path)}: {err.strerror or err}") from None
        folders = []
        for entry in entries:  # a folder's own files first, then its sub-folders, each by name
            try:  # both follow links; a link loop raises
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir, is_file = False, False
            if is_dir:
                folders.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                if is_file or (entry.is_symlink() and not os.path.exists(entry.path)):
                    found.append(entry.path)
        for sub in folders:
            stat = os.stat(sub)
            ident = (stat.st_dev, stat.st_ino)
            if ident in ancestors:
                raise RelaError(f"symbolic link loop: {shown(sub)} leads back to a folder above it "
                                f"({shown(os.path.realpath(sub))}); remove the link")
            visit(sub, ancestors + (ident,))

    real = Path(os.path.realpath(folder))
    above = tuple((stat.st_dev, stat.st_ino) for stat in map(os.stat, [real, *real.parents]))
    visit(str(folder), above)
    return found


def _load_imagefolder(folder: Path, split_seed: int, val_fraction: float) -> DatasetSplits:
    """ROOT/train/CLASS and ROOT/val/CLASS when both exist; else ROOT/train/CLASS or ROOT/CLASS with a
    seeded held-out split."""
    train_dir, val_dir = folder / "train", folder / "val"
    if val_dir.is_dir() and not train_dir.is_dir():
        raise RelaError(f"{folder} has val/ but no train/")
    if train_dir.is_dir() and val_dir.is_dir():
        files, labels, classes = _scan_class_folders(train_dir)
        val_files, val_labels, val_classes = _scan_class_folders(val_dir)
        if val_classes != classes:
            raise RelaError(f"{val_dir} and {train_dir} have different class folders")
        train = FileImages(train_dir, files, labels, "imagefolder/train")
        val = FileImages(val_dir, val_files, val_labels, "imagefolder/val")
    else:
        root = train_dir if train_dir.is_dir() else folder
        files, labels, classes = _scan_class_folders(root)
        full = FileImages(root, files, labels, "imagefolder")
        train_idx, val_idx = _held_out_split(len(full), split_seed, val_fraction)
        train, val = full.subset(train_idx, "imagefolder/train"), full.subset(val_idx, "imagefolder/val")
    return DatasetSplits(train, val, len(classes), IMAGENET_MEAN, IMAGENET_STD, 0)
