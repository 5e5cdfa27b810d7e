"""`sweep submit` on a real single-node SLURM 22.05 cluster against a real PostgreSQL 15, both
started by conftest's fixtures on 127.0.0.1 (scripts/start_postgres.sh,
scripts/start_test_cluster.sh; .ci/run installs `postgresql munge slurm-wlm`).

One array task is cancelled with `scancel` mid-trial, as a user or a preemption would; the study
must still use its budget exactly, with unique trials and one ended MLflow run per trial.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers import (PG_PASSWORD, check_consistent, in_training, submit_tiny_array, sweep_cmd,
                     trial_runs, wait_array_ended)

def _slurm_job_of(pid: int) -> str | None:
    """The array task (``JOB_TASK``) a worker process runs in, from its environment (we are
    root). Not SLURM_JOB_ID: slurmctld 22.05 answers "invalid job id" to scancel of that."""
    try:
        environ = dict(item.split(b"=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    except OSError:
        return None
    job, task = environ.get(b"SLURM_ARRAY_JOB_ID"), environ.get(b"SLURM_ARRAY_TASK_ID")
    return f"{job.decode()}_{task.decode()}" if job and task else None


@pytest.mark.slow
def test_submit_array_on_postgres(postgres_server, slurm, tiny_cifar, tmp_path):
    optuna_url, mlflow_url = postgres_server
    budget = 6
    job, said, env = submit_tiny_array(tiny_cifar, slurm, tmp_path, optuna_url, mlflow_url, 3,
                                       budget, "train.epochs=4")
    assert PG_PASSWORD not in said
    script = (tmp_path / "sweep-jobs" / "sweep-tiny.sbatch").read_text()
    [env_file] = (tmp_path / "sweep-jobs").glob("sweep-tiny.*.env")
    assert PG_PASSWORD not in script and "--array=0-2" in script and "--signal=B:TERM@60" in script
    assert PG_PASSWORD in env_file.read_text() and env_file.stat().st_mode & 0o077 == 0

    # scancel one array task while it runs a trial (not a retry: those are not retried again).
    storage = optuna.storages.RDBStorage(optuna_url)
    study = optuna.load_study(study_name="tiny", storage=storage)
    deadline, victim = time.time() + 200, None
    while victim is None and time.time() < deadline:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            task_job = _slurm_job_of(t.user_attrs["pid"]) if in_training(t) else None
            if task_job and not t.system_attrs.get("retry_history"):
                victim = t
                subprocess.run(["scancel", task_job], env=env, check=True, timeout=60)
                break
        time.sleep(0.05)
    assert victim is not None, "no trial ever ran"

    wait_array_ended(job, env, deadline)
    outputs = "\n".join(p.read_text() for p in (tmp_path / "sweep-jobs").glob("*.out"))
    assert "interrupted" in outputs, outputs[-3000:]
    assert PG_PASSWORD not in outputs

    study = optuna.load_study(study_name="tiny", storage=optuna.storages.RDBStorage(optuna_url))
    runs = trial_runs(mlflow_url, "tiny")
    check_consistent(study, runs, budget)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[victim.number].state == TrialState.FAIL
    run = next(r for r in runs if r.data.tags["sweep.trial_number"] == str(victim.number))
    assert run.info.status == "KILLED" and run.data.tags["sweep.state"] == "FAIL"
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE

    # `sweep status` reads the same study: all used, nothing running, no stale run.
    shown = subprocess.run(sweep_cmd("status", "--study", "tiny", "--storage", optuna_url,
                                     "--tracking-uri", mlflow_url),
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"{budget}/{budget} trials used" in shown.stdout and "running 0" in shown.stdout
    assert "stale" not in shown.stdout and PG_PASSWORD not in shown.stdout
