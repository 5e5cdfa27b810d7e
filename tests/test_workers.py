"""Several local `sweep worker` processes on one study: nothing lost, nothing duplicated, and
workers killed mid-trial (SIGKILL, SIGTERM) leave no RUNNING trial or run behind.

Real processes, real SQLite / journal files, real MLflow SQLite stores, real (tiny) training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import optuna
import pytest
from optuna.trial import TrialState

from helpers import (TINY, check_consistent, has_trials, plain_storage, sweep_cmd, sweep_env,
                     trial_runs, wait_running)
from sweep.loop.budget import OVER_BUDGET, counted


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
        while time.time() < deadline and not has_trials(tmp_path / "optuna.db"):
            time.sleep(0.2)
        reader = plain_storage(storage)
        killed = wait_running(reader, "tiny", set(), deadline)
        os.kill(killed.user_attrs["pid"], signal.SIGKILL)
        termed = wait_running(reader, "tiny", {killed.number}, deadline)
        while termed.user_attrs["pid"] == killed.user_attrs["pid"]:
            termed = wait_running(reader, "tiny", {killed.number, termed.number}, deadline)
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
