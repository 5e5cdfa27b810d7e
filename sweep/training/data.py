"""CIFAR-10 or CIFAR-100 on the trial's device: loaded once per worker, augmented a whole batch at a time.

Following airbench: the training split lives on the device as uint8 NCHW; every epoch is a
random permutation; random crop (4-pixel zero padding) and horizontal flip are done on whole
batches with tensor ops, on the CPU and on CUDA alike. No PIL, no DataLoader workers.
"""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sweep.errors import DataError
from sweep.study.specs import DataSpec

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# Per-channel statistics of the CIFAR-10 training set (0..1 pixel scale).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Format:
    """One data set's official python archive: its folder, files, label key and statistics."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    classes: int
    url: str
    md5: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


FORMATS = {
    "cifar10": Format("CIFAR-10", FOLDER, TRAIN_FILES, TEST_FILE, "labels", 10, ARCHIVE_URL,
                      ARCHIVE_MD5, MEAN, STD),
    # The python version of https://www.cs.toronto.edu/~kriz/cifar.html: one ``train`` and one
    # ``test`` pickle (50,000 and 10,000 images) and ``meta``; sweep trains on the 100 fine
    # labels. The MD5 is the one the page and torchvision publish; the statistics are the
    # training set's (0..1 pixel scale), as for CIFAR-10.
    "cifar100": Format("CIFAR-100", "cifar-100-python", ("train",), "test", "fine_labels", 100,
                       "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       "eb9058c3a382ffc7106e4002c42a8d85", (0.5071, 0.4865, 0.4409),
                       (0.2673, 0.2564, 0.2762)),
}


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sweep" / "data"


class _SafeUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays): a pickle from a
    folder we did not write must not be able to run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_batch_file(path: Path):
    """The object one official batch file holds (a dict with ``data``, ``labels``, ``filenames``,
    ``batch_label``; str keys), through an unpickler that loads data and nothing else. Raises
    what ``open`` and ``pickle`` raise."""
    with open(path, "rb") as f:
        return _SafeUnpickler(f, encoding="latin1").load()


def _read_batch(path: Path, fmt: Format = FORMATS["cifar10"]) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images N x 3 x 32 x 32, int64 labels N). Any record count."""
    title, folder, key = fmt.title, fmt.folder, fmt.label_key
    try:
        batch = read_batch_file(path)
    except FileNotFoundError:
        raise DataError(f"{title} file missing: {path}; point --data-dir (or SWEEP_DATA_DIR) at a "
                        f"folder holding a complete {folder}/") from None
    except Exception as err:  # truncated or foreign pickle: name the file, not the internals
        raise DataError(f"{title} file {path} is corrupt ({type(err).__name__}: {err}); "
                        f"replace it with the official file") from None
    if not isinstance(batch, dict) or "data" not in batch or key not in batch:
        raise DataError(f"{title} file {path} has no 'data'/{key!r} entries; replace it with the "
                        f"official file")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{title} file {path}: 'data' must be uint8 of shape (N, 3072), got "
                        f"{data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{title} file {path}: {labels.shape[0] if labels.ndim else 0} labels for "
                        f"{data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= fmt.classes):
        raise DataError(f"{title} file {path}: labels out of range 0..{fmt.classes - 1} "
                        f"(min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def locate(data_dir: str | Path | None, download: bool = True, dataset: str = "cifar10") -> Path:
    """The data set's folder (``cifar-10-batches-py``, ``cifar-100-python``) under
    ``data_dir``, or ``data_dir`` itself when it holds the files; downloads and checksums the
    official archive when absent."""
    fmt = FORMATS[dataset]
    root = Path(data_dir) if data_dir else default_data_dir()
    for candidate in (root / fmt.folder, root):
        if (candidate / fmt.test_file).is_file() or (candidate / fmt.train_files[0]).is_file():
            return candidate
    if not download:
        raise DataError(f"{fmt.title} not found: no {fmt.folder}/ in {root}; point --data-dir (or "
                        f"SWEEP_DATA_DIR) at the folder that holds it")
    created = [p for p in (root, *root.parents) if not p.exists()]  # to undo on failure
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(fmt.url, str(root), md5=fmt.md5)
    except Exception as err:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)  # a failed download writes nothing
        else:
            (root / fmt.url.rpartition("/")[2]).unlink(missing_ok=True)
        raise DataError(f"{fmt.title} not found in {root / fmt.folder} and the download failed "
                        f"({type(err).__name__}); copy {fmt.folder}/ there or point "
                        f"--data-dir (or SWEEP_DATA_DIR) at a folder that holds it") from None
    return root / fmt.folder


