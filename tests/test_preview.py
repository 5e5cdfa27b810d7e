"""``sweep schedule``: previews checked against torch's own classes, files, bad input, and the
redraw of real trials checked against the ``lr`` metric MLflow holds for them."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch.optim import lr_scheduler as tl

from helpers import REPO, torch_lr_reference
from sweep.cli import main

S, E = 5, 4
T = S * E


def invoke(*args: str):
    return CliRunner().invoke(main, ["schedule", *args])


def read_csv(text: str) -> list[float]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["step", "lr"]
    assert [int(r[0]) for r in rows[1:]] == list(range(len(rows) - 1))
    return [float(r[1]) for r in rows[1:]]


@pytest.mark.parametrize("warmup", [0, 7, T - 1])  # none; odd, not a multiple of S; T - 1
def test_csv_equals_torch_reference(warmup):
    result = invoke("--scheduler", "cosine", "--warmup-steps", str(warmup), "--base-lr", "0.4",
                    "--epochs", str(E), "--steps-per-epoch", str(S), "--param", "min_lr=0.01",
                    "--warmup-start-factor", "0.05", "--csv")
    assert result.exit_code == 0, result.output
    ours = read_csv(result.stdout)  # the summary went to stderr, stdout is the CSV alone
    ref = torch_lr_reference(lambda o, n: tl.CosineAnnealingLR(o, T_max=n, eta_min=0.01), (0.4,),
                             warmup, S, T, f0=0.05)
    assert ours == pytest.approx([row[0] for row in ref], rel=1e-9, abs=0)
    assert "end of warmup" in result.stderr if warmup else "no warmup" in result.stderr


VAL_LOSSES = [2.0, 1.5, 1.6, 1.55, 1.2, 1.3]  # one per epoch (6): improvements and plateaus
# scheduler, --param values, the torch main scheduler (opt, steps after warmup), stepped per epoch
OTHER_CASES = {
    "step": ({"gamma": 0.7, "step_size_epochs": 1},
             lambda o, n: tl.StepLR(o, step_size=1, gamma=0.7), True),
    "cosine_restarts": ({"t0_epochs": 1, "t_mult": 2, "min_lr": 0.001},
                        lambda o, n: tl.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2,
                                                                    eta_min=0.001), False),
    "polynomial": ({"power": 2.0}, lambda o, n: tl.PolynomialLR(o, total_iters=n, power=2.0),
                   False),
    "plateau": ({"gamma": 0.3, "patience_epochs": 1, "threshold": 0.1, "cooldown_epochs": 1,
                 "min_lr": 0.02},
                lambda o, n: tl.ReduceLROnPlateau(o, factor=0.3, patience=1, threshold=0.1,
                                                  cooldown=1, min_lr=0.02), False),
}


@pytest.mark.parametrize("warmup", [0, 5, 41])
@pytest.mark.parametrize("case", OTHER_CASES)
def test_csv_equals_other_torch_classes(case, warmup):
    """S = 7, E = 6 (T = 42): warmups none, odd, T - 1."""
    params, factory, per_epoch = OTHER_CASES[case]
    args = [f"--param={k}={v}" for k, v in params.items()]
    losses = VAL_LOSSES if case == "plateau" else None
    if losses:
        args.append("--val-losses=" + ",".join(map(str, losses)))
    result = invoke("--scheduler", case, "--base-lr", "0.4", "--epochs", "6",
                    "--steps-per-epoch", "7", "--warmup-steps", str(warmup), "--csv", *args)
    assert result.exit_code == 0, result.output
    ref = torch_lr_reference(factory, (0.4,), warmup, 7, 42, per_epoch=per_epoch,
                             val_losses=losses)
    assert read_csv(result.stdout) == pytest.approx([row[0] for row in ref], rel=1e-9, abs=0)


def test_summary_names_start_end_of_warmup_minimum_and_end():
    result = invoke("--scheduler", "multistep", "--base-lr", "0.4", "--epochs", "4",
                    "--steps-per-epoch", "5", "--warmup-steps", "3", "--param", "gamma=0.1",
                    "--param", "milestones_epochs=[1, 2]")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("multistep (gamma=0.1, milestones_epochs=[1, 2]), base_lr 0.4")
    assert lines[1] == "T = 20 steps (4 epochs x 5 steps/epoch)"
    values = {line.split(":")[0].strip(): line.split() for line in lines[2:]}
    assert values["start"][-1] == "0.004"  # 0.01 x base_lr
    assert values["end of warmup"][-3:] == ["3", "lr", "0.4"]
    assert values["minimum"][-1] == values["end"][-1] == "0.004"  # two decays by 0.1
    assert values["end"][-3] == "19"


def test_csv_and_png_files(tmp_path):
    args = ["--scheduler", "wsd", "--base-lr", "0.1", "--epochs", "10", "--steps-per-epoch", "20",
            "--warmup-steps", "15", "--warmup-start-factor", "0", "--param", "decay_shape=1-sqrt"]
    as_csv, as_png = tmp_path / "lr.csv", tmp_path / "lr.png"
    assert invoke(*args, "-o", str(as_csv)).exit_code == 0
    assert invoke(*args, "-o", str(as_png)).exit_code == 0
    streamed = invoke(*args, "--csv")
    assert as_csv.read_text() == streamed.stdout
    lrs = read_csv(streamed.stdout)
    assert len(lrs) == 200 and lrs[0] == 0.0 and lrs[15] == 0.1 and lrs[-1] < 0.01
    assert as_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and as_png.stat().st_size > 5000


@pytest.mark.parametrize("args,words", [
    (["--scheduler", "step", "--param", "gamma=2", "--param", "step_size_epochs=1"],
     ["--param gamma", "(0, 1]"]),
    (["--scheduler", "cosine", "--param", "min_lr=1"], ["--param min_lr", "[0, base_lr]"]),
    (["--scheduler", "cosine", "--warmup-steps", "20"], ["--warmup-steps", "[0, 19]"]),
    (["--scheduler", "onecycle", "--warmup-steps", "2"], ["--warmup-steps", "onecycle"]),
    (["--scheduler", "cosine", "--param", "gamma=0.1"], ["gamma", "not a parameter"]),
    (["--scheduler", "cosine", "--param", "min_lr"], ["--param 'min_lr'", "KEY=VALUE"]),
    (["--scheduler", "cosine", "--warmup-steps", "2", "--warmup-shape", "exponential",
      "--warmup-start-factor", "0"], ["--warmup-start-factor", "(0, 1]"]),
    (["--scheduler", "cosin"], ["unknown scheduler 'cosin'", "cosine"]),
    (["--scheduler", "cosine", "--base-lr", "-1"], ["--base-lr", "> 0"]),
    (["--scheduler", "plateau", "--param", "gamma=0.5", "--param", "patience_epochs=0",
      "--val-losses", "1,x"], ["--val-losses", "numbers"]),
    (["--scheduler", "cosine", "-o", "{tmp}/lr.svg"], ["-o", ".csv", ".png"]),
    (["--scheduler", "cosine", "-o", "{tmp}/missing/lr.png"], ["does not exist"]),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, words):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    output = [] if "-o" in args else ["-o", str(tmp_path / "out.csv")]
    result = invoke("--base-lr", "0.4", "--epochs", "4", "--steps-per-epoch", "5", *args, *output)
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("error: ")
    for word in words:
        assert word in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,words", [
    (["--study", "smoke"], ["--study NAME --trial N"]),
    (["--study", "smoke", "--trial", "0", "--scheduler", "cosine"], ["no --scheduler"]),
    (["--base-lr", "0.1"], ["missing --scheduler, --epochs, --steps-per-epoch"]),
    (["--study", "smoke", "--trial", "0", "--storage", "sqlite:///{tmp}/none.db"],
     ["no Optuna storage at", "none.db"]),
])
def test_mode_errors(tmp_path, args, words):
    result = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    for word in words:
        assert word in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- a real study -----------------------------------------------------------------------------

STUDY = """
name: lrcheck
seed: 0
trials: 1
sampler: {type: random}
pruner: none
data: {train_size: 120, val_size: 60, test_size: 40}
train: {model: resnet8, width: 1, epochs: 2, batch_size: 20, sync_every_steps: 4, bf16: false}
space:
  warmup_steps: {type: int, low: 1, high: 5}
  base_lr: {type: float, low: 0.05, high: 0.5, log: true}
  # searched warmup shape and start factor (not the default linear from 0.01): the redraw must
  # take the trial's own values, not the study's train: defaults
  warmup_shape: {type: categorical, choices: [exponential, constant]}
  warmup_start_factor: {type: float, low: 0.05, high: 0.5}
  scheduler:
    # threshold 0.9: only a tenfold drop of the validation loss counts as an improvement, so
    # the end of epoch 1 reduces the LR and epoch 2 shows it
    plateau: {gamma: 0.5, patience_epochs: 0, threshold: 0.9}
