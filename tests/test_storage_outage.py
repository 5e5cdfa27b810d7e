"""The Optuna storage goes away while workers train (issue 32, item 2): the suite's real
PostgreSQL stopped with ``pg_ctl -m fast`` and started again on the same port and data (a
maintenance restart, a failover), shorter and longer than the heartbeat grace period; a SQLite
file held by another process's ``BEGIN EXCLUSIVE`` past the busy timeout. Real ``sweep worker``
processes; what arrived is counted with SQL on the stores, not through sweep."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy

from sweep.base.backoff import MAX_WAIT_S

from helpers import PG_PASSWORD, TINY, sweep_cmd, sweep_env

EPOCHS, BATCH, TRAIN = 6, 10, 150  # 10 steps an epoch: a trial is a few seconds on 2 loaded cores
STEPS = EPOCHS * TRAIN // BATCH
SETS = (f"train.epochs={EPOCHS}", f"train.batch_size={BATCH}", f"data.train_size={TRAIN}")
GRACE_S = 12  # > the short outage (3 s) plus a server start on a loaded machine


def _worker(folder: Path, env: dict, storage: str, tracking: str, *sets: str,
            budget: int = 4) -> subprocess.Popen:
    args = [a for s in (*SETS, *sets) for a in ("--set", s)]
    return subprocess.Popen(
        sweep_cmd("worker", "--study", str(TINY), "--storage", storage, "--tracking-uri",
                  tracking, "--trials", str(budget), "--device", "cpu", "--quiet", *args),
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(data: Path) -> dict:
    return dict(sweep_env(data), SWEEP_HEARTBEAT_INTERVAL="1", SWEEP_GRACE_PERIOD=str(GRACE_S))


def _pg(folder: str, *args: str) -> None:
    """``pg_ctl`` on the suite's server, as its owner (scripts/start_postgres.sh)."""
    binary = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
    subprocess.run(["runuser", "-u", "postgres", "--", str(binary), "-D", f"{folder}/data",
                    *args], check=True, capture_output=True, timeout=120)


def _start_pg(folder: str, port: str) -> None:
    _pg(folder, "-l", f"{folder}/server.log", "-w", "-t", "60", "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off "
        f"-c max_connections=200", "start")


def _rows(url: str, sql: str, **params) -> list:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(sqlalchemy.text(sql), params)
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


def _training_pids(optuna_url: str, after: int) -> set:
    """The pids of workers whose RUNNING trial has more epochs to train and reported one since
    value row ``after`` (0: ever; the last row before a restart: trained since)."""
    if not _rows(optuna_url, "SELECT to_regclass('trial_intermediate_values')")[0][0]:
        return set()  # the workers have not created Optuna's tables yet
    rows = _rows(optuna_url, """
        SELECT a.value_json FROM trials t
        JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'pid'
        WHERE t.state = 'RUNNING'
          AND (SELECT count(*) FROM trial_intermediate_values v
               WHERE v.trial_id = t.trial_id) <= :most
          AND EXISTS (SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id
                      AND v.trial_intermediate_value_id > :after)""",
                 most=EPOCHS - 2, after=after)
    return {r[0] for r in rows}


def _last_value(optuna_url: str) -> int:
    return _rows(optuna_url, "SELECT coalesce(max(trial_intermediate_value_id), 0) "
                             "FROM trial_intermediate_values")[0][0]


def _create_tables(optuna_url: str, mlflow_url: str) -> None:
    """Both stores' tables, created here once: two processes creating them at once on a fresh
    PostgreSQL database race in the catalog (a duplicate ``pg_type`` row), a first-launch
    matter that is not this test's."""
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.storages.RDBStorage(optuna_url).engine.dispose()
    MlflowClient(mlflow_url).search_experiments(max_results=1)


def _wait_training(optuna_url: str, workers: list, n: int, after: int = 0) -> None:
    """Until ``n`` workers train (``_training_pids``)."""
    deadline = time.monotonic() + 300
    while len(_training_pids(optuna_url, after)) < n:
        assert all(w.poll() is None for w in workers), [w.communicate()[1][-3000:] for w in workers]
        assert time.monotonic() < deadline, f"{n} workers never trained at once"
        time.sleep(0.1)


