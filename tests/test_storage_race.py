"""Several processes working on one storage at once: each enqueued trial goes to exactly one
worker, a dead trial is retried once, and confirmations started together enqueue each replicate
once. Enqueued trials are a dead worker's retry and every confirmation replicate; on SQLite,
Optuna's check-and-set of a trial's state was not atomic between processes, and the same retry
was trained by two workers (a CI failure: one of them then crashed telling it)."""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from sweep.loop.reconcile import fail_dead_trials
from sweep.stores.storage import open_storage

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage")]

PROCESSES, ENQUEUED, ASKS = 6, 60, 15


def _entry(task, url: str, study_name: str, ready, go, out, *args) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    ready.put(True)
    go.wait()  # every process acts at the same instant, however slowly each started
    out.put(task(study, url, *args))


def _at_once(task, url: str, study_name: str, *args, processes: int = PROCESSES) -> list:
    """``task(study, url, *args)`` in ``processes`` fresh interpreters at the same instant;
    their results."""
    spawn = multiprocessing.get_context("spawn")
    ready, go, out = spawn.Queue(), spawn.Event(), spawn.Queue()
    procs = [spawn.Process(target=_entry, args=(task, url, study_name, ready, go, out, *args))
             for _ in range(processes)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=180)
    go.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results


def _ask_trials(study, url):
    return [study.ask().number for _ in range(ASKS)]


def _pop_race(url: str) -> None:
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for i in range(ENQUEUED):
        study.enqueue_trial({"x": float(i)}, skip_if_exists=False)
    numbers = [n for got in _at_once(_ask_trials, url, "race") for n in got]
    twice = sorted(n for n, k in Counter(numbers).items() if k > 1)
    assert not twice, f"trials handed to two workers: {twice}"
    assert len(numbers) == PROCESSES * ASKS


def test_sqlite_hands_each_enqueued_trial_to_one_worker(tmp_path):
    _pop_race(f"sqlite:///{tmp_path}/optuna.db")


def test_postgres_hands_each_enqueued_trial_to_one_worker(postgres_server):
    _pop_race(postgres_server[0])


def _fail_dead(study, url):
    return fail_dead_trials(study)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_reconciling_at_once_retry_a_dead_trial_once(tmp_path, kind):
    """Every worker reconciles when it starts; when several find the same dead worker's trials,
    each trial is failed once and re-enqueued once."""
    url = {"sqlite": f"sqlite:///{tmp_path}/optuna.db", "journal": f"journal:///{tmp_path}/o.log"}[kind]
    study = optuna.create_study(study_name="dead", storage=open_storage(url))
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()  # a pid that no longer runs
    for _ in range(20):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 100)})
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", dead.pid)
    _at_once(_fail_dead, url, "dead")
    trials = study.get_trials(deepcopy=False)
    assert all(t.state == TrialState.FAIL for t in trials if t.number < 20)
    retries = Counter(t.system_attrs.get("failed_trial") for t in trials
                      if t.state == TrialState.WAITING)
    assert sorted(retries) == list(range(20)) and set(retries.values()) == {1}, retries


def _prepare(study, url, plan_json):
    from sweep.loop.confirm_plan import Plan, prepare_replicates

    return prepare_replicates(study, Plan.from_json(plan_json), url).to_json()


def _confirm_race(url: str) -> None:
    from sweep.loop.confirm_plan import Group, Plan
    from sweep.study.phases import CONFIRM_KEY

    study = optuna.create_study(study_name="confirm", storage=open_storage(url))
    groups = tuple(Group(f"scheduler:{name}", {"scheduler": name, "base_lr": 0.1}, 0)
                   for name in ("cosine", "step", "plateau", "linear"))
    plan = Plan(tuple(range(1_000_000, 1_000_005)), 1, groups)
    plans = _at_once(_prepare, url, "confirm", plan.to_json(), processes=4)
    assert set(plans) == {plan.to_json()}
    keys = Counter(t.user_attrs.get(CONFIRM_KEY) for t in study.get_trials(deepcopy=False))
    assert sorted(keys) == sorted(k for _, _, k in plan.keys()) and set(keys.values()) == {1}, keys


def test_confirms_started_at_once_enqueue_each_replicate_once_on_sqlite(tmp_path):
    _confirm_race(f"sqlite:///{tmp_path}/optuna.db")


def test_confirms_started_at_once_enqueue_each_replicate_once_on_journal(tmp_path):
    _confirm_race(f"journal:///{tmp_path}/optuna.log")


def test_confirms_started_at_once_enqueue_each_replicate_once_on_postgres(postgres_server):
    _confirm_race(postgres_server[0])
