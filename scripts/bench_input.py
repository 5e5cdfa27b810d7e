#!/usr/bin/env python3
"""Input pipeline alone, side by side: images/s of sweep's batched on-device augmentation
against torchvision's DataLoader on PIL images.

* sweep: ``sweep.training.data.train_batches`` over the uint8 training split already on the device
  (random permutation, random crop with 4-pixel zero padding, horizontal flip, normalisation
  to float, channels_last), one whole batch at a time;
* torchvision: a Dataset that turns each uint8 image into a PIL image (as
  ``torchvision.datasets.CIFAR10`` does) and applies ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)``; ``DataLoader`` with
  shuffling, the same batch size, ``num_workers`` 0 and 2 (persistent workers, timed after a
  warm-up epoch so that worker start-up is not counted against them).

Each setting runs ``--rounds`` times, interleaved, and the median is reported. Target (issue 5)
on the CPU: sweep >= 10x the best DataLoader setting.

    python scripts/bench_input.py [--data-dir DIR] [--device cpu|cuda] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA = os.environ.get("SWEEP_DATA_DIR", str(REPO.parent / "shared/data/cifar10-subset"))


class PILCifar:
    """CIFAR images as torchvision's CIFAR10 serves them: HWC uint8 -> PIL -> transform."""

    def __init__(self, images_nchw, labels, transform):
        self.images = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def time_sweep(splits, batch_size: int, epochs: int, device) -> float:
    import torch

    from sweep.training.data import Normalizer, train_batches

    generator = torch.Generator(device=device).manual_seed(0)
    normalize = Normalizer(device, channels_last=True)
    began, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x, y in train_batches(splits, batch_size, generator, normalize):
            n += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - began)


def make_loader(splits, batch_size: int, workers: int):
    import torch
    from torchvision import transforms

    from sweep.training.data import MEAN, STD

    transform = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(MEAN, STD)])
    dataset = PILCifar(splits.train_x.cpu(), splits.train_y.cpu(), transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       drop_last=True, num_workers=workers,
                                       persistent_workers=workers > 0)


def time_loader(loader, epochs: int) -> float:
    began, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x, y in loader:
            n += y.shape[0]
    return n / (time.perf_counter() - began)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=4585, help="images per epoch")
    parser.add_argument("--threads", type=int, help="torch threads of the sweep path (default: "
                        "torch's choice); DataLoader workers use 1 each, as always")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from sweep.training.data import load_splits
    from sweep.study.specs import DataSpec

    device = torch.device(args.device)
    splits = load_splits(args.data_dir, DataSpec(train_size=args.train_size, val_size=500,
                                                 test_size=100), device, download=False)
    loaders = {w: make_loader(splits, args.batch_size, w) for w in (0, 2)}
    for loader in loaders.values():
        time_loader(loader, 1)  # warm-up: start the workers, fill the OS caches
    time_sweep(splits, args.batch_size, 1, device)
    results: dict[str, list[float]] = {"sweep": [], "DataLoader w=0": [], "DataLoader w=2": []}
    for _ in range(args.rounds):  # interleaved, so background load hits every setting alike
        results["sweep"].append(time_sweep(splits, args.batch_size, 4, device))
        results["DataLoader w=0"].append(time_loader(loaders[0], 1))
        results["DataLoader w=2"].append(time_loader(loaders[2], 1))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"input pipeline, {args.train_size} images/epoch, batch {args.batch_size}, device "
          f"{device}, torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds")
    for name, value in med.items():
        print(f"  {name:16} {value:>10,.0f} img/s   (rounds: "
              f"{', '.join(f'{v:,.0f}' for v in results[name])})")
    best = max(med["DataLoader w=0"], med["DataLoader w=2"])
    ratio = med["sweep"] / best
    print(f"sweep / best DataLoader = {ratio:.1f}x  (target >= 10x: "
          f"{'met' if ratio >= 10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
