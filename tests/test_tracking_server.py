"""Workers that log to an MLflow tracking server over HTTP, as cluster nodes do (issue 12, part 7).

A real ``mlflow server`` (``sweep.views.ui.mlflow_server``: its own SQLite backend, artifacts
served from a folder of its own, so clients upload them over HTTP) takes the runs of
``sweep launch --workers 2`` and of a SLURM array. Everything is read back over HTTP with
``MlflowClient``: one ended run per trial, per-step ``lr``/``train_loss`` curves, the per-epoch
metrics, ``lr_curve.png`` (also found in the server's own artifact folder); nothing is left
RUNNING after a worker is SIGKILLed mid-trial; ``status``, ``report`` and ``list`` work.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import (REPO, check_consistent, has_trials, plain_storage, submit_tiny_array,
                     sweep_cmd, sweep_env, trial_runs, wait_array_ended, wait_running)
from sweep.loop.budget import counted

SMOKE = REPO / "studies" / "smoke.yaml"
# The smoke study on the tiny synthetic data set: 4 steps per epoch, 4 epochs, so a worker
# killed after epoch 0 dies inside training.
SMALL = ("--set", "data.train_size=100", "--set", "data.val_size=40", "--set",
         "data.test_size=40", "--set", "train.batch_size=25", "--set", "train.epochs=4")
STEPS_PER_EPOCH, EPOCHS = 4, 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(URL, artifact folder) of a running MLflow tracking server, stopped after the module."""
    from sweep.views.ui import mlflow_server

    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    with mlflow_server(f"sqlite:///{root}/server.db",
                       artifacts_destination=str(artifacts)) as (_, url):
        yield url, artifacts


