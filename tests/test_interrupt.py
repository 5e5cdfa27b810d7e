"""Interruptions on real processes with real signals, a read-only MLflow store, and a
changed search space: nothing is lost, nothing stays RUNNING, nothing is silent."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import REPO

pytestmark = pytest.mark.slow

FAST_HEARTBEAT = {"SWEEP_HEARTBEAT_INTERVAL": "1", "SWEEP_GRACE_PERIOD": "3"}
SMALL = ["--set", "data.train_size=150", "--set", "data.val_size=50", "--set", "data.test_size=40",
         "--set", "train.batch_size=15"]


def launch_args(data: Path, *extra: str, study: str = "smoke") -> list[str]:
    return [sys.executable, "-m", "sweep.cli", "launch", "--study", study, "--quiet",
            "--data-dir", str(data), *SMALL, *extra]


def env(**extra) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO), **FAST_HEARTBEAT,
            **extra}


def run(args, folder, timeout=300):
    return subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=timeout, env=env())


def load(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="smoke", storage=f"sqlite:///{folder}/sweep.db")


def wait_for_running_trial(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until a trial is RUNNING and has finished an epoch (so it has curves to keep).

    Reads the SQLite file read-only: opening it with Optuna while the launch is still creating
    the tables would race the creation."""
    deadline = time.monotonic() + timeout
    query = ("SELECT count(*) FROM trials t JOIN trial_intermediate_values v "
             "ON v.trial_id = t.trial_id WHERE t.state = 'RUNNING'")
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with sqlite3.connect(f"file:{folder / 'sweep.db'}?mode=ro", uri=True) as conn:
                if conn.execute(query).fetchone()[0]:
                    return
        except sqlite3.OperationalError:
            pass  # not created yet
        time.sleep(0.3)
    raise AssertionError("no trial started training")


