"""Reconciliation and `sweep status` on real stores (SQLite, journal file, MLflow SQLite), and
`sweep submit` validation / --dry-run (no SLURM needed). In-process and quick."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from sweep.cli import main
from sweep.orchestration.pool import device_assignments
from sweep.study.spec import load_study
from sweep.orchestration.bookkeeping import fail_dead_trials, reconcile, resolve_budget, stale_runs
from sweep.orchestration.status import status_text
from sweep.orchestration.storage import open_storage
from sweep.orchestration.tracking import Tracker
from sweep.orchestration.worker import open_study

TINY = Path(__file__).resolve().parent / "studies" / "tiny.yaml"


@pytest.fixture(scope="module")
def spec():
    return load_study(TINY)


def _running_trial(study, tracker, experiment_id, parent, host: str, pid: int):
    """A trial as a worker leaves it mid-training: RUNNING, host/pid recorded, run RUNNING."""
    trial = study.ask()
    trial.suggest_float("base_lr", 0.01, 0.5, log=True)
    trial.set_user_attr("host", host)
    trial.set_user_attr("pid", pid)
    run = tracker.start_trial(experiment_id, parent, study.study_name, trial.number,
                              params=trial.params, tags={})
    run._queue.put(None)  # stop its logging thread but leave the run RUNNING: the worker "died"
    run._thread.join()
    return trial, run.run_id


def test_stale_heartbeat_trial_failed_retried_and_run_ended(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("SWEEP_GRACE_PERIOD", "1")
    storage_url, tracking_uri = f"sqlite:///{tmp_path}/o.db", f"sqlite:///{tmp_path}/m.db"
    study = open_study(spec, open_storage(storage_url))
    study.set_user_attr("sweep.budget", 5)
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.experiment_id(spec.name)
    parent = tracker.study_run(experiment_id, spec.name, {}, None)
    # Trial 0: on another host (no pid check possible), heartbeat stops -> stale after grace.
    dead, dead_run = _running_trial(study, tracker, experiment_id, parent, "node-17", 4242)
    study._storage.record_heartbeat(dead._trial_id)
    # Trial 1: finished in Optuna, but its worker died before ending the MLflow run.
    done, done_run = _running_trial(study, tracker, experiment_id, parent, "node-18", 4343)
    study.tell(done, state=TrialState.PRUNED)

    text = status_text(study, tracker, experiment_id)
    assert "1/5 trials used" in text and "running 1" in text
    assert "running #0: host node-17 pid 4242, heartbeat" in text
    assert f"stale MLflow run {done_run}" in text and dead_run not in text

    time.sleep(2.2)  # past the 1 s grace period
    fixed = reconcile(study, tracker, experiment_id)
    assert fixed.failed_trials == [0] and set(fixed.ended_runs) == {dead_run, done_run}
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].params == trials[0].params
    for run_id, state in ((dead_run, "FAIL"), (done_run, "PRUNED")):
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags["sweep.state"] == state
    assert stale_runs(study, tracker, experiment_id) == []
    assert reconcile(study, tracker, experiment_id).ended_runs == []  # idempotent

    # The CLI shows the same, masked and repaired state.
    result = CliRunner().invoke(main, ["status", "--study", "tiny", "--storage", storage_url,
                                       "--tracking-uri", tracking_uri, "--repair"])
    assert result.exit_code == 0, result.output
    assert "running 0, waiting 1" in result.output and "still RUNNING" not in result.output


def test_dead_local_worker_is_failed_at_once_on_journal(spec, tmp_path):
    """The journal storage keeps no heartbeats: a trial whose worker pid on this host is gone
    is failed (and re-enqueued) without waiting."""
    study = open_study(spec, open_storage(f"journal:///{tmp_path}/o.log"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    trial = study.ask()
    trial.suggest_float("base_lr", 0.01, 0.5, log=True)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", gone.pid)
    alive = study.ask()
    alive.set_user_attr("host", socket.gethostname())
    alive.set_user_attr("pid", os.getpid())  # this very process: alive
    assert fail_dead_trials(study) == [trial.number]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[trial.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    assert list(states.values()).count(TrialState.WAITING) == 1


def test_budget_comes_from_flag_then_study_then_file(spec, tmp_path):
    study = open_study(spec, open_storage(f"journal:///{tmp_path}/o.log"))
    assert resolve_budget(study, spec, None) == spec.trials
    assert resolve_budget(study, spec, 7) == 7
    assert resolve_budget(study, spec, None) == 7  # a later worker without --trials agrees
    assert optuna.load_study(study_name="tiny", storage=study._storage).user_attrs["sweep.budget"] == 7


def test_device_assignments():
    assert device_assignments(3, 1, 0) == [None, None, None]
    assert device_assignments(4, 2, 2) == ["0", "0", "1", "1"]
    assert device_assignments(5, 1, 2) == ["0", "1", "0", "1", "0"]


def test_submit_dry_run_prints_script_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = "postgresql://sweep:s3cret@db.example:5432/optuna"
    result = CliRunner().invoke(main, [
        "submit", "--study", str(TINY), "--array", "8", "--storage", url,
        "--tracking-uri", "http://mlflow.example:5000", "--partition", "gpu",
        "--gpus-per-task", "1", "--time", "04:00:00", "--cpus-per-task", "4", "--dry-run",
        "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    out = result.output
    for line in ("#SBATCH --array=0-7", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --time=04:00:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --signal=B:TERM@60", "exec ", " worker --study ", "--set train.epochs=2"):
        assert line in out
    assert "s3cret" not in out and "sweep-tiny.env" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--array", "0"], "--array 0"),
    (["--array", "2", "--time", "4h"], "--time '4h'"),
    (["--array", "2", "--partition", "a b"], "--partition"),
])
def test_submit_rejects_bad_flags_in_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["submit", "--study", str(TINY), "--dry-run", *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []
