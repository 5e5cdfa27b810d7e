"""Reconciliation and `sweep status` on real stores (SQLite, journal file, MLflow SQLite), and
`sweep submit` validation / --dry-run (no SLURM needed). In-process and quick."""

from __future__ import annotations

import os
import re
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
from sweep.commands.launch import LaunchOptions
from sweep.commands.pool import PoolOptions, device_assignments, worker_environments
from sweep.study.spec import load_study
from sweep.loop.budget import budget_used, resolve_budget
from sweep.loop.reconcile import fail_dead_trials, reconcile_study, stale_runs
from sweep.stores.retry import retry_later
from sweep.commands.status import status_text
from sweep.stores.storage import open_storage
from sweep.record import Tracker
from sweep.loop.study import open_study

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
    return trial, run.run_id  # never finished: the worker "died", its run stays RUNNING


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

    # Reconcile until trial 0's heartbeat is older than the 1 s grace period (the finished
    # trial's run is ended by the first call already).
    failed, ended, deadline = [], [], time.monotonic() + 60
    while not failed and time.monotonic() < deadline:
        fixed = reconcile_study(study, tracker, experiment_id)
        failed, ended = failed + fixed.failed_trials, ended + fixed.ended_runs
        time.sleep(0.1)
    assert failed == [0] and sorted(ended) == sorted([dead_run, done_run])
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].params == trials[0].params
    for run_id, state in ((dead_run, "FAIL"), (done_run, "PRUNED")):
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags["sweep.state"] == state
    assert stale_runs(study, tracker, experiment_id) == []
    assert reconcile_study(study, tracker, experiment_id).ended_runs == []  # idempotent

    # The CLI shows the same, masked and repaired state. The PRUNED trial's run ended without
    # a count: nothing retries a PRUNED trial, so its points may be lost -> exit 3, named.
    result = CliRunner().invoke(main, ["status", "--study", "tiny", "--storage", storage_url,
                                       "--tracking-uri", tracking_uri, "--repair"])
    assert result.exit_code == 3, result.output
    assert "running 0, waiting 1" in result.output and "still RUNNING" not in result.output
    assert f"MLflow: PRUNED trial #1 run {done_run} holds only 0 point(s)" in result.output


def test_a_trial_re_enqueued_before_its_worker_vanished_gets_no_second_retry(spec, tmp_path,
                                                                             monkeypatch):
    """An interrupted worker enqueues its trial's retry, then tells FAIL; a second Ctrl-C (or a
    kill) in between leaves the trial RUNNING with its retry queued. The next reconcile fails
    it, by stale heartbeat or dead pid, and enqueues nothing more: one retry each, and the
    failed originals do not use the budget."""
    monkeypatch.setenv("SWEEP_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("SWEEP_GRACE_PERIOD", "1")
    study = open_study(spec, open_storage(f"sqlite:///{tmp_path}/o.db"))
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db")
    experiment_id = tracker.experiment_id(spec.name)
    parent = tracker.study_run(experiment_id, spec.name, {}, None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale, _ = _running_trial(study, tracker, experiment_id, parent, "node-17", 4242)
    study._storage.record_heartbeat(stale._trial_id)
    dead, _ = _running_trial(study, tracker, experiment_id, parent, socket.gethostname(), gone.pid)
    for trial in (stale, dead):
        retry_later(study, study._storage.get_trial(trial._trial_id))
    failed, deadline = [], time.monotonic() + 60
    while len(failed) < 2 and time.monotonic() < deadline:
        failed += reconcile_study(study, tracker, experiment_id).failed_trials
        time.sleep(0.1)
    assert sorted(failed) == [0, 1]
    trials = study.get_trials(deepcopy=False)
    retries = [t.system_attrs.get("failed_trial") for t in trials if t.state == TrialState.WAITING]
    assert sorted(retries) == [0, 1] and len(trials) == 4
    assert budget_used(study) == 0


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


def _pool_envs(workers: int, per_device: int, gpus: int, on_cpu: bool) -> list[dict]:
    opts = LaunchOptions("postgresql://u:pw@db/optuna", "http://mlflow:5000", None)
    return worker_environments(opts, PoolOptions(workers, per_device), gpus, on_cpu)


def test_pool_gives_each_worker_its_gpu_and_the_urls(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # what the parent saw
    envs = _pool_envs(4, 2, 2, on_cpu=False)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "0", "1", "1"]
    for env in envs:  # URLs in the environment, never on the command line
        assert env["SWEEP_STORAGE"] == "postgresql://u:pw@db/optuna"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_pool_splits_the_cpu_cores_between_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = os.cpu_count() or 1
    for workers in (1, 2, cores, cores + 3):
        threads = [int(e["OMP_NUM_THREADS"]) for e in _pool_envs(workers, 1, 0, on_cpu=True)]
        assert len(threads) == workers and min(threads) >= 1
        assert sum(threads) <= max(cores, workers)  # never more threads than cores (but >= 1 each)
        assert max(threads) - min(threads) == 0 and sum(threads) > cores - workers  # an even split
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice is left alone
    assert [e["OMP_NUM_THREADS"] for e in _pool_envs(2, 1, 0, on_cpu=True)] == ["3", "3"]


def test_submit_dry_run_prints_script_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = "postgresql://sweep:s3cret@db.example:5432/optuna"
    result = CliRunner().invoke(main, [
        "submit", "--study", str(TINY), "--array", "8", "--storage", url,
        "--tracking-uri", "sqlite:///mlflow.db", "--partition", "gpu",
        "--gpus-per-task", "1", "--time", "04:00:00", "--cpus-per-task", "4", "--dry-run",
        "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    out = result.output
    for line in ("#SBATCH --array=0-7", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --time=04:00:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --signal=B:TERM@60", "exec ", " worker --study ", "--set train.epochs=2"):
        assert line in out
    assert "s3cret" not in out and re.search(r"sweep-tiny\.\d{8}-\d{6}-[0-9a-f]{6}\.env", out)
    assert list(tmp_path.iterdir()) == []


def test_relative_data_dir_reaches_the_tasks_absolute(tmp_path, monkeypatch):
    """A relative --data-dir (or SWEEP_DATA_DIR) means: relative to where sweep was run; the
    array tasks start elsewhere, so the script must carry it absolute."""
    monkeypatch.chdir(tmp_path)
    for args, env in ((["--data-dir", "data/cifar"], {}), ([], {"SWEEP_DATA_DIR": "data/cifar"})):
        result = CliRunner().invoke(main, ["submit", "--study", str(TINY), "--array", "1",
                                           "--dry-run", *args], env=env)
        assert result.exit_code == 0, result.output
        assert f"--data-dir {tmp_path / 'data' / 'cifar'}" in result.output


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


def test_counting_trials_does_not_load_torch():
    """`sweep status`, `report` and the console count trials through loop.budget, which is below
    the worker: none of them may pull in torch (seconds of import for a few queries)."""
    code = ("import sys; import sweep.commands.status, sweep.views.report, "
            "sweep.views.console; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr
