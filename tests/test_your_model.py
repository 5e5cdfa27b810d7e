"""Your own network (``train.model: MODULE:FACTORY``) and CIFAR-100 (``data.dataset``).

Bad factories are refused at the edge with one line, exit 2 and nothing written; the shipped
example (``examples/tiny_cnn.py``) runs end to end from the CLI as docs/your-model.md says,
and every trial records its model. The CIFAR-100 loader reads a folder in the official format
written here from the shared subset's images; the references (labels, parameter counts, hashes)
are computed by the test from its own data, not by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from helpers import REPO, sweep_cmd, sweep_env
from sweep.cli import main
from sweep.errors import DataError, ModelError
from sweep.study.specs import DataSpec
from sweep.study.spec import load_study, parse_study
from sweep.training.data import load_splits
from sweep.training.factory import load_factory
from sweep.training.model_check import check_model
from sweep.training.models import CifarResNet

GOOD = """\
name: t
trials: 2
data: {train_size: 100, val_size: 50}
train: {model: MODEL, epochs: 2, batch_size: 50}
space:
  warmup_steps: {type: int, low: 0, high: 3}
  base_lr: {type: float, low: 0.01, high: 1.0, log: true}
  scheduler: {cosine: {}}
"""

_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes, out=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 32 * 32, out or num_classes)
{extra}
    def forward(self, x):
        x = self.conv(x)
        return self.head({flatten})

"""
FLAT = "x.flatten(1)"
# (id, module text, factory, model_args, what the one line says after "train.model M:NAME: ")
BAD_FACTORIES = [
    ("not-importable", None, "build_net", {}, "no module 'm36_not_importable' on the Python path; "
     "run sweep from the folder that holds it or add that folder to PYTHONPATH"),
    ("import-fails", "import m36_not_installed_xyz\n", "build_net", {},
     "importing m36_import_fails failed: No module named 'm36_not_installed_xyz'; install the "
     "package it needs"),
    ("module-raises", "raise RuntimeError('no GPU here')\n", "build_net", {},
     "importing m36_module_raises failed: RuntimeError: no GPU here; fix that module"),
    ("no-attribute", "def build(num_classes): pass\n", "build_net", {},
     "m36_no_attribute has no attribute 'build_net'; name the function that builds your network"),
    ("not-callable", "build_net = 3\n", "build_net", {},
     "build_net is not callable (it is of type int); name the function or class that returns"),
    ("wrong-arguments", _NET.format(extra="", flatten=FLAT) + "build_net = Net\n", "build_net",
     {"width": 2}, "calling it with width=2, num_classes=10 failed: TypeError: "),
    ("not-a-module", "def build_net(num_classes): return [num_classes]\n", "build_net", {},
     "returned a list, not a torch.nn.Module; return the network itself"),
    ("wrong-shape", _NET.format(extra="", flatten=FLAT) + "build_net = Net\n", "build_net",
     {"out": 7}, "a 2 x 3 x 32 x 32 batch gave (2, 7) torch.float32; the network must return "
     "floating-point logits of shape 2 x 10 (num_classes, from data.dataset)"),
    ("integer-parameter", _NET.format(
        extra="        self.seen = nn.Parameter(torch.zeros(1, dtype=torch.long), "
              "requires_grad=False)\n", flatten=FLAT) + "build_net = Net\n", "build_net", {},
     "parameter 'seen' is torch.int64; every parameter must be floating point (register integer "
     "state as a buffer)"),
    # .view needs a contiguous NCHW tensor: a real module that cannot take channels_last
    ("no-channels-last", _NET.format(extra="", flatten="x.view(x.shape[0], -1)")
     + "build_net = Net\n", "build_net", {},
     "the forward fails on channels_last input (RuntimeError: view size is not compatible"),
]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    inputs, run = tmp_path / "in", tmp_path / "run"
    inputs.mkdir()
    run.mkdir()
    monkeypatch.chdir(run)
    monkeypatch.syspath_prepend(str(inputs))  # where the users' modules are
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    for var in ("SWEEP_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return inputs, run


@pytest.mark.parametrize("case", BAD_FACTORIES, ids=[c[0] for c in BAD_FACTORIES])
def test_a_bad_factory_is_one_line_exit_2_and_nothing_written(case, dirs, tiny_cifar):
    name, text, factory, args, expected = case
    inputs, run = dirs
    module = "m36_" + name.replace("-", "_")
    if text is not None:
        (inputs / f"{module}.py").write_text(text)
    study = inputs / "study.yaml"
    study.write_text(GOOD.replace("MODEL", f"{module}:{factory}"))
    sets = ["--set", f"train.model_args={json.dumps(args)}"] if args else []
    result = CliRunner().invoke(main, ["launch", "--study", str(study), "--data-dir",
                                       str(tiny_cifar), "--quiet", *sets])
    err = result.stderr.strip()
    assert result.exit_code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"error: train.model {module}:{factory}: {expected}"), err
    assert sorted(os.listdir(run)) == [], "something was written"


