#!/usr/bin/env python3
"""Build the CIFAR-10 subset the test suite trains on from an official copy.

The README's test command (``SWEEP_DATA_DIR=../shared/data/cifar10-subset python -m pytest``)
needs a folder holding ``cifar-10-batches-py/``. This script writes one from the official
"CIFAR-10 python version" (``cifar-10-python.tar.gz`` unpacked, or the folder sweep downloads
into ``$XDG_CACHE_HOME/sweep/data``): each of ``data_batch_1`` ... ``data_batch_5`` keeps its
first ``--per-batch`` records and ``test_batch`` its first ``--test`` records, pixels, labels,
file names and order unchanged; ``batches.meta`` is copied as is. The defaults, 1,017 per file,
give the suite's 5,085 training and 1,017 test images. ``SHA256SUMS`` lists the files written.

The files are pickles in the official layout (a dict with ``batch_label``, ``labels``,
``data`` as uint8 of shape (N, 3072), ``filenames``), written with str keys: they load with
``pickle.load(f, encoding="latin1")`` as the official ones do, and through sweep's own loader.
torchvision's ``CIFAR10`` class refuses them (it checks the full files' md5 sums).

The subset is written to a temporary folder beside ``--out`` and renamed into place, so an
interrupted run leaves nothing half written; an existing ``OUT/cifar-10-batches-py`` is refused.

    python scripts/make_test_subset.py --source DIR --out DIR [--per-batch 1017] [--test 1017]

``--source``: the ``cifar-10-batches-py`` folder or a folder holding it. Bad input is one line
on stderr and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE, META_FILE = "test_batch", "batches.meta"
PER_FILE = 1017  # the suite's subset: 5 x 1,017 training images, 1,017 test images


class BadInput(Exception):
    """One line for the user; exit status 2."""


def source_folder(given: Path) -> Path:
    """The ``cifar-10-batches-py`` folder ``given`` is or holds."""
    for candidate in (given / FOLDER, given):
        if all((candidate / name).is_file() for name in (*TRAIN_FILES, TEST_FILE, META_FILE)):
            return candidate
    raise BadInput(f"--source {given}: no complete {FOLDER}/ there (data_batch_1..5, test_batch, "
                   f"batches.meta); unpack cifar-10-python.tar.gz and pass its {FOLDER}/")


def head(path: Path, count: int) -> dict:
    """The first ``count`` records of the batch file ``path``, in the official layout."""
    from sweep.training.data import read_batch_file

    try:
        batch = read_batch_file(path)
    except Exception as err:  # a truncated or foreign pickle: name the file, not the internals
        raise BadInput(f"{path} is not a CIFAR-10 batch file ({type(err).__name__}: "
                       f"{err})") from None
    if not isinstance(batch, dict) or not {"data", "labels"} <= set(batch):
        raise BadInput(f"{path} has no 'data'/'labels' entries: not a CIFAR-10 batch file")
    data = batch["data"]
    if getattr(data, "dtype", None) != "uint8" or getattr(data, "shape", (0, 0))[1:] != (3072,):
        raise BadInput(f"{path}: 'data' is not uint8 images of shape (N, 3072): not a CIFAR-10 "
                       f"batch file")
    held = len(batch["labels"])
    if count > held:
        raise BadInput(f"{path} holds {held} records, fewer than the {count} asked for; lower "
                       f"--per-batch / --test")
    out = {"batch_label": batch.get("batch_label", path.name),
           "labels": list(batch["labels"][:count]), "data": data[:count].copy()}
    if "filenames" in batch:
        out["filenames"] = list(batch["filenames"][:count])
    return out


def make_subset(source: Path, out: Path, per_batch: int = PER_FILE, test: int = PER_FILE) -> Path:
    """Write ``out/cifar-10-batches-py/`` (and ``out/SHA256SUMS``) from the official folder
    ``source`` (or a folder holding it); returns the folder written. Raises BadInput."""
    if per_batch < 1 or test < 1:
        raise BadInput(f"--per-batch and --test must be at least 1, got {per_batch} and {test}")
    folder = source_folder(source)
    target = out / FOLDER
    if target.exists():
        raise BadInput(f"--out {out}: {target} exists already; remove it or choose another --out")
    batches = {name: head(folder / name, per_batch) for name in TRAIN_FILES}
    batches[TEST_FILE] = head(folder / TEST_FILE, test)  # every file read before one is written
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cifar-subset-", dir=out))
    try:
        for name, batch in batches.items():
            with open(staging / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
        shutil.copyfile(folder / META_FILE, staging / META_FILE)
        sums = [f"{hashlib.sha256((staging / name).read_bytes()).hexdigest()}  {name}"
                for name in sorted(p.name for p in staging.iterdir())]
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True,
                        help=f"the official {FOLDER}/ folder, or a folder holding it")
    parser.add_argument("--out", type=Path, required=True,
                        help=f"folder to write {FOLDER}/ and SHA256SUMS into (the SWEEP_DATA_DIR "
                             f"of the tests)")
    parser.add_argument("--per-batch", type=int, default=PER_FILE,
                        help="records kept of each training batch file (default %(default)s)")
    parser.add_argument("--test", type=int, default=PER_FILE,
                        help="records kept of test_batch (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        written = make_subset(args.source, args.out, args.per_batch, args.test)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{written}: {5 * args.per_batch} training and {args.test} test images; "
          f"SWEEP_DATA_DIR={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
