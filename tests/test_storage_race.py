"""Several worker processes popping enqueued trials from one storage: each trial goes to exactly
one of them. Enqueued trials are a dead worker's retry and every confirmation replicate; on
SQLite, Optuna's check-and-set of a trial's state was not atomic between processes, and the
same retry was trained by two workers (a CI failure: one of them then crashed telling it)."""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from sweep.orchestration.bookkeeping import fail_dead_trials
from sweep.orchestration.storage import open_storage

PROCESSES, ENQUEUED, ASKS = 6, 60, 15


def _pop(url: str, start: float, out) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="race", storage=open_storage(url))
    while time.time() < start:  # all processes ask at once
        pass
    out.put([study.ask().number for _ in range(ASKS)])


def _race(url: str) -> list[int]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for i in range(ENQUEUED):
        study.enqueue_trial({"x": float(i)}, skip_if_exists=False)
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    start = time.time() + 4  # spawned interpreters import optuna first
    procs = [spawn.Process(target=_pop, args=(url, start, out)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    numbers = [n for _ in procs for n in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    return numbers


def _assert_each_once(numbers: list[int]) -> None:
    twice = sorted(n for n, k in Counter(numbers).items() if k > 1)
    assert not twice, f"trials handed to two workers: {twice}"
    assert len(numbers) == PROCESSES * ASKS


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_sqlite_hands_each_enqueued_trial_to_one_worker(tmp_path):
    _assert_each_once(_race(f"sqlite:///{tmp_path}/optuna.db"))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_postgres_hands_each_enqueued_trial_to_one_worker(postgres_server):
    _assert_each_once(_race(postgres_server[0]))


def _fail_dead(url: str, start: float, out) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="dead", storage=open_storage(url))
    while time.time() < start:
        pass
    out.put(fail_dead_trials(study))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_workers_reconciling_at_once_retry_a_dead_trial_once(tmp_path):
    """Every worker reconciles when it starts; when several find the same dead worker's trials,
    each trial is failed once and re-enqueued once."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="dead", storage=open_storage(url))
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()  # a pid that no longer runs
    for i in range(20):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 100)})
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", dead.pid)
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    start = time.time() + 4
    procs = [spawn.Process(target=_fail_dead, args=(url, start, out)) for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    for _ in procs:
        out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    trials = study.get_trials(deepcopy=False)
    assert all(t.state == TrialState.FAIL for t in trials if t.number < 20)
    retries = Counter(t.system_attrs.get("failed_trial") for t in trials
                      if t.state == TrialState.WAITING)
    assert sorted(retries) == list(range(20)) and set(retries.values()) == {1}, retries
