"""The MLflow record under cluster faults: a job's stop (SIGTERM, then SIGKILL 30 s later), a
tracking server killed and restarted, ``kill -9``, a run deleted through MLflow's API, two hosts
sharing one spool folder, a backlog over its cap, MLflow's async logging switched on.

Real processes and stores only (a real ``mlflow server``, SQLite files, sweep workers as
subprocesses). What arrived is counted in the store itself (SQL on the store's file, or
MlflowClient), never from the writer's own counters; what was trained is the reference.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import (REPO, free_port, has_trials, kill_tree, plain_storage, start_mlflow_server, sweep_cmd,
                     sweep_env, wait_running)
from sweep.loop.budget import budget_used, counted

SMOKE = REPO / "studies" / "smoke.yaml"
# 4 steps per epoch, 4 epochs on the tiny synthetic data: a trial trains in about a second.
SMALL = ("--set", "data.train_size=100", "--set", "data.val_size=40", "--set",
         "data.test_size=40", "--set", "train.batch_size=25", "--set", "train.epochs=4")
STEPS = 16
KILL_WAIT_S = 30  # SLURM's default KillWait: SIGKILL this long after SIGTERM
# SWEEP_STOP_S in these tests (default 20): above one refused MLflow HTTP call (about 5 s with
# its own retries), which the stop cannot interrupt, so the orderly path tells Optuna in time
STOP_S = 10


def _rows(db: Path, run_id: str) -> dict[str, tuple[int, int]]:
    """key -> (rows, distinct steps) of one run, read with sqlite3 itself, not MLflow."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT key, count(*), count(DISTINCT step) FROM metrics "
                            "WHERE run_uuid = ? GROUP BY key", (run_id,)).fetchall()
    return {key: (n, d) for key, n, d in rows}


