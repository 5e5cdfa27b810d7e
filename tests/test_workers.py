"""Several local `sweep worker` processes on one study: nothing lost, nothing duplicated, and
workers killed mid-trial (SIGKILL, SIGTERM) leave no RUNNING trial or run behind.

Real processes, real SQLite / journal files, real MLflow SQLite stores, real (tiny) training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweep.orchestration.bookkeeping import OVER_BUDGET, budget_used, counted

TINY = Path(__file__).resolve().parent / "studies" / "tiny.yaml"
REPO = Path(__file__).resolve().parent.parent


def sweep_env(data_dir: Path) -> dict:
    return dict(os.environ, SWEEP_DATA_DIR=str(data_dir), SWEEP_HEARTBEAT_INTERVAL="1",
                SWEEP_GRACE_PERIOD="3", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sweep.cli", *args]


def plain_storage(url: str):
    """The study's storage opened without heartbeats (a reader, like `sweep status`)."""
    if url.startswith("journal:///"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url[len("journal://"):]))
    return optuna.storages.RDBStorage(url)


def trial_runs(tracking_uri: str, study_name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    return client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'trial'",
                              max_results=1000)


def check_consistent(study: optuna.Study, runs: list, budget: int) -> None:
    """The budget is met exactly; nothing RUNNING; each trial has exactly one ended run."""
    trials = study.get_trials(deepcopy=False)
    assert budget_used(study) == budget
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    per_trial = Counter(int(r.data.tags["sweep.trial_number"]) for r in runs)
    assert max(per_trial.values()) == 1, f"a trial has several runs: {per_trial}"
    numbers = [t.number for t in counted(trials)]
    missing = [n for n in numbers if per_trial.get(n) != 1]
    assert not missing, f"finished trials without an MLflow run: {missing}"
    by_number = {int(r.data.tags["sweep.trial_number"]): r for r in runs}
    for t in counted(trials):
        expected = {TrialState.COMPLETE: "COMPLETE", TrialState.FAIL: "FAIL",
                    TrialState.PRUNED: "PRUNED"}[t.state]
        assert by_number[t.number].data.tags["sweep.state"] == expected


@pytest.mark.slow
def test_four_workers_on_a_journal_file_complete_twenty_trials(tiny_cifar, tmp_path):
    storage, tracking = f"journal:///{tmp_path}/optuna.log", f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(
        sweep_cmd("launch", "--study", str(TINY), "--workers", "4", "--trials", "20",
                  "--storage", storage, "--tracking-uri", tracking, "--quiet"),
        env=sweep_env(tiny_cifar), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=plain_storage(storage))
    real = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(OVER_BUDGET)]
    assert len(real) == 20 and all(t.state == TrialState.COMPLETE for t in real)
    # Several workers ran them (each records its pid), and none proposed another's parameters
    # (same-seeded samplers in lockstep would).
    assert len({t.user_attrs["pid"] for t in real}) >= 2
    assert len({tuple(sorted(t.params.items())) for t in real}) == 20
    check_consistent(study, trial_runs(tracking, "tiny"), 20)
    assert "20/20 trials used" in done.stdout


def _has_trials(path: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM trials").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def in_training(t) -> bool:
    """Running, its worker's pid recorded, and mid-training: it has reported its first epoch
    and (the tests train 4 epochs) has three more to go, so a signal lands inside training."""
    return (t.state == TrialState.RUNNING and bool(t.user_attrs.get("pid"))
            and len(t.intermediate_values) == 1)


def _wait_running(storage, study_name: str, exclude: set[int], deadline: float):
    """A trial ``in_training`` not in ``exclude``."""
    while True:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
            break
        except KeyError:  # the launcher has not created it yet
            assert time.time() < deadline, "the study was never created"
            time.sleep(0.2)
    while time.time() < deadline:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # A retry is not retried again (once is enough): pick originals only.
            if in_training(t) and t.number not in exclude \
                    and not t.system_attrs.get("retry_history"):
                return t
        time.sleep(0.05)
    raise AssertionError("no running trial appeared")


@pytest.mark.slow
def test_four_workers_on_sqlite_lose_nothing_when_two_are_killed(tiny_cifar, tmp_path):
    """4 workers, 20 trials; one worker SIGKILLed (node loss) and one SIGTERMed (scancel)
    mid-trial. The other two finish the budget, nothing is lost or duplicated, the killed
    trials end FAIL and are retried once, their runs end FAILED (SIGKILL: repaired by a
    survivor) and KILLED (SIGTERM: by the worker itself); no "database is locked"."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    budget = 20
    pool = subprocess.Popen(
        sweep_cmd("launch", "--study", str(TINY), "--workers", "4", "--trials", str(budget),
                  "--storage", storage, "--tracking-uri", tracking, "--quiet",
                  "--set", "train.epochs=4"),
        env=sweep_env(tiny_cifar), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.time() + 240
        # Open a reader only once a worker has asked a trial: a second process creating the
        # schema while the launcher does would race (that is why the launcher creates first).
        while time.time() < deadline and not _has_trials(tmp_path / "optuna.db"):
            time.sleep(0.2)
        reader = plain_storage(storage)
        killed = _wait_running(reader, "tiny", set(), deadline)
        os.kill(killed.user_attrs["pid"], signal.SIGKILL)
        termed = _wait_running(reader, "tiny", {killed.number}, deadline)
        while termed.user_attrs["pid"] == killed.user_attrs["pid"]:
            termed = _wait_running(reader, "tiny", {killed.number, termed.number}, deadline)
        os.kill(termed.user_attrs["pid"], signal.SIGTERM)
        out, err = pool.communicate(timeout=300)
    finally:
        if pool.poll() is None:
            pool.kill()
    assert "2 of 4 workers failed" in out, out + err[-3000:]
    assert "database is locked" not in err
    study = optuna.load_study(study_name="tiny", storage=plain_storage(storage))
    runs = trial_runs(tracking, "tiny")
    check_consistent(study, runs, budget)
    assert len({tuple(sorted(t.params.items())) for t in counted(study.trials)}) == budget
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    run_of = {int(r.data.tags["sweep.trial_number"]): r for r in runs}
    for victim, status in ((killed.number, "FAILED"), (termed.number, "KILLED")):
        assert trials[victim].state == TrialState.FAIL
        assert run_of[victim].info.status == status
        assert run_of[victim].data.tags["sweep.state"] == "FAIL"
        retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, \
            (victim, [(t.number, t.state.name, t.system_attrs, t.user_attrs.get("pid"))
                      for t in trials.values()], out)
        assert retries[0].params == trials[victim].params