"""


def _run_cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEP_STORAGE", "MLFLOW_TRACKING_URI")}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: a second thread only spins on a busy machine
    env["PYTHONPATH"] = str(REPO)  # this checkout's sweep, not whichever is installed
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_redrawn_trials_match_the_logged_lr_metric(tiny_cifar, tmp_path, monkeypatch):
    """Launch a real study, redraw its trial from Optuna + MLflow, then corrupt one logged LR
    in the real MLflow store and see the check fail."""
    (tmp_path / "lrcheck.yaml").write_text(STUDY)
    launched = _run_cli(tmp_path, "launch", "--study", "lrcheck.yaml", "--quiet",
                        "--data-dir", str(tiny_cifar), "--device", "cpu",
                        "--set", "train.epochs=3")  # the redraw must take this from MLflow
    assert launched.returncode == 0, launched.stderr[-2000:]

    redrawn = _run_cli(tmp_path, "schedule", "--study", "lrcheck", "--trial", "0", "--csv")
    assert redrawn.returncode == 0, redrawn.stderr[-2000:]
    assert "matches the logged lr metric; max relative difference 0 over 18 logged steps" \
        in redrawn.stderr
    lrs = read_csv(redrawn.stdout)
    assert lrs[17] == pytest.approx(lrs[12], rel=1e-15) and lrs[12] == pytest.approx(
        0.5 * lrs[11], rel=1e-12)  # plateau's reduction at the end of epoch 1, from val losses

    from mlflow.tracking import MlflowClient

    from sweep.views.preview import check_trial

    monkeypatch.chdir(tmp_path)
    first = check_trial("lrcheck", 0, "sqlite:///sweep.db", "sqlite:///mlflow.db")
    assert first.matches and first.logged_steps == 18
    assert first.curve.schedule.warmup_shape in ("exponential", "constant")
    # an absolute URI: MLflow keeps one store per URI string per process, and an earlier test
    # of this session may have opened "sqlite:///mlflow.db" in another folder
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    client.log_metric(first.run_id, "lr", first.curve.lrs[9] * (1 + 1e-6), step=9)
    corrupted = check_trial("lrcheck", 0, "sqlite:///sweep.db", "sqlite:///mlflow.db")
    assert not corrupted.matches and corrupted.worst_step == 9
    assert corrupted.max_rel_diff == pytest.approx(1e-6, rel=1e-3)
    failed = invoke("--study", "lrcheck", "--trial", "0")
    assert failed.exit_code == 1 and "DIFFERS" in failed.stdout