def launch_until_training(args: list[str], name: str, data: Path, tmp_path: Path):
    """Start ``sweep launch ARGS`` (Optuna in tmp_path/optuna.db) on the small smoke setting;
    return (the process, a trial of it mid-training)."""
    proc = subprocess.Popen(sweep_cmd("launch", *args, "--quiet", *SMALL), env=sweep_env(data),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 300
        # A reader opens the storage only once the launcher has created it (creation races).
        while time.time() < deadline and not has_trials(tmp_path / "optuna.db"):
            time.sleep(0.2)
        return proc, wait_running(plain_storage(f"sqlite:///{tmp_path}/optuna.db"), name,
                                   set(), deadline)
    except BaseException:
        proc.kill()
        raise


def _killed(trial) -> bool:
    """Failed because its worker died or was interrupted (its curves may stop anywhere)."""
    return trial.state == TrialState.FAIL


def check_runs_arrived(url: str, artifacts: Path, study: optuna.Study) -> None:
    """Every finished trial's run, curves and LR figure reached the server."""
    client = MlflowClient(url)
    runs = {int(r.data.tags["sweep.trial_number"]): r for r in trial_runs(url, study.study_name)}
    finished = [t for t in counted(study.get_trials(deepcopy=False)) if not _killed(t)]
    assert any(t.state == TrialState.COMPLETE for t in finished)
    for t in finished:
        run = runs[t.number]
        run_id = run.info.run_id
        assert t.user_attrs["mlflow_run_id"] == run_id
        lr = sorted(m.step for m in client.get_metric_history(run_id, "lr"))
        loss = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
        assert lr == list(range(len(lr))) and lr, (t.number, lr)  # every step, once
        artifact_files = [f.path for f in client.list_artifacts(run_id)]
        assert "lr_curve.png" in artifact_files, (t.number, artifact_files)
        on_server = list(artifacts.glob(f"*/{run_id}/artifacts/lr_curve.png"))
        assert len(on_server) == 1 and on_server[0].read_bytes()[:4] == b"\x89PNG"
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED"
            assert len(lr) == EPOCHS * STEPS_PER_EPOCH and loss == lr
            epochs = sorted(m.step for m in client.get_metric_history(run_id, "val_acc"))
            assert epochs == list(range(EPOCHS))
            assert run.data.metrics["test_acc"] == pytest.approx(t.user_attrs["test_acc"])
        else:
            assert run.info.status == "KILLED"  # pruned


@pytest.mark.slow
def test_two_workers_log_over_http_and_a_killed_worker_leaves_nothing_running(
        server, tiny_cifar, tmp_path):
    url, artifacts = server
    storage = f"sqlite:///{tmp_path}/optuna.db"
    budget = 6
    pool, killed = launch_until_training(
        ["--study", str(SMOKE), "--workers", "2", "--trials", str(budget), "--storage", storage,
         "--tracking-uri", url], "smoke", tiny_cifar, tmp_path)
    try:
        os.kill(killed.user_attrs["pid"], signal.SIGKILL)
        out, err = pool.communicate(timeout=400)
    finally:
        if pool.poll() is None:
            pool.kill()
    assert "1 of 2 workers failed" in out, out[-3000:] + err[-3000:]
    study = optuna.load_study(study_name="smoke", storage=plain_storage(storage))
    runs = trial_runs(url, "smoke")
    check_consistent(study, runs, budget)  # nothing RUNNING, one ended run per trial
    victim = next(r for r in runs if r.data.tags["sweep.trial_number"] == str(killed.number))
    assert victim.info.status == "FAILED"  # ended over HTTP by the surviving worker
    retry = [t for t in study.get_trials(deepcopy=False)
             if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state != TrialState.FAIL
    check_runs_arrived(url, artifacts, study)

    env = dict(sweep_env(tiny_cifar), MLFLOW_TRACKING_URI=url, SWEEP_STORAGE=storage)
    shown = subprocess.run(sweep_cmd("status", "--study", "smoke"), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"{budget}/{budget} trials used" in shown.stdout and "running 0" in shown.stdout
    assert "stale" not in shown.stdout

    reported = subprocess.run(sweep_cmd("report", "--study", "smoke", "-o", "rep"), env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stdout + reported.stderr
    assert (tmp_path / "rep" / "index.html").is_file()
    parent = MlflowClient(url).search_runs(
        [victim.info.experiment_id], "tags.`sweep.role` = 'study'")[0]
    uploaded = [f.path for f in MlflowClient(url).list_artifacts(parent.info.run_id, "report")]
    assert "report/index.html" in uploaded  # the report went to the server too

    listed = subprocess.run(sweep_cmd("list"), env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == ["smoke", str(len(study.trials))]
               for line in listed.stdout.splitlines()), listed.stdout


@pytest.mark.slow
def test_status_repair_ends_the_run_of_a_sigkilled_lone_worker_over_http(
        server, tiny_cifar, tmp_path):
    """No surviving worker to reconcile: ``sweep status`` shows the stale state and
    ``--repair`` fails the trial and ends its run on the server."""
    url, _ = server
    storage = f"sqlite:///{tmp_path}/optuna.db"
    name = "lone"
    study_file = tmp_path / "lone.yaml"
    study_file.write_text(SMOKE.read_text().replace("name: smoke", f"name: {name}", 1))
    worker, killed = launch_until_training(
        ["--study", str(study_file), "--trials", "2", "--storage", storage, "--tracking-uri", url],
        name, tiny_cifar, tmp_path)
    try:
        worker.kill()
        worker.wait(60)
    finally:
        if worker.poll() is None:
            worker.kill()
    client = MlflowClient(url)
    run_id = killed.user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"  # what SIGKILL leaves behind

    env = dict(sweep_env(tiny_cifar), MLFLOW_TRACKING_URI=url, SWEEP_STORAGE=storage)
    before = subprocess.run(sweep_cmd("status", "--study", name), env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert "running 1" in before.stdout and f"running #{killed.number}:" in before.stdout, \
        before.stdout + before.stderr
    repaired = subprocess.run(sweep_cmd("status", "--study", name, "--repair"), env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert repaired.returncode == 0, repaired.stderr
    assert f"failed 1 stale trial(s) [{killed.number}]" in repaired.stdout, repaired.stdout
    assert "ended 1 stale MLflow run(s)" in repaired.stdout, repaired.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["sweep.state"] == "FAIL"
    study = optuna.load_study(study_name=name, storage=plain_storage(storage))
    assert study.trials[killed.number].state == TrialState.FAIL
    again = subprocess.run(sweep_cmd("status", "--study", name), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert "running 0" in again.stdout and "stale" not in again.stdout, again.stdout


@pytest.mark.slow
def test_slurm_array_logs_to_the_tracking_server(server, postgres_server, slurm, tiny_cifar,
                                                 tmp_path):
    """The cluster set-up the README recommends: Optuna on PostgreSQL, MLflow behind a
    tracking server, two array tasks."""
    url, artifacts = server
    optuna_url, _ = postgres_server
    budget = 4
    job, _, env = submit_tiny_array(tiny_cifar, slurm, tmp_path, optuna_url, url, 2, budget,
                                    f"train.epochs={EPOCHS}", "data.train_size=100",
                                    "train.batch_size=25")
    wait_array_ended(job, env, time.time() + 400)
    outputs = "\n".join(p.read_text() for p in (tmp_path / "sweep-jobs").glob("*.out"))
    study = optuna.load_study(study_name="tiny", storage=plain_storage(optuna_url))
    check_consistent(study, trial_runs(url, "tiny"), budget)
    assert all(t.state == TrialState.COMPLETE for t in counted(study.trials)), outputs[-3000:]
    check_runs_arrived(url, artifacts, study)
    shown = subprocess.run(sweep_cmd("status", "--study", "tiny", "--storage", optuna_url,
                                     "--tracking-uri", url),
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"{budget}/{budget} trials used" in shown.stdout, \
        shown.stdout + shown.stderr