@dataclass
class Splits:
    """uint8 NCHW images and int64 labels, already on the device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    dataset: str = "cifar10"  # a key of FORMATS: the normalisation statistics

    @property
    def num_classes(self) -> int:
        return FORMATS[self.dataset].classes


def load_splits(data_dir: str | Path | None, spec: DataSpec, device: torch.device,
                download: bool = True) -> Splits:
    """Read ``spec.dataset``'s folder once and carve train/val from the training batches with a
    fixed seed.

    The validation split never overlaps the training split, and the test batch is only used
    for the final test accuracy: the objective is tuned on validation, never on test.
    """
    fmt = FORMATS[spec.dataset]
    folder = locate(data_dir, download, spec.dataset)
    parts = [_read_batch(folder / name, fmt) for name in fmt.train_files]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_batch(folder / fmt.test_file, fmt)
    need = spec.train_size + spec.val_size
    if need > len(train_y):
        raise DataError(f"{folder} holds {len(train_y)} training images but data.train_size + "
                        f"data.val_size = {need}; lower them (e.g. --set data.train_size=...)")
    order = np.random.default_rng(spec.split_seed).permutation(len(train_y))
    val_idx, train_idx = order[: spec.val_size], order[spec.val_size: need]
    if spec.test_size is not None:
        test_x, test_y = test_x[: spec.test_size], test_y[: spec.test_size]

    def put(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    return Splits(put(train_x[train_idx]), put(train_y[train_idx]), put(train_x[val_idx]),
                  put(train_y[val_idx]), put(test_x), put(test_y), str(folder), spec.dataset)


class Normalizer:
    """uint8 NCHW -> normalized float NCHW (channels_last on request), on the device."""

    def __init__(self, device: torch.device, channels_last: bool, dataset: str = "cifar10"):
        fmt = FORMATS[dataset]
        std = torch.tensor(fmt.std, device=device).view(1, 3, 1, 1) * 255
        mean = torch.tensor(fmt.mean, device=device).view(1, 3, 1, 1) * 255
        # (x - mean) / std as one fused x * scale + shift (addcmul): one pass over the batch
        # instead of three, which matters on the CPU where this runs at memory speed.
        self.scale, self.shift = 1 / std, -mean / std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        # Change the layout while the pixels are still 1 byte each, then convert.
        x = images_u8.contiguous(memory_format=self.memory_format).float()
        return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=self.memory_format)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a whole NCHW batch at once.

    Each output pixel is one gather from the padded batch: the row index is ``dy + i`` and the
    column index ``dx + j`` (``dx + w - 1 - j`` when flipped), per image. A single ``gather``
    with an (N, C, H*W) index is 4-5x faster on the CPU than 4-D advanced indexing, and needs
    no per-shift Python loop (airbench's masked copies) on either device.
    """
    return crop_flip(images, *augment_draws(images.shape[0], generator, pad), pad=pad)


def augment_draws(n: int, generator: torch.Generator, pad: int = 4):
    """The random draws of ``augment`` for ``n`` images, in its order: (dy, dx, flip). Fused
    packs draw each slot's from the slot's own generator, exactly as its unfused run would."""
    device = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    return dy, dx, flip


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
              pad: int = 4) -> torch.Tensor:
    """``augment`` with given draws: image i cropped at (dy[i], dx[i]) of its padded self,
    mirrored where flip[i]."""
    n, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad)).view(n, c, -1)
    j = torch.arange(w, device=device)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - j, j)  # (n, w)
    rows = dy[:, None] + torch.arange(h, device=device)  # (n, h)
    index = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # (n, h, w) into the padded image
    return padded.gather(2, index.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)


def train_batches(splits: Splits, batch_size: int, generator: torch.Generator,
                  normalize: Normalizer):
    """One epoch: a random permutation cut into full batches (the last partial one dropped,
    so every epoch has exactly ``len // batch_size`` optimizer steps)."""
    n = splits.train_y.shape[0]
    order = torch.randperm(n, generator=generator, device=splits.train_y.device)
    for start in range(0, n - batch_size + 1, batch_size):
        idx = order[start: start + batch_size]
        x = normalize(augment(splits.train_x[idx], generator))
        yield x, splits.train_y[idx]
