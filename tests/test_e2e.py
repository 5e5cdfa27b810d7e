"""The real thing: `sweep launch` in a subprocess on the shared CIFAR-10 subset, then the Optuna
storage and the MLflow store are read back through their own APIs, and every trial's logged LR
curve is recomputed independently with torch's own scheduler classes (helpers.check_smoke_stores)."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest

from helpers import check_smoke_stores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, shared_cifar):
    folder = tmp_path_factory.mktemp("e2e")
    cmd = [sys.executable, "-m", "sweep.cli", "launch", "--study", "smoke", "--quiet",
           "--trials", "6", "--set", "train.epochs=3", "--data-dir", str(shared_cifar)]
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, proc


def test_summary_is_printed(smoke_run):
    _, proc = smoke_run
    assert "study 'smoke': 6/6 trials used" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in proc.stdout


def test_optuna_and_mlflow_agree(smoke_run):
    folder, _ = smoke_run
    check_smoke_stores(folder)


def test_relaunch_on_finished_study_runs_nothing(smoke_run, shared_cifar):
    folder, _ = smoke_run
    proc = subprocess.run([sys.executable, "-m", "sweep.cli", "launch", "--study", "smoke",
                           "--quiet", "--trials", "6", "--data-dir", str(shared_cifar),
                           "--set", "train.epochs=3"],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing to run" in proc.stdout
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{folder}/sweep.db")
    assert len(study.get_trials()) == 6
