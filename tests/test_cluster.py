"""`sweep submit` on a real single-node SLURM 22.05 cluster against a real PostgreSQL 15, both
started by these fixtures on 127.0.0.1 (scripts/start_postgres.sh, scripts/start_test_cluster.sh;
.ci/run installs `postgresql munge slurm-wlm`).

One array task is cancelled with `scancel` mid-trial, as a user or a preemption would; the study
must still use its budget exactly, with unique trials and one ended MLflow run per trial.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from test_workers import TINY, check_consistent, in_training, sweep_cmd, sweep_env, trial_runs

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PASSWORD = "sweep-test-pw"  # the test server's role `sweep`; never printed by sweep itself


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    """(optuna URL, mlflow URL) of a fresh PostgreSQL server; stopped after the session."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.skip("PostgreSQL server binaries absent (apt-get install postgresql)")
    if os.geteuid() != 0:
        pytest.skip("the test PostgreSQL is started as the postgres user, which needs root")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's driver for postgresql://)
    except ImportError:
        pytest.skip("no PostgreSQL driver: pip install -e '.[postgres]'")
    done = subprocess.run([str(SCRIPTS / "start_postgres.sh"), "start", str(_free_port()),
                           PASSWORD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    folder, optuna_url, mlflow_url = done.stdout.split()
    yield optuna_url, mlflow_url
    subprocess.run([str(SCRIPTS / "start_postgres.sh"), "stop", folder], timeout=60)


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


def wait_array_ended(job: str, env: dict, deadline: float) -> None:
    """Return once every task of array ``job`` has ended (squeue lists the array until then)."""
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], env=env,
                                capture_output=True, text=True, timeout=60).stdout.strip()
        if not queued:
            return
        time.sleep(1)
    pytest.fail(f"array {job} still queued: {queued}")


@pytest.mark.slow
def test_submit_array_on_postgres(postgres, slurm, tiny_cifar, tmp_path):
    optuna_url, mlflow_url = postgres
    env = dict(sweep_env(tiny_cifar), SLURM_CONF=slurm)
    budget = 6
    done = subprocess.run(
        sweep_cmd("submit", "--study", str(TINY), "--array", "3", "--trials", str(budget),
                  "--storage", optuna_url, "--tracking-uri", mlflow_url, "--cpus-per-task", "1",
                  "--time", "00:10:00", "--data-dir", str(tiny_cifar), "--set", "train.epochs=4"),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    job = done.stdout.split("submitted job ", 1)[1].split(":")[0]
    script = (tmp_path / "sweep-jobs" / "sweep-tiny.sbatch").read_text()
    env_file = tmp_path / "sweep-jobs" / "sweep-tiny.env"
    assert PASSWORD not in script and "--array=0-2" in script and "--signal=B:TERM@60" in script
    assert PASSWORD in env_file.read_text() and env_file.stat().st_mode & 0o077 == 0

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
    assert PASSWORD not in outputs

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
    assert "stale" not in shown.stdout and PASSWORD not in shown.stdout