def _check_stores(optuna_url: str, mlflow_url: str, budget: int) -> None:
    """Counted in SQL: the budget exact, no trial FAILED or left RUNNING, and every finished
    trial's MLflow run holds its whole LR curve once (one point per step, steps 0..STEPS-1)."""
    states = dict(_rows(optuna_url, "SELECT state, count(*) FROM trials GROUP BY state"))
    assert states == {"COMPLETE": budget}, states
    curves = _rows(mlflow_url, """
        SELECT t.value, count(m.step), count(DISTINCT m.step), min(m.step), max(m.step)
        FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'sweep.trial_number'
        LEFT JOIN metrics m ON m.run_uuid = r.run_uuid AND m.key = 'lr'
        WHERE r.status = 'FINISHED' GROUP BY t.value""")
    assert sorted(int(c[0]) for c in curves) == list(range(budget)), curves
    assert all(c[1:] == (STEPS, STEPS, 0, STEPS - 1) for c in curves), curves
    running = _rows(mlflow_url, """
        SELECT r.run_uuid, r.name, t.value FROM runs r
        LEFT JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'sweep.role'
        WHERE r.status = 'RUNNING' AND r.lifecycle_stage = 'active'""")  # not the parent a
    # worker that lost the race to create it deleted (a deleted run keeps its status)
    assert not running, running


def _outages(err: str) -> list[float]:
    """The lengths the guard's "is back after N s" lines report; one "is away" line each."""
    backs = [float(s) for s in re.findall(r"Optuna storage \S+ is back after ([0-9.]+) s", err)]
    assert len(re.findall(r"Optuna storage \S+ is away", err)) == len(backs), err[-3000:]
    return backs


