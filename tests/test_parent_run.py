"""The study's parent MLflow run tells how the study went (issue 12, part 6): after `sweep launch`
and after `sweep worker`, its duration spans the trials and its metrics/tags carry the best value,
the counts and the budget. The expected figures are computed here from Optuna's own API."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

TINY = ["--set", "data.train_size=200", "--set", "data.val_size=100", "--set", "data.test_size=100"]


def sweep(folder, *args):
    proc = subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=folder,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def expected(folder) -> dict:
    """Best value, counts and the trials' span, straight from the Optuna storage."""
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{folder}/sweep.db")
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    out = {"trials_complete": sum(t.state == TrialState.COMPLETE for t in trials),
           "trials_diverged": sum(t.user_attrs.get("prune_reason") == "diverged" for t in pruned),
           "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
           "trials_used": sum(t.state != TrialState.RUNNING for t in trials),
           "budget": study.user_attrs["sweep.budget"]}
    out["trials_pruned"] = len(pruned) - out["trials_diverged"]
    if out["trials_complete"]:
        out["best_value"] = study.best_value
    span = (min(t.datetime_start for t in trials), max(t.datetime_complete for t in trials))
    return out, [int(x.timestamp() * 1000) for x in span], study


def parent(folder):
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], "tags.`sweep.role` = 'study'")
    assert len(runs) == 1
    return client, runs[0]


def check(folder, used: int):
    want, (first_start, last_end), study = expected(folder)
    assert want["trials_used"] == used
    client, run = parent(folder)
    info = run.info
    assert info.status == "FINISHED"
    assert info.end_time - info.start_time > 0
    # the parent spans every trial: created before the first, ended with the last
    assert info.start_time <= first_start + 1 and info.end_time >= last_end - 1
    assert info.end_time - info.start_time >= last_end - first_start - 2
    metrics = run.data.metrics
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value), key
    assert run.data.tags["sweep.budget"] == str(want["budget"])
    assert run.data.tags["sweep.trials_complete"] == str(want["trials_complete"])
    if want["trials_complete"]:
        assert run.data.tags["sweep.best_trial"] == str(study.best_trial.number)
    history = client.get_metric_history(info.run_id, "trials_used")
    return info, history


def test_the_parent_run_spans_and_summarises_the_study(tmp_path, shared_cifar):
    data = ["--data-dir", str(shared_cifar), "--quiet"]
    sweep(tmp_path, "launch", "--study", "smoke", "--trials", "3", *TINY, *data)
    first, history = check(tmp_path, used=3)
    assert [m.value for m in history] == [3]

    # a worker raising the budget brings the same run up to date
    sweep(tmp_path, "worker", "--study", "smoke", "--trials", "4", *TINY, *data)
    second, history = check(tmp_path, used=4)
    assert second.run_id == first.run_id and second.start_time == first.start_time
    assert second.end_time > first.end_time
    assert sorted(m.value for m in history) == [3, 4]

    # status --repair rewrites it from the stores (nothing changed: same figures)
    sweep(tmp_path, "status", "--study", "smoke", "--repair")
    check(tmp_path, used=4)
