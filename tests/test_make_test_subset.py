"""scripts/make_test_subset.py builds the suite's CIFAR-10 subset from an official
cifar-10-batches-py folder. Its input here is the shared subset itself (the only real CIFAR-10 on
these machines: the first 1,017 records of each official file), so the script runs for real and
its output is read back two ways: through sweep's own loader, and by pickle against the input."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sweep.study.specs import DataSpec
from sweep.training.data import load_splits

pytestmark = pytest.mark.slow  # a Python process that imports torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_test_subset.py"
NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)


def _records(folder: Path, name: str) -> dict:
    with open(folder / name, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_the_subset_loads_with_the_counts_asked_and_the_source_records(shared_cifar, tmp_path,
                                                                       capsys):
    source = shared_cifar / "cifar-10-batches-py"
    out = tmp_path / "subset"
    done = _run("--source", str(shared_cifar), "--out", str(out), "--per-batch", "300",
                "--test", "120")
    assert done.returncode == 0, done.stderr
    written = out / "cifar-10-batches-py"
    assert sorted(p.name for p in written.iterdir()) == sorted([*NAMES, "batches.meta"])
    for name in NAMES:  # the first records of each source file, pixels, labels, names, order
        got, want = _records(written, name), _records(source, name)
        n = 120 if name == "test_batch" else 300
        assert got["data"].dtype == np.uint8 and got["data"].shape == (n, 3072)
        assert np.array_equal(got["data"], want["data"][:n])
        assert got["labels"] == list(want["labels"][:n])
        assert got["filenames"] == list(want["filenames"][:n])
    assert (written / "batches.meta").read_bytes() == (source / "batches.meta").read_bytes()
    sums = dict(line.split()[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted([*NAMES, "batches.meta"])

    # sweep's own loader takes the folder: 1,500 training images, 120 test images
    splits = load_splits(out, DataSpec(train_size=1400, val_size=100), torch.device("cpu"),
                         download=False)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (1400, 100, 120)
    assert splits.test_x.shape == (120, 3, 32, 32) and splits.test_x.dtype == torch.uint8

    # the rest in this process (one torch import is enough): the defaults are the suite's
    # 5 x 1,017 + 1,017 images, so the subset made from itself is itself
    script = _script()
    whole = tmp_path / "whole"
    assert script.main(["--source", str(source), "--out", str(whole)]) == 0
    for name in NAMES:
        assert np.array_equal(_records(whole / "cifar-10-batches-py", name)["data"],
                              _records(source, name)["data"])

    # bad input: one line, exit 2, nothing written
    for args, said in ((["--source", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                        "no complete cifar-10-batches-py/"),
                       (["--source", str(source), "--out", str(tmp_path / "y"), "--test", "5000"],
                        "holds 1017 records, fewer than the 5000 asked for"),
                       (["--source", str(source), "--out", str(out)], "exists already")):
        assert script.main(args) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _script():
    """scripts/make_test_subset.py as a module (scripts/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_test_subset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