@pytest.mark.slow
def test_postgres_restarts_while_two_workers_train(postgres_server, _postgres_cluster,
                                                   tiny_cifar, tmp_path):
    """Two restarts under the same two workers (one unfused, one a fused pack of 2), each while
    both train: one shorter than the heartbeat grace period, one longer."""
    optuna_url, mlflow_url = postgres_server
    folder, port = _postgres_cluster[0], optuna_url.rsplit(":", 1)[1].split("/")[0]
    env, budget, downs, affected, after = _env(tiny_cifar), 8, [], [], 0
    _create_tables(optuna_url, mlflow_url)
    workers = [_worker(tmp_path, env, optuna_url, mlflow_url, budget=budget),
               _worker(tmp_path, env, optuna_url, mlflow_url, "train.fuse=2", budget=budget)]
    try:
        for down_s in (3, GRACE_S + 4):
            _wait_training(optuna_url, workers, 2, after)  # both mid-training, since a restart
            after = _last_value(optuna_url)
            affected.append(_rows(optuna_url,
                                  "SELECT count(*) FROM trials WHERE state = 'RUNNING'")[0][0])
            _pg(folder, "-m", "fast", "-w", "stop")
            stopped = time.monotonic()
            try:
                time.sleep(down_s)  # the outage itself: its length is the scenario
            finally:
                _start_pg(folder, port)
            downs.append(time.monotonic() - stopped)
        outs = [w.communicate(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert downs[0] < GRACE_S < downs[1]  # the second: heartbeats older than the grace period
    for w, (out, err) in zip(workers, outs):
        assert w.returncode == 0, out[-2000:] + err[-4000:]
        assert "Traceback" not in err and PG_PASSWORD not in out + err, err[-20000:]
        lengths = _outages(err)
        assert len(lengths) >= 2 and max(lengths) <= max(downs) + MAX_WAIT_S, (lengths, downs)
        print(f"outages {[round(d, 1) for d in downs]} s, {affected} trials training; "
              f"the worker saw {lengths}")
    _check_stores(optuna_url, mlflow_url, budget)
    shown = subprocess.run(sweep_cmd("status", "--study", "tiny", "--storage", optuna_url,
                                     "--tracking-uri", mlflow_url),
                           env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"{budget}/{budget} trials used" in shown.stdout and "running 0" in shown.stdout


_HOLD = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
conn.execute("BEGIN EXCLUSIVE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


@pytest.mark.slow
def test_sqlite_file_locked_past_the_busy_timeout(tiny_cifar, tmp_path):
    """Another process holds the Optuna SQLite file with ``BEGIN EXCLUSIVE`` for 6 s while the
    worker trains, with a 1 s busy timeout: the worker's writes wait, then it finishes."""
    db = tmp_path / "sweep.db"
    env = dict(_env(tiny_cifar), SWEEP_BUSY_TIMEOUT_S="1")
    worker = _worker(tmp_path, env, f"sqlite:///{db}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        deadline = time.monotonic() + 300
        while not _sqlite_training(db):
            assert worker.poll() is None, worker.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the worker never trained"
            time.sleep(0.1)
        holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(db), "6"],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        assert holder.wait(timeout=120) == 0
        out, err = worker.communicate(timeout=300)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, out[-2000:] + err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    assert "database is locked" in err and _outages(err), err[-3000:]
    with sqlite3.connect(db) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM trials GROUP BY state"))
    assert states == {"COMPLETE": 4}, states


def _sqlite_training(db: Path) -> bool:
    """A RUNNING trial of the SQLite store at ``db`` has reported an epoch and has more to go."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return bool(conn.execute(
                """SELECT count(*) FROM trials t WHERE t.state = 'RUNNING' AND
                   (SELECT count(*) FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)
                   BETWEEN 1 AND ?""", (EPOCHS - 2,)).fetchone()[0])
    except sqlite3.Error:  # not created yet
        return False


@pytest.mark.slow
def test_no_stale_judgement_right_after_a_restart(postgres_server, _postgres_cluster,
                                                   monkeypatch):
    """A worker cut off by a restart does not fail another worker's trial on its first look
    after it: that trial's heartbeat is old because nobody could beat. Once a grace period has
    passed since the storage came back, the same trial, still silent, is failed and retried."""
    import threading

    import optuna
    from optuna.trial import TrialState

    from sweep.base.stopping import BoundedStop
    from sweep.loop.reconcile import fail_stale
    from sweep.stores.storage import open_storage

    optuna_url = postgres_server[0]
    folder, port = _postgres_cluster[0], optuna_url.rsplit(":", 1)[1].split("/")[0]
    grace = 3
    monkeypatch.setenv("SWEEP_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("SWEEP_GRACE_PERIOD", str(grace))
    storage = open_storage(optuna_url)
    storage.guard.watch(BoundedStop(), lambda: None)  # a worker's guard: it waits
    study = optuna.create_study(study_name="stale", storage=storage)
    other = study.ask()  # another worker's trial, beating until the restart
    storage.record_heartbeat(other._trial_id)
    _rows(optuna_url, "UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '1 hour'")

    _pg(folder, "-m", "fast", "-w", "stop")
    try:
        waiting = threading.Thread(target=study.get_trials)  # this worker, cut off: it waits
        waiting.start()
        while not storage.guard.back_within(grace):  # it has seen the storage go away
            time.sleep(0.05)
    finally:
        _start_pg(folder, port)
    waiting.join(timeout=120)
    assert not waiting.is_alive()

    fail_stale(study)  # the first look after the outage: heartbeats are not judged yet
    assert storage.get_trial(other._trial_id).state == TrialState.RUNNING

    deadline = time.monotonic() + 120
    while storage.guard.back_within(grace) or storage._server_up_for() < grace:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    fail_stale(study)  # a grace period after the storage came back: it is stale now
    trials = study.get_trials(deepcopy=False)
    assert storage.get_trial(other._trial_id).state == TrialState.FAIL
    assert [t.system_attrs.get("failed_trial") for t in trials if t.state == TrialState.WAITING] \
        == [other.number]


def test_a_permanent_store_error_is_one_line_and_an_unwatched_outage_too(tmp_path, monkeypatch):
    """Outside a worker's loop (``sweep status``, ``best``...) nothing waits: a file locked past
    the busy timeout is one line naming the storage; a store error that no wait cures (a table
    gone) is one line anywhere, never retried."""
    import optuna

    from sweep.base.stopping import BoundedStop
    from sweep.errors import StorageError
    from sweep.stores.storage import open_storage

    monkeypatch.setenv("SWEEP_BUSY_TIMEOUT_S", "0.2")
    db = tmp_path / "sweep.db"
    storage = open_storage(f"sqlite:///{db}")
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StorageError) as away:
        trial.set_user_attr("k", 1)
    holder.execute("COMMIT")
    assert str(away.value).startswith(f"storage sqlite:///{db} is away (database is locked)")
    assert "\n" not in str(away.value)

    storage.guard.watch(BoundedStop(), lambda: None)  # a worker's: transient errors would wait
    holder.execute("DROP TABLE trial_intermediate_values")
    with pytest.raises(StorageError) as refused:
        trial.report(0.5, 0)
    assert str(refused.value).startswith(f"storage sqlite:///{db} refused to report a value: ")
    assert "no such table" in str(refused.value) and "\n" not in str(refused.value)


class _Stopped(BaseException):
    pass


def test_a_stop_during_the_wait_raises_the_stop(tmp_path, monkeypatch):
    """A worker waiting for a locked SQLite file gets its stop at once (the stop, not the
    store's error), so it can re-enqueue its trials within ``SWEEP_STOP_S``."""
    import threading
    from types import SimpleNamespace

    import optuna

    from sweep.stores.storage import open_storage

    monkeypatch.setenv("SWEEP_BUSY_TIMEOUT_S", "0.2")
    db = tmp_path / "sweep.db"
    storage = open_storage(f"sqlite:///{db}")
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    stop = SimpleNamespace(deadline=None)  # a BoundedStop's view: its deadline once it began

    def interrupt():
        raise _Stopped()

    storage.guard.watch(stop, interrupt)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    seen = threading.Event()
    storage.guard._log = lambda line: seen.set()  # the outage line: the write is waiting

    def signal_once_waiting():
        seen.wait(60)
        stop.deadline = time.monotonic() + 30

    threading.Thread(target=signal_once_waiting).start()
    try:
        with pytest.raises(_Stopped):
            trial.set_user_attr("k", 1)
    finally:
        holder.execute("COMMIT")
    assert seen.is_set()