def test_channels_last_false_is_the_way_out_for_a_module_that_cannot_take_it(dirs):
    inputs, _ = dirs
    (inputs / "m36_nchw_only.py").write_text(
        _NET.format(extra="", flatten="x.view(x.shape[0], -1)") + "build_net = Net\n")
    text = GOOD.replace("MODEL", "m36_nchw_only:build_net")
    spec = parse_study(text, "s.yaml", inputs / "s.yaml")
    with pytest.raises(ModelError, match="set train.channels_last: false"):
        check_model(spec.train, spec.data.num_classes)
    spec = parse_study(text, "s.yaml", inputs / "s.yaml", ["train.channels_last=false"])
    check_model(spec.train, spec.data.num_classes)  # passes: trains in NCHW


def test_the_factory_imports_from_the_current_folder_as_python_m_does(tmp_path, monkeypatch):
    (tmp_path / "m36_here_pkg").mkdir()
    (tmp_path / "m36_here_pkg" / "nets.py").write_text("def build(num_classes): return num_classes\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_factory("m36_here_pkg.nets:build")(num_classes=3) == 3


@pytest.mark.parametrize("sets, key, says", [
    (["train.model_args={channels: 8}"], "train.model_args",
     "only a model given by import path (MODULE:FACTORY) takes model_args"),
    (["train.model=examples.tiny_cnn:build_net", "train.fuse=2"], "train.fuse",
     "a model given by import path trains one trial at a time; packs fuse only the built-in"),
    (["train.model=examples.tiny_cnn:build_net", "train.width=2"], "train.width",
     "width applies to the built-in ResNets only"),
    (["train.model=examples.tiny_cnn:build_net", "train.model_args={num_classes: 5}"],
     "train.model_args", "must not set num_classes: sweep passes it from data.dataset"),
    (["train.model=examples/tiny_cnn.py"], "train.model",
     "must be one of resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110, "
     "resnet18 or an import path MODULE:FACTORY"),
    (["data.dataset=imagenet"], "data.dataset", "must be one of cifar10, cifar100"),
])
def test_model_keys_that_cannot_work_are_refused_by_the_study_check(sets, key, says, dirs,
                                                                    tiny_cifar):
    inputs, run = dirs
    study = inputs / "study.yaml"
    study.write_text(GOOD.replace("MODEL", "resnet8"))
    flags = [a for item in sets for a in ("--set", item)]
    result = CliRunner().invoke(main, ["launch", "--study", str(study), "--data-dir",
                                       str(tiny_cifar), "--quiet", *flags])
    err = result.stderr.strip()
    assert result.exit_code == 2 and "\n" not in err, err
    assert err.startswith(f"error: {study}: {key} (--set): {says}"), err
    assert sorted(os.listdir(run)) == []


@pytest.fixture
def repo_on_path(monkeypatch):
    """``examples`` importable as from the repository root, wherever pytest runs."""
    monkeypatch.syspath_prepend(str(REPO))


def test_the_shipped_example_study_and_factory_pass_every_check(repo_on_path):
    spec = load_study(REPO / "examples" / "tiny_cnn.yaml")
    assert spec.train.model == "examples.tiny_cnn:build_net" and spec.train.fuse == 1
    for dataset in ("cifar10", "cifar100"):
        check_model(spec.train, {"cifar10": 10, "cifar100": 100}[dataset])


# --- CIFAR-100 ---------------------------------------------------------------------------------

def write_cifar100(root: Path, source: Path, train: int, test: int) -> dict[bytes, int]:
    """A ``cifar-100-python/`` folder in the official format (pickles ``train``, ``test`` and
    ``meta``) holding the subset's first images with fine labels drawn here; returns each
    image's bytes -> its fine label (the reference)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(36)
    labels = {}
    for name, count, batch in (("train", train, "data_batch_1"), ("test", test, "test_batch")):
        with open(source / "cifar-10-batches-py" / batch, "rb") as f:
            images = pickle.load(f, encoding="latin1")["data"][:count]
        fine = rng.integers(0, 100, count)
        labels.update({img.tobytes(): int(lab) for img, lab in zip(images, fine)})
        with open(folder / name, "wb") as f:
            pickle.dump({"filenames": [f"img_{i}.png" for i in range(count)],
                         "batch_label": f"{name} batch", "fine_labels": fine.tolist(),
                         "coarse_labels": (fine // 5).tolist(), "data": images}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)],
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, f)
    return labels


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory, shared_cifar) -> tuple[Path, dict[bytes, int]]:
    root = tmp_path_factory.mktemp("c100")
    return root, write_cifar100(root, shared_cifar, train=400, test=100)


def test_the_cifar100_loader_reads_the_official_format_with_fine_labels(cifar100):
    root, reference = cifar100
    spec = DataSpec(train_size=300, val_size=80, test_size=60, dataset="cifar100")
    for data_dir in (root, root / "cifar-100-python"):  # the parent, or the folder itself
        splits = load_splits(data_dir, spec, torch.device("cpu"), download=False)
        assert splits.num_classes == 100 and splits.source == str(root / "cifar-100-python")
        seen = []
        for x, y, n in ((splits.train_x, splits.train_y, 300), (splits.val_x, splits.val_y, 80),
                        (splits.test_x, splits.test_y, 60)):
            assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8
            keys = [img.reshape(-1).numpy().tobytes() for img in x]
            assert [reference[k] for k in keys] == y.tolist()  # each image has its fine label
            seen.append(set(keys))
        assert not seen[0] & seen[1]  # validation never overlaps training
    with pytest.raises(DataError, match="CIFAR-100 not found: no cifar-100-python/ in"):
        load_splits(root / "cifar-100-python" / "nothing", spec, torch.device("cpu"),
                    download=False)


@pytest.mark.slow
def test_a_cifar100_trial_trains_the_example_net_with_100_logits(cifar100, repo_on_path):
    from sweep.study.space import trial_config
    from sweep.training.train import train
    import optuna

    root, _ = cifar100
    spec = load_study(REPO / "examples" / "tiny_cnn.yaml", [
        "data.dataset=cifar100", "data.train_size=300", "data.val_size=80", "data.test_size=60",
        "train.epochs=1", "train.batch_size=50", "train.model_args={channels: 4}"])
    splits = load_splits(root, spec.data, torch.device("cpu"), download=False)
    cfg = trial_config(optuna.trial.FixedTrial({"scheduler": "cosine", "warmup_steps": 1,
                                                "base_lr": 0.05}), spec)
    states = []
    result = train(cfg, splits, torch.device("cpu"), checkpoint=lambda take: states.append(take()))
    head = states[-1]["model"]["10.weight"]  # the Linear after pooling, flatten and dropout
    assert head.shape == (100, 16)
    assert math.isfinite(result.history[0]["val_loss"]) and result.test_acc is not None


# --- the shipped example, end to end ------------------------------------------------------------

SHRINK = ["--trials", "3", "--set", "data.train_size=400", "--set", "data.val_size=100",
          "--set", "data.test_size=100", "--set", "train.epochs=2", "--set", "train.batch_size=100",
          "--set", "train.model_args={channels: 4, dropout: 0.1}"]


@pytest.mark.slow
def test_the_example_study_runs_from_a_checkout_as_the_docs_say(tmp_path, shared_cifar):
    """From a folder laid out as a clone (``examples/`` at its root), the commands of
    docs/your-model.md: launch, report; every trial records its model."""
    shutil.copytree(REPO / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = sweep_env(shared_cifar)
    for command in (["launch", "--study", "examples/tiny_cnn.yaml", "--quiet", *SHRINK],
                    ["report", "--study", "tiny_cnn"]):
        done = subprocess.run(sweep_cmd(*command), cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "reports" / "tiny_cnn" / "index.html").is_file()

    sys.path.insert(0, str(tmp_path))
    try:
        from examples.tiny_cnn import build_net
    finally:
        sys.path.remove(str(tmp_path))
    count = sum(p.numel() for p in build_net(num_classes=10, channels=4, dropout=0.1).parameters())
    digest = hashlib.sha256((tmp_path / "examples" / "tiny_cnn.py").read_bytes()).hexdigest()
    with sqlite3.connect(tmp_path / "sweep.db") as conn:
        states = [s for (s,) in conn.execute("SELECT state FROM trials")]
        attrs = {}
        for trial, key, value in conn.execute(
                "SELECT trial_id, key, value_json FROM trial_user_attributes"):
            attrs.setdefault(trial, {})[key] = json.loads(value)
    assert len(states) == 3 and "RUNNING" not in states
    summary = (tmp_path / "reports" / "tiny_cnn" / "summary.md").read_text()
    assert f"examples.tiny_cnn:build_net {{\"channels\": 4, \"dropout\": 0.1}} ({count:,} " \
           f"parameters)" in summary
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for trial in attrs.values():
        assert trial["model"] == "examples.tiny_cnn:build_net"
        assert json.loads(trial["model_args"]) == {"channels": 4, "dropout": 0.1}
        assert trial["model_parameters"] == count and trial["model_source_sha256"] == digest
        run = client.get_run(trial["mlflow_run_id"])
        assert run.data.params["model"] == "examples.tiny_cnn:build_net"
        assert json.loads(run.data.params["model_args"]) == {"channels": 4, "dropout": 0.1}
        assert run.data.params["model_parameters"] == str(count)
        assert run.data.params["dataset"] == "cifar10"
        assert run.data.tags["sweep.model_source_sha256"] == digest


@pytest.mark.slow
def test_a_fused_pack_of_builtins_trains_cifar100(cifar100, in_tmp):
    """The built-in ResNets' packs build their heads for 100 classes too."""
    root, _ = cifar100
    result = CliRunner().invoke(main, [
        "launch", "--study", "smoke", "--data-dir", str(root), "--quiet", "--trials", "2",
        # explicit stores: an in-process run must not follow a URI another test left behind
        "--storage", f"sqlite:///{in_tmp}/sweep.db",
        "--tracking-uri", f"sqlite:///{in_tmp}/mlflow.db",
        "--set", "data.dataset=cifar100", "--set", "data.train_size=300", "--set",
        "data.val_size=80", "--set", "data.test_size=80", "--set", "train.epochs=1",
        "--set", "train.batch_size=50", "--set", "train.fuse=2"])
    assert result.exit_code == 0, result.output
    with sqlite3.connect(in_tmp / "sweep.db") as conn:
        states = sorted(s for (s,) in conn.execute("SELECT state FROM trials"))
        packs = {json.loads(v) for (v,) in conn.execute(
            "SELECT value_json FROM trial_user_attributes WHERE key = 'model_parameters'")}
    assert states == ["COMPLETE", "COMPLETE"]
    # resnet8 with a 100-class head: 90 more rows of 64 weights and a bias than for CIFAR-10
    ten = sum(p.numel() for p in CifarResNet(1, 1, 10).parameters())
    assert packs == {ten + 90 * 64 + 90}
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                              "tags.`sweep.role` != 'study'")
    assert sorted(r.data.tags["sweep.slot"] for r in runs) == ["0", "1"]  # one pack of two
