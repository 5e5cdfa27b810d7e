"""The real thing: `sweep launch` in a subprocess on the shared CIFAR-10 subset, then the Optuna
storage and the MLflow store are read back through their own APIs, and every trial's logged LR
curve is recomputed independently with torch's own scheduler classes."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow


def torch_reference(params: dict, steps_per_epoch: int, total: int, val_losses: list[float],
                    start_factor: float = 0.01) -> list[float]:
    """LR of every step from torch's classes: LinearLR warmup, then the main scheduler on a
    fresh optimizer (SequentialLR semantics), plateau fed after warmup only."""
    S, W, base = steps_per_epoch, int(params["warmup_steps"]), float(params["base_lr"])
    start_factor = float(params.get("warmup_start_factor", start_factor))
    lrs: list[float] = []
    if W:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=start_factor, total_iters=W)
        for _ in range(W):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            warm.step()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    name = params["scheduler"]
    if name == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, int(params["step_size_epochs"]) * S,
                                                float(params["gamma"]))
    elif name == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - W, eta_min=0.0)
    elif name == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=float(params["gamma"]), patience=int(params["patience_epochs"]))
    else:
        raise AssertionError(f"no reference for {name}")
    for t in range(W, total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if name != "plateau":
            sched.step()
        elif (t + 1) % S == 0:
            epoch = (t + 1) // S - 1
            if (epoch + 1) * S >= W and epoch < len(val_losses):
                sched.step(val_losses[epoch])
    return lrs


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


def check_smoke_stores(folder, n_trials: int = 6, epochs: int = 3) -> dict:
    """Optuna and MLflow agree on every trial of a smoke launch, and every logged LR curve equals
    torch's; returns the trial runs by trial number (the fused test checks their tags too)."""
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{folder}/sweep.db")
    trials = study.get_trials()
    assert len(trials) == n_trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert any(t.state == TrialState.COMPLETE for t in trials)

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    children = {r.info.run_id: r for r in runs if r.data.tags.get("sweep.role") == "trial"}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n_trials
    assert all(r.info.status != "RUNNING" for r in runs)

    steps_per_epoch = 1000 // 100
    for trial in trials:
        run = children[trial.user_attrs["mlflow_run_id"]]
        tags, params = run.data.tags, run.data.params
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["sweep.trial_number"] == str(trial.number)
        assert tags["optuna.study_name"] == "smoke"
        assert tags["sweep.state"] == trial.state.name
        expected_status = "FINISHED" if trial.state == TrialState.COMPLETE else "KILLED"
        assert run.info.status == expected_status
        for key in ("warmup_steps", "base_lr", "scheduler", "model", "epochs", "batch_size",
                    "steps_per_epoch", "train_size", "val_size", "optimizer", "momentum",
                    "weight_decay", "warmup_start_factor", "seed", "device"):
            assert key in params, key
        assert params["steps_per_epoch"] == str(steps_per_epoch)
        for key, value in trial.params.items():
            assert params[key] == str(value)

        val_acc = client.get_metric_history(run.info.run_id, "val_acc")
        assert {m.step: m.value for m in val_acc} == trial.intermediate_values
        val_loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"),
                                            key=lambda m: m.step)]
        lr = sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
        epochs_run = len(val_acc)
        assert [m.step for m in lr] == list(range(epochs_run * steps_per_epoch))
        reference = torch_reference(params, steps_per_epoch, epochs * steps_per_epoch, val_loss)
        for logged, ref in zip(lr, reference):
            assert math.isclose(logged.value, ref, rel_tol=1e-9), (trial.params, logged.step)
        losses = client.get_metric_history(run.info.run_id, "train_loss")
        assert len(losses) == len(lr) and all(math.isfinite(m.value) for m in losses)
        if trial.state == TrialState.COMPLETE:
            assert trial.user_attrs["test_acc"] == run.data.metrics["test_acc"]
            assert epochs_run == epochs and "epoch_seconds" in run.data.metrics
            assert "lr_curve.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
        else:
            assert trial.user_attrs["prune_reason"] in ("pruner", "diverged")
            assert tags["sweep.prune_reason"] == trial.user_attrs["prune_reason"]
    return {int(r.data.tags["sweep.trial_number"]): r for r in children.values()}


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