def _wait_for(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_outage_then_sigterm_loses_no_point_fails_no_trial_and_repair_completes_the_record(
        tmp_path, tiny_cifar):
    """Scenario: the tracking server is killed while trial 0 trains; trial 0 completes in the
    outage and trial 1's run cannot start; then the job's SIGTERM (SIGKILL would follow 30 s
    later). The worker exits by itself within SWEEP_STOP_S, its queued points in the spool, and
    no trial failed for the outage. Server back: `sweep status` exits 3 (points in the spool),
    `--repair` replays: trial 0's run holds every trained step once, with its end; a second
    worker then finishes the budget. With MLFLOW_ENABLE_ASYNC_LOGGING=true throughout: a
    swallowed refusal would show up as missing points."""
    port, db, spool = free_port(), tmp_path / "server.db", tmp_path / "spool"
    url, storage = f"http://127.0.0.1:{port}", f"sqlite:///{tmp_path}/optuna.db"
    env = dict(sweep_env(tiny_cifar), SWEEP_STOP_S=str(STOP_S), SWEEP_SPOOL_DIR=str(spool),
               MLFLOW_TRACKING_URI=url, SWEEP_STORAGE=storage,
               MLFLOW_ENABLE_ASYNC_LOGGING="true")
    server = start_mlflow_server(f"sqlite:///{db}", port, tmp_path / "artifacts")
    worker = None
    try:
        worker = subprocess.Popen(sweep_cmd("worker", "--study", str(SMOKE), "--trials", "3",
                                            "--quiet", *SMALL),
                                  env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: has_trials(tmp_path / "optuna.db"), "the study's first trial", 300)
        trial0 = wait_running(plain_storage(storage), "smoke", set(), time.time() + 300)
        kill_tree(server)  # the outage starts while trial 0 trains
        study = optuna.load_study(study_name="smoke", storage=plain_storage(storage))

        def trial1_waits():
            trials = study.get_trials(deepcopy=False)
            return (len(trials) > 1 and trials[0].state == TrialState.COMPLETE
                    and trials[1].state == TrialState.RUNNING)

        _wait_for(trial1_waits, "trial 0 complete and trial 1 waiting for its run")
        time.sleep(1.0)  # trial 1 keeps waiting for the store; it must not fail
        assert study.get_trials(deepcopy=False)[1].state == TrialState.RUNNING
        worker.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            out, err = worker.communicate(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            worker.kill()  # what SLURM would do now: the test fails below
            out, err = worker.communicate()
            pytest.fail(f"the worker was still running {KILL_WAIT_S} s after SIGTERM:\n{err[-3000:]}")
        elapsed = time.monotonic() - sent
        assert worker.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert elapsed < KILL_WAIT_S
        print(f"worker exited {elapsed:.1f} s after SIGTERM (SWEEP_STOP_S={STOP_S})")
        assert "could not start the trial's MLflow run" not in out + err
        assert list(spool.rglob("*.jsonl")), "nothing reached the spool"

        trials = study.get_trials(deepcopy=False)
        assert trials[0].state == TrialState.COMPLETE
        assert trials[1].state == TrialState.FAIL  # stopped while waiting for its run: retried
        assert [t for t in trials if t.system_attrs.get("failed_trial") == 1]  # its retry waits
        assert budget_used(study) == 1  # the outage cost no seat of the budget

        server = start_mlflow_server(f"sqlite:///{db}", port, tmp_path / "artifacts")
        before = subprocess.run(sweep_cmd("status", "--study", "smoke"), env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert before.returncode == 3, before.stdout + before.stderr[-2000:]
        assert "pending in" in before.stdout and "sweep status --repair" in before.stdout
        repaired = subprocess.run(sweep_cmd("status", "--study", "smoke", "--repair"), env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr[-2000:]
        assert "spooled point(s) into" in repaired.stdout
        assert not list(spool.rglob("*.jsonl"))
        run_id = trial0.user_attrs.get("mlflow_run_id") or \
            study.get_trials(deepcopy=False)[0].user_attrs["mlflow_run_id"]
        rows = _rows(db, run_id)
        assert rows["lr"] == (STEPS, STEPS) and rows["train_loss"] == (STEPS, STEPS), rows
        assert rows["val_acc"] == (4, 4) and rows["test_acc"] == (1, 1), rows
        run = MlflowClient(url).get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["sweep.steps_trained"] == str(STEPS)

        # A second worker runs the study on: the whole budget ends COMPLETE/PRUNED.
        done = subprocess.run(sweep_cmd("worker", "--study", str(SMOKE), "--quiet", *SMALL),
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        final = counted(study.get_trials(deepcopy=False))
        assert len(final) == 3
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in final)
        status = subprocess.run(sweep_cmd("status", "--study", "smoke"), env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert status.returncode == 0, status.stdout + status.stderr[-2000:]
        assert "MLflow: all " in status.stdout and " of 3 trial run(s) stored" in status.stdout
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        kill_tree(server)


@pytest.mark.slow
def test_kill_9_mid_trial_names_the_killed_run_and_what_it_holds(tmp_path, tiny_cifar):
    """`kill -9` of a launch mid-trial (SQLite stores); `sweep status --repair` ends the run
    and names it with the points it holds, never "all 0 points of 0 runs"."""
    storage = f"sqlite:///{tmp_path}/sweep.db"  # the launch's default, as the repair's
    # one long trial (400 epochs of 4 steps): the kill lands mid-trial however fast the machine
    proc = subprocess.Popen(sweep_cmd("launch", "--study", str(SMOKE), "--trials", "1",
                                      "--quiet", *SMALL, "--set", "train.epochs=400"),
                            env=sweep_env(tiny_cifar), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # a reader opens the storage only once the launcher has created it (creation races)
        _wait_for(lambda: has_trials(tmp_path / "sweep.db"), "the study's first trial", 300)
        trial = wait_running(plain_storage(storage), "smoke", set(), time.time() + 300)
        run_id = trial.user_attrs["mlflow_run_id"]

        def stored():
            try:
                return sum(n for n, _ in _rows(tmp_path / "mlflow.db", run_id).values())
            except sqlite3.OperationalError:  # the writer holds the file this instant
                return 0

        _wait_for(stored, "the run's first stored points")  # a partial curve, as on a cluster
    finally:
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
    killed = optuna.load_study(study_name="smoke", storage=plain_storage(storage))
    assert killed.trials[trial.number].state == TrialState.RUNNING  # killed mid-trial
    repaired = subprocess.run(sweep_cmd("status", "--study", "smoke", "--repair"),
                              env=sweep_env(tiny_cifar), cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr[-2000:]
    held = sum(n for n, _ in _rows(tmp_path / "mlflow.db", run_id).values())
    assert held >= 1
    assert (f"MLflow: trial #{trial.number} run {run_id} holds {held} point(s) and ended without "
            f"a count: the worker was killed; its curve may be partial") in repaired.stdout, \
        repaired.stdout
    assert "all 0 points" not in repaired.stdout


def _tracker_with_runs(uri: str, study: str, n: int):
    from sweep.record import Tracker

    tracker = Tracker(uri)
    experiment_id = tracker.experiment_id(study)
    parent = tracker.study_run(experiment_id, study, {}, None)
    runs = [tracker.start_trial(experiment_id, parent, study, i, {"slot": i}, {})
            for i in range(n)]
    return tracker, experiment_id, runs


def _feed(run, first: int, steps: int) -> None:
    run.on_steps(first, [0.1] * steps, [1.0 + 0.001 * (first + j) for j in range(steps)])


def test_a_run_deleted_mid_study_is_set_aside_and_named_and_holds_up_no_other_run(
        tmp_path, monkeypatch):
    """A run deleted through MLflow's API while its points are queued: its end is refused for
    good (the run is not active). It is set aside with the reason, the other run ends whole,
    and the completeness check names it and counts the record incomplete (status exit 3)."""
    from sweep.record import check_completeness as check

    monkeypatch.setenv("SWEEP_SPOOL_AFTER_S", "600")  # a permanent error must not wait for it
    uri = f"sqlite:///{tmp_path}/m.db"
    tracker, experiment_id, (kept, deleted) = _tracker_with_runs(uri, "deleted", 2)
    for run in (kept, deleted):
        _feed(run, 0, 50)
    tracker.wait()
    MlflowClient(uri).delete_run(deleted.run_id)
    for run in (kept, deleted):
        _feed(run, 50, 50)
    deleted.finish("FINISHED", curve_png=False)
    kept.finish("FINISHED", curve_png=False)
    tracker.close()
    assert _rows(tmp_path / "m.db", kept.run_id)["lr"] == (100, 100)
    client = MlflowClient(uri)
    assert client.get_run(kept.run_id).info.status == "FINISHED"
    record = check(tracker, experiment_id)
    assert deleted.run_id in record.spool.set_aside
    points, reason = record.spool.set_aside[deleted.run_id]
    assert "active" in reason  # MLflow's own words: the run must be in the 'active' state
    text = "\n".join(record.lines("deleted"))
    assert f"run {deleted.run_id}:" in text and "set aside" in text
    assert not record.complete  # `sweep status` exits 3


def test_replay_skips_a_record_it_cannot_store_and_two_hosts_share_one_spool(tmp_path):
    """Two hosts' segments in one spool folder (one of them holding a line for a run deleted
    through MLflow's API), replayed by two replayers at once: each segment exactly once, the
    deleted run's line set aside, every other point stored once and the segments gone."""
    from sweep.record import SpoolWriter, pending, replay, spool_dir

    uri = f"sqlite:///{tmp_path}/m.db"
    tracker, _, runs = _tracker_with_runs(uri, "hosts", 3)
    tracker.close()
    MlflowClient(uri).delete_run(runs[2].run_id)
    points = [["lr", 0.1, 1_700_000_000_000 + s, s] for s in range(300)]
    for host, run in (("node-a", runs[0]), ("node-b", runs[1])):
        writer = SpoolWriter(spool_dir(uri), uri, host=host)
        records = [{"run": run.run_id, "metrics": points},
                   {"run": run.run_id, "end": "FINISHED", "end_time": 1_700_000_100_000,
                    "tags": {"sweep.state": "COMPLETE"}}]
        if host == "node-a":  # the bad line first: the replay must go on past it
            records.insert(0, {"run": runs[2].run_id, "end": "FINISHED", "end_time": 1, "tags": {}})
        writer.append(records)
        writer.close()
    assert sorted(p.name[:6] for p in spool_dir(uri).glob("*.jsonl")) == ["node-a", "node-b"]
    # Two replayers at once (threads: each opens the segments itself, and flock locks belong to
    # an open file, so they exclude each other as two processes on two hosts would).
    import threading

    sent = []
    replayers = [threading.Thread(target=lambda: sent.append(replay(uri, MlflowClient(uri))[0]))
                 for _ in range(2)]
    for thread in replayers:
        thread.start()
    for thread in replayers:
        thread.join()
    assert sum(sent) == 600  # each segment replayed by exactly one of them
    for run in runs[:2]:
        assert _rows(tmp_path / "m.db", run.run_id)["lr"] == (300, 300)
        assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"
    assert not list(spool_dir(uri).glob("*.jsonl"))
    assert runs[2].run_id in pending(uri).set_aside


def test_a_backlog_over_its_cap_goes_to_the_spool_and_replays_once(tmp_path, monkeypatch):
    """SWEEP_BACKLOG_POINTS=1000 and 2,400 points queued at once: they go to the spool although
    the store takes writes (memory stays bounded), the run's end follows them there, and the
    replay stores every point once."""
    from sweep.record import pending, replay

    monkeypatch.setenv("SWEEP_BACKLOG_POINTS", "1000")
    uri = f"sqlite:///{tmp_path}/m.db"
    tracker, _, (run,) = _tracker_with_runs(uri, "backlog", 1)
    _feed(run, 0, 1200)  # lr + train_loss: 2,400 points in one call
    run.finish("FINISHED", curve_png=False)
    tracker.close()
    waiting = pending(uri)
    assert waiting.total == 2400 and run.run_id in waiting.ends
    assert replay(uri, MlflowClient(uri)) == (2400, [])
    assert _rows(tmp_path / "m.db", run.run_id)["lr"] == (1200, 1200)
    got = MlflowClient(uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["sweep.steps_trained"] == "1200"


@pytest.mark.parametrize("env, flag, message", [
    ({"SWEEP_STOP_S": "soon"}, (),
     "error: SWEEP_STOP_S must be a number of seconds > 0 (SLURM's default KillWait is 30), "
     "got 'soon'; fix or unset it"),
    ({"SWEEP_BACKLOG_POINTS": "lots"}, (),
     "error: SWEEP_BACKLOG_POINTS must be a whole number of points >= 1000, got 'lots'; fix or "
     "unset it"),
    ({}, ("--tracking-uri", "file:./mlruns"),
     "error: tracking URI 'file:./mlruns': MLflow's file store keeps no key on metrics, so a "
     "retried or replayed write would store points twice; use sqlite:///PATH.db or "
     "http://HOST:PORT of an MLflow server"),
])
def test_bad_record_settings_are_one_line_exit_2_and_write_nothing(env, flag, message, in_tmp,
                                                                   tiny_cifar, monkeypatch):
    from sweep.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["launch", "--study", str(SMOKE), "--quiet",
                                       "--data-dir", str(tiny_cifar), *flag])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [message]
    assert not list(in_tmp.iterdir())


def test_a_run_whose_end_is_on_its_way_is_not_ended_by_another_workers_cleanup(tmp_path):
    """Optuna hears a trial's result before its run's end is written; until the time its worker
    promised (``sweep.run_end_by``), another worker's stale-run cleanup leaves the run alone;
    after it, or with no promise, the run is stale."""
    from sweep.loop.reconcile import stale_runs
    from sweep.record import RUN_END_BY

    study = optuna.create_study(study_name="grace", storage=f"sqlite:///{tmp_path}/o.db")
    tracker, experiment_id, runs = _tracker_with_runs(f"sqlite:///{tmp_path}/m.db", "grace", 0)
    parent = tracker.study_runs(experiment_id, "grace")[0].info.run_id
    promised = []
    for by in (time.time() + 600, time.time() - 1, None):
        trial = study.ask()
        trial.set_user_attr("host", "node-elsewhere")  # no pid check possible from here
        trial.set_user_attr("pid", 4242)
        if by is not None:
            trial.set_user_attr(RUN_END_BY, by)
        run = tracker.start_trial(experiment_id, parent, "grace", trial.number, {}, {})
        study.tell(trial, 0.5)
        promised.append(run.run_id)
    stale = {run.info.run_id for run, _ in stale_runs(study, tracker, experiment_id)}
    assert stale == set(promised[1:])
    tracker.close()


def test_the_progress_line_shows_the_writers_lag_while_the_store_is_locked(tmp_path):
    """Another connection holds the MLflow SQLite file's write lock (a real "database is
    locked"): the queued points show in the trials bar's postfix; once the lock is released
    they are stored and the lag disappears."""
    from sweep.loop.objective import Outcome
    from sweep.views.console import Console

    uri = f"sqlite:///{tmp_path}/m.db"
    tracker, _, (run,) = _tracker_with_runs(uri, "lag", 1)
    console = Console(uri, quiet=False)
    console.watch_record(tracker.lag_text)
    bar = console.trial_bar(budget=2, used=0)
    blocker = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the write lock, until ROLLBACK
    try:
        _feed(run, 0, 6000)  # lr + train_loss: 12,000 points
        _wait_for(lambda: "12,000 pts queued" in tracker.lag_text(), "the lag to show", 60)
        bar(0, Outcome(TrialState.COMPLETE, 0.5))
        assert "mlflow=12,000 pts queued" in str(bar.bar.postfix)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert tracker.writer.drain(time.monotonic() + 120)
    assert tracker.lag_text() == ""
    bar.close()
    tracker.close()
    assert _rows(tmp_path / "m.db", run.run_id)["lr"] == (6000, 6000)