def mlflow_runs(folder: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    return client, client.search_runs([experiment.experiment_id], max_results=100)


def integrity_ok(db: Path) -> bool:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def start_long_trial(folder: Path, data: Path, trials: int, fuse: int = 1) -> subprocess.Popen:
    """A launch whose first trial trains for long (200 epochs), returned once it is training
    (with ``fuse`` > 1, its first ``fuse`` trials train together as one pack)."""
    proc = subprocess.Popen(launch_args(data, "--trials", str(trials), "--set", "train.epochs=200",
                                        "--set", f"train.fuse={fuse}"),
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    wait_for_running_trial(folder, proc)
    return proc


@pytest.mark.parametrize("fuse, signum", [(1, signal.SIGINT), (2, signal.SIGINT),
                                          (2, signal.SIGTERM)])
def test_ctrl_c_once_ends_trial_cleanly_and_it_is_retried(tmp_path, tiny_cifar, fuse, signum):
    """Unfused, and a fused pack of 2 (every live slot ends like the one trial)."""
    proc = start_long_trial(tmp_path, tiny_cifar, trials=3, fuse=fuse)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "interrupted" in out and "Traceback" not in err

    trials = load(tmp_path).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(failed) == fuse and all(t.user_attrs["error"] == "interrupted" for t in failed)
    assert sorted(str(t.params) for t in waiting) == sorted(str(t.params) for t in failed)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    client, runs = mlflow_runs(tmp_path)
    for trial in failed:
        (killed,) = [r for r in runs if r.info.run_id == trial.user_attrs["mlflow_run_id"]]
        assert killed.info.status == "KILLED" and killed.data.tags["sweep.state"] == "FAIL"
        assert client.get_metric_history(killed.info.run_id, "lr")  # curves kept
    assert all(r.info.status != "RUNNING" for r in runs)

    # The next launch runs the retries first; interrupted trials do not use up the budget.
    done = run(launch_args(tiny_cifar, "--trials", "3", "--set", "train.epochs=1",
                           "--set", f"train.fuse={fuse}",
                           "--allow-config-change"), tmp_path)  # 200 epochs -> 1, on purpose
    assert done.returncode == 0, done.stderr[-2000:]
    trials = load(tmp_path).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
    assert all(any(t.params == f.params for t in finished) for f in failed)
    assert "3/3 trials used" in done.stdout


@pytest.mark.parametrize("fuse", [1, 2])
def test_second_ctrl_c_exits_at_once_and_next_launch_reconciles(tmp_path, tiny_cifar, fuse):
    proc = start_long_trial(tmp_path, tiny_cifar, trials=fuse, fuse=fuse)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert integrity_ok(tmp_path / "sweep.db") and integrity_ok(tmp_path / "mlflow.db")
    load(tmp_path).get_trials()  # both stores still open and read

    time.sleep(4)  # past the grace period: the abandoned trials are stale
    done = run(launch_args(tiny_cifar, "--trials", str(fuse), "--set", "train.epochs=1",
                           "--set", f"train.fuse={fuse}",
                           "--allow-config-change"), tmp_path)  # 200 epochs -> 1, on purpose
    assert done.returncode == 0, done.stderr[-2000:]
    trials = load(tmp_path).get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == fuse
    _, runs = mlflow_runs(tmp_path)
    assert all(r.info.status != "RUNNING" for r in runs)


def test_sigkill_of_a_fused_worker_is_reconciled_by_the_next_launch(tmp_path, tiny_cifar):
    """kill -9 while a pack of 2 trains: the next launch fails both trials (stale heartbeats or
    the dead pid), ends their runs FAILED, runs their retries; the budget comes out exact."""
    proc = start_long_trial(tmp_path, tiny_cifar, trials=2, fuse=2)
    proc.kill()
    proc.communicate(timeout=60)
    done = run(launch_args(tiny_cifar, "--trials", "2", "--set", "train.epochs=1",
                           "--set", "train.fuse=2",
                           "--allow-config-change"), tmp_path)  # 200 epochs -> 1, on purpose
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2/2 trials used" in done.stdout
    trials = load(tmp_path).get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client, runs = mlflow_runs(tmp_path)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    dead = [t for t in trials if t.state == TrialState.FAIL]
    assert len(dead) == 2
    for t in dead:
        run_ = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run_.info.status == "FAILED" and run_.data.tags["sweep.state"] == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("retry_history")]
    assert sorted(str(t.params) for t in retried) == sorted(str(t.params) for t in dead)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in retried)


def test_read_only_mlflow_store_fails_trials_loudly(tmp_path, tiny_cifar):
    first = run(launch_args(tiny_cifar, "--trials", "1", "--set", "train.epochs=1"), tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    read_only = f"sqlite:///file:{tmp_path}/mlflow.db?mode=ro&uri=true"
    second = run(launch_args(tiny_cifar, "--trials", "3", "--set", "train.epochs=1",
                             "--tracking-uri", read_only), tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "trial 1 failed: could not start the trial's MLflow run" in second.stderr
    assert "readonly database" in second.stderr
    trials = load(tmp_path).get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 2 and all("readonly" in t.user_attrs["error"] for t in failed)


def test_changed_search_space_is_refused_unless_allowed(tmp_path, tiny_cifar):
    first = run(launch_args(tiny_cifar, "--trials", "1", "--set", "train.epochs=1"), tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    original = (Path(__file__).resolve().parent.parent / "studies" / "smoke.yaml").read_text()
    changed = tmp_path / "smoke_changed.yaml"
    changed.write_text(original.replace("high: 0.5, log: true", "high: 0.9, log: true"))
    assert changed.read_text() != original
    refused = run(launch_args(tiny_cifar, "--trials", "2", "--set", "train.epochs=1",
                              study=str(changed)), tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("error: study 'smoke' was created with another search space")
    assert len(load(tmp_path).get_trials()) == 1

    allowed = run(launch_args(tiny_cifar, "--trials", "2", "--set", "train.epochs=1",
                              "--allow-space-change", study=str(changed)), tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    study = load(tmp_path)
    assert len(study.get_trials()) == 2 and len(study.user_attrs["sweep.space_changes"]) == 1
