"""Bad input: one line naming the problem and the fix, exit status 2, no traceback, and
nothing written anywhere (no storage, no MLflow store, no data folder)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sweep.cli import main
from helpers import PG_PASSWORD, write_cifar

GOOD = """\
name: t
trials: 2
data: {train_size: 100, val_size: 50}
train: {model: resnet8, epochs: 2, batch_size: 50}
space:
  warmup_steps: {type: int, low: 0, high: 3}
  base_lr: {type: float, low: 0.01, high: 1.0, log: true}
  scheduler:
    step: {gamma: {type: float, low: 0.1, high: 0.5}, step_size_epochs: 1}
    cosine: {}
"""

# (id, replacement applied to GOOD, expected start of the message after "error: F: ")
FILE_CASES = [
    ("unknown-top-key", ("trials: 2", "trails: 2"), "trails (line 2): unknown key (did you mean 'trials'?)"),
    ("wrong-type", ("epochs: 2", "epochs: two"), "train.epochs (line 4): must be an integer"),
    ("empty-choices", ("step_size_epochs: 1}", "step_size_epochs: {type: categorical, choices: []}}"),
     "space.scheduler.step.step_size_epochs.choices"),
    ("duplicate-choices", ("step_size_epochs: 1}", "step_size_epochs: {type: categorical, choices: [1, 1]}}"),
     "space.scheduler.step.step_size_epochs.choices"),
    ("low-above-high", ("low: 0.1, high: 0.5", "low: 0.5, high: 0.1"), "space.scheduler.step.gamma"),
    ("log-low-zero", ("low: 0.01, high: 1.0", "low: 0, high: 1.0"), "space.base_lr.low"),
    ("unknown-scheduler", ("cosine: {}", "cosyne: {}"), "space.scheduler.cosyne (line 10): unknown scheduler"),
    ("unknown-model", ("resnet8", "vgg16"), "train.model (line 4): must be one of"),
    ("unknown-optimizer", ("batch_size: 50}", "batch_size: 50, optimizer: lamb}"), "train.optimizer"),
    ("unknown-sampler", ("trials: 2", "trials: 2\nsampler: {type: grid}"), "sampler.type"),
    ("unknown-pruner", ("trials: 2", "trials: 2\npruner: {type: asha}"), "pruner.type"),
    ("pruner-param", ("trials: 2", "trials: 2\npruner: {type: median, reduction_factor: 3}"),
     "pruner.reduction_factor"),
    ("patient-unwrapped", ("trials: 2", "trials: 2\npruner: {type: patient, patience: 2}"), "pruner"),
    ("conditional-on-wrong-scheduler", ("cosine: {}", "cosine: {gamma: 0.5}"),
     "space.scheduler.cosine.gamma (line 10): not a parameter of scheduler 'cosine'"),
    ("warmup-too-long", ("high: 3}", "high: 30}"), "space.warmup_steps"),
    ("batch-larger-than-split", ("batch_size: 50", "batch_size: 150"), "train.batch_size"),
    ("metric-not-produced", ("trials: 2", "trials: 2\nobjective: {metric: train_acc}"), "objective.metric"),
    ("bad-direction", ("trials: 2", "trials: 2\nobjective: {direction: max}"), "objective.direction"),
    ("gamma-above-one", ("low: 0.1, high: 0.5", "low: 0.1, high: 1.5"), "space.scheduler.step.gamma"),
    ("min-lr-above-base", ("cosine: {}", "cosine: {min_lr: 5.0}"), "space.scheduler.cosine.min_lr"),
    ("onecycle-warmup-twice", [("cosine: {}", "onecycle: {}"),
                               ("{type: int, low: 0, high: 3}", "2")],
     "space.warmup_steps (line 6): must be 0 for scheduler 'onecycle'"),
    ("missing-space", ("space:", "spaces:"), "spaces"),
    ("trials-zero", ("trials: 2", "trials: 0"), "trials (line 2): must be an integer >= 1"),
    ("compile-neither-bool-nor-auto", ("batch_size: 50}", "batch_size: 50, compile: maybe}"),
     "train.compile (line 4): must be true, false or auto, got 'maybe'"),
    # searched training fields (docs/search-space.md): each value checked as train: checks it
    ("momentum-one", ("  scheduler:", "  momentum: {type: float, low: 0.5, high: 1.0}\n  scheduler:"),
     "space.momentum (line 8): must be in [0, 1), got 1.0"),
    ("negative-weight-decay", ("  scheduler:", "  weight_decay: {type: categorical, choices: [0.001, -0.001]}\n  scheduler:"),
     "space.weight_decay (line 8): must be >= 0, got -0.001"),
    ("unknown-warmup-shape", ("  scheduler:", "  warmup_shape: {type: categorical, choices: [linear, cubic]}\n  scheduler:"),
     "space.warmup_shape (line 8): must be one of linear, exponential, constant, got 'cubic'"),
    ("one-choice", ("  scheduler:", "  label_smoothing: {type: categorical, choices: [0.1]}\n  scheduler:"),
     "space.label_smoothing.choices (line 8): has one choice (0.1): nothing to search"),
    ("float-low-equals-high", ("  scheduler:", "  weight_decay: {type: float, low: 0.001, high: 0.001}\n  scheduler:"),
     "space.weight_decay (line 8): low (0.001) = high (0.001): nothing to search"),
    ("fixed-and-searched", [("batch_size: 50}", "batch_size: 50, momentum: 0.9}"),
                            ("  scheduler:", "  momentum: {type: float, low: 0.5, high: 0.95}\n  scheduler:")],
     "space.momentum (line 8): is both fixed in train: (train.momentum (line 4)) and searched in space:"),
    ("searched-key-misspelt", ("  scheduler:", "  weigth_decay: 0.001\n  scheduler:"),
     "space.weigth_decay (line 8): unknown key (did you mean 'weight_decay'?)"),
    ("beta-with-sgd", ("  scheduler:", "  beta2: {type: float, low: 0.9, high: 0.999}\n  scheduler:"),
     "space.beta2 (line 8): is a parameter of optimizer 'adamw', but train.optimizer is 'sgd'"),
    ("exponential-warmup-from-zero", [("batch_size: 50}", "batch_size: 50, warmup_start_factor: 0.0}"),
                                      ("  scheduler:", "  warmup_shape: {type: categorical, choices: [linear, exponential]}\n  scheduler:")],
     "train.warmup_start_factor (line 4): must be in (0, 1] for warmup_shape 'exponential'"),
]


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    inputs, run = tmp_path / "in", tmp_path / "run"
    inputs.mkdir()
    run.mkdir()
    monkeypatch.chdir(run)
    for var in ("SWEEP_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    return inputs, run


def invoke(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stderr.strip(), result.output


def assert_one_line_error(code, err, expected_start, run_dir: Path):
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: " + expected_start), err
    assert sorted(os.listdir(run_dir)) == [], "something was written"


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_study_files(case, dirs, tiny_cifar):
    _, replacement, expected = case
    inputs, run = dirs
    study = inputs / "bad.yaml"
    text = GOOD
    for old, new in replacement if isinstance(replacement, list) else [replacement]:
        assert old in text
        text = text.replace(old, new, 1)
    study.write_text(text)
    for command in (["validate", str(study)],
                    ["launch", "--study", str(study), "--data-dir", str(tiny_cifar), "--quiet"]):
        code, err, _ = invoke(command)
        assert_one_line_error(code, err, f"{study}: {expected}", run)


def test_yaml_syntax_error(dirs):
    inputs, run = dirs
    study = inputs / "bad.yaml"
    study.write_text(GOOD + "oops: [1, 2\n")
    code, err, _ = invoke(["launch", "--study", str(study)])
    assert_one_line_error(code, err, f"{study} (line ", run)
    assert "not valid YAML" in err


def _corrupt(root: Path, how: str) -> Path:
    write_cifar(root, per_batch=40)
    target = root / "cifar-10-batches-py" / "data_batch_2"
    if how == "truncated":
        target.write_bytes(target.read_bytes()[:500])
    elif how == "shape":
        with open(target, "wb") as f:
            pickle.dump({"data": np.zeros((40, 100), np.uint8), "labels": [0] * 40}, f)
    elif how == "labels":
        with open(target, "wb") as f:
            pickle.dump({"data": np.zeros((40, 3072), np.uint8), "labels": [12] * 40}, f)
    elif how == "code":  # a pickle that would run code if loaded with pickle.load
        target.write_bytes(pickle.dumps(os.system))
    elif how == "missing-file":
        target.unlink()
    return root



FLAG_CASES = [
    ("unknown-study", ["--study", "no_such_study"], "unknown study 'no_such_study'"),
    ("storage-scheme", ["--storage", "redis://localhost/0"], "storage 'redis://localhost/0': unsupported URL"),
    ("storage-folder", ["--storage", "sqlite:///no/such/folder/s.db"], "SQLite storage no/such/folder/s.db: folder"),
    ("storage-unreachable", ["--storage", f"postgresql://sweep:{PG_PASSWORD}@127.0.0.1:1/sweep"],
     "storage 'postgresql://sweep:***@127.0.0.1:1/sweep' is unreachable"),
    ("storage-no-host", ["--storage", "postgresql:///sweep"], "storage 'postgresql:///sweep': no host"),
    ("tracking-folder", ["--tracking-uri", "sqlite:///no/such/folder/m.db"], "MLflow store no/such/folder/m.db: folder"),
    ("tracking-scheme", ["--tracking-uri", "ftp://example/x"], "tracking URI 'ftp://example/x': unsupported"),
    ("tracking-server-down", ["--tracking-uri", f"http://sweep:{PG_PASSWORD}@127.0.0.1:1"],
     "no MLflow tracking server answers at http://sweep:***@127.0.0.1:1 ("),
    ("device-cuda", ["--device", "cuda"], "--device cuda: CUDA is not available"),
    ("device-unknown", ["--device", "tpu"], "--device tpu: use auto, cpu, cuda or cuda:N"),
    ("set-unknown-key", ["--set", "train.epoch=3"], "--set train.epoch: unknown key (did you mean 'epochs'?)"),
    ("set-wrong-type", ["--set", "train.epochs=abc"], "/studies/smoke.yaml: train.epochs (--set): must be an integer, got 'abc'"),
    ("set-no-equals", ["--set", "train.epochs"], "--set 'train.epochs': expected KEY=VALUE"),
    ("set-space", ["--set", "space.base_lr=0.1"], "--set space.base_lr: unknown key"),
    ("set-bad-value", ["--set", "train.epochs=0"], "/studies/smoke.yaml: train.epochs (--set): must be >= 1"),
    ("data-too-small", ["--set", "data.train_size=5000"], "/cifar-10-batches-py holds 200 training images"),
    ("checkpoint-dir-virtual", ["--checkpoint-dir", "/proc/sweep-ckpt"],
     "checkpoint folder /proc/sweep-ckpt cannot be written ("),
]


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flags(case, dirs, tiny_cifar):
    _, flags, expected = case
    _, run = dirs
    args = ["launch", "--quiet", "--data-dir", str(tiny_cifar)]
    if "--study" not in flags:
        args += ["--study", "smoke", "--set", "data.train_size=150", "--set", "data.val_size=50",
                 "--set", "data.test_size=40", "--set", "train.batch_size=15"]
    code, err, _ = invoke(args + flags)
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err
    assert expected in err and err.startswith("error: "), err
    assert PG_PASSWORD not in err
    assert sorted(os.listdir(run)) == []


@pytest.mark.parametrize("how, expected", [
    ("truncated", "data_batch_2 is corrupt"),
    ("shape", "data_batch_2: 'data' must be uint8 of shape (N, 3072)"),
    ("labels", "data_batch_2: labels out of range 0..9"),
    ("code", "data_batch_2 is corrupt (UnpicklingError: refusing to load posix.system)"),
    ("missing-file", "CIFAR-10 file missing:"),
])
def test_corrupt_data_folder(how, expected, dirs, tmp_path):
    _, run = dirs
    data = _corrupt(tmp_path / "data", how)
    code, err, _ = invoke(["launch", "--study", "smoke", "--quiet", "--data-dir", str(data)])
    assert_one_line_error(code, err, "", run)
    assert expected in err, err


def test_missing_data_folder_writes_nothing(dirs, tmp_path):
    _, run = dirs
    missing = tmp_path / "nowhere" / "data"
    code, err, _ = invoke(["launch", "--study", "smoke", "--quiet", "--data-dir", str(missing)])
    assert_one_line_error(code, err, f"CIFAR-10 not found in {missing}", run)
    assert "--data-dir" in err and not (tmp_path / "nowhere").exists()


def test_validate_accepts_good_files(dirs):
    inputs, _ = dirs
    (inputs / "good.yaml").write_text(GOOD)
    code, _, out = invoke(["validate", str(inputs / "good.yaml"), "smoke"])
    assert code == 0 and out.count("ok: ") == 2
