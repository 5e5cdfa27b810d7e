"""One trial lifecycle (``sweep.loop.lifecycle``): a claimed trial is visibly owned at once, every
way out ends in one outcome, a stop re-enqueues first and exactly once however a stale check
races it, one slot's error is that slot's alone, and a checkpoint file leaves with its trial.

Real SQLite stores (counted with SQL), real processes and signals, real training on tiny data;
the faults are real: another process's ``BEGIN EXCLUSIVE`` on the MLflow store, a SQLite trigger
in the Optuna store that refuses one trial's COMPLETE, a directory where a checkpoint file
should be.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers import REPO, sweep_cmd, sweep_env

from sweep.loop.lifecycle import Outcome, Trials
from sweep.loop.reconcile import fail_dead_trials
from sweep.stores.checkpoint_writer import DELAY_ENV, CheckpointWriter
from sweep.stores.checkpoints import TMP_IDLE_S, CheckpointDir, stale_temporaries
from sweep.stores.retry import FAILED_TRIAL, RETRY_HISTORY
from sweep.stores.storage import open_storage


def _sql(db: Path, query: str, *args) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(query, args).fetchall()


def _retries(db: Path) -> list[int]:
    """The trial numbers the retries in ``db`` continue, one entry per retry (SQL, not Optuna)."""
    return sorted(int(v) for (v,) in _sql(
        db, "SELECT value_json FROM trial_system_attributes WHERE key = ?", FAILED_TRIAL))


# --- claimed: owned at once; one outcome ------------------------------------------------------

def test_a_claimed_trial_has_its_heartbeat_row_and_notes_at_once(tmp_path, monkeypatch):
    """The heartbeat thread's next beat is an hour away: the row exists only because the claim
    wrote it at once (without it Optuna's stale check never sees the trial)."""
    monkeypatch.setenv("SWEEP_HEARTBEAT_INTERVAL", "3600")
    db = tmp_path / "o.db"
    study = optuna.create_study(storage=open_storage(f"sqlite:///{db}"))
    trials = Trials(study)
    try:
        trial = study.ask()
        trials.claim(trial)
        assert _sql(db, "SELECT trial_id FROM trial_heartbeats") == [(trial._trial_id,)]
        notes = dict(_sql(db, "SELECT key, value_json FROM trial_user_attributes WHERE "
                              "trial_id = ?", trial._trial_id))
        assert notes == {"host": f'"{socket.gethostname()}"', "pid": str(os.getpid())}
    finally:
        trials.close()


def test_a_trial_gets_exactly_one_outcome(tmp_path):
    """Told, then given up: nothing more happens (no FAIL, no retry); given up, then told: the
    tell does nothing. Each outcome is heard once."""
    db = tmp_path / "o.db"
    study = optuna.create_study(storage=open_storage(f"sqlite:///{db}"))
    heard = []
    trials = Trials(study, on_outcome=lambda t, o: heard.append((t.number, o.state)))
    try:
        told, given_up = study.ask(), study.ask()
        for t in (told, given_up):
            trials.claim(t)
        trials.tell(told, Outcome(TrialState.COMPLETE, 0.5))
        assert not trials.requeue(told, signalled=True)
        assert trials.requeue(given_up, signalled=True)
        trials.tell(given_up, Outcome(TrialState.COMPLETE, 0.7))
        assert trials.owned() == []
    finally:
        trials.close()
    assert _sql(db, "SELECT number, state FROM trials ORDER BY number") == [
        (0, "COMPLETE"), (1, "FAIL"), (2, "WAITING")]
    assert _retries(db) == [1]
    assert heard == [(0, TrialState.COMPLETE), (1, TrialState.FAIL)]


# --- a stop's retry racing a stale check ------------------------------------------------------

_RACER = """
import sys, time
from pathlib import Path
import optuna
from sweep.loop.lifecycle import give_up
from sweep.loop.reconcile import fail_stale
from sweep.stores.storage import open_storage
url, role, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
study = optuna.load_study(study_name="race", storage=open_storage(url))
ids = [t._trial_id for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
if role == "stop":  # its own worker, signalled, gives every trial up (from the last one)
    for trial_id in reversed(ids):
        give_up(study, trial_id, signalled=True)
else:  # another worker's stale check
    fail_stale(study)
"""


@pytest.mark.slow
def test_a_signalled_retry_racing_a_stale_check_creates_one_retry(tmp_path):
    """Twelve RUNNING trials whose heartbeats are stale; two processes at once: their own
    (signalled) worker gives them up from the last, another worker's stale check fails them from
    the first. Every trial ends with exactly one retry, whoever won it (counted by SQL)."""
    db, go = tmp_path / "o.db", tmp_path / "go"
    url = f"sqlite:///{db}"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore",
               SWEEP_HEARTBEAT_INTERVAL="1", SWEEP_GRACE_PERIOD="1")
    os.environ.update(SWEEP_HEARTBEAT_INTERVAL="1", SWEEP_GRACE_PERIOD="1")
    try:
        storage = open_storage(url)
    finally:
        for key in ("SWEEP_HEARTBEAT_INTERVAL", "SWEEP_GRACE_PERIOD"):
            os.environ.pop(key)
    study = optuna.create_study(study_name="race", storage=storage)
    for _ in range(12):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        storage.record_heartbeat(trial._trial_id)
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, url, role, str(go)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for role in ("stop", "stale")]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready", racer.communicate()
    while len(storage._get_stale_trial_ids(study._study_id)) < 12:  # stale by the storage's rule
        time.sleep(0.1)
    go.touch()
    for racer in racers:
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
    assert _retries(db) == list(range(12))
    assert _sql(db, "SELECT state, count(*) FROM trials GROUP BY state ORDER BY state") == [
        ("FAIL", 12), ("WAITING", 12)]


# --- a checkpoint file leaves with its trial (issue 34, item 9) -------------------------------

def test_removals_waiting_behind_a_slow_write_are_done_when_the_flush_times_out(tmp_path,
                                                                               monkeypatch):
    """A slow disk (each write waits 60 s first) holds the flush past its deadline: the write
    is dropped (the previous file stays), the finished trial's file is removed all the same."""
    monkeypatch.setenv(DELAY_ENV, "60")
    writer = CheckpointWriter()

    class Slow:
        path = tmp_path / "trial-0.pt"

        def save(self, state):
            self.path.write_bytes(b"new")

    Slow.path.write_bytes(b"previous")
    done = tmp_path / "trial-1.pt"
    done.write_bytes(b"finished trial")
    writer.save(Slow(), lambda: {})
    writer.remove(done)
    assert not writer.close(time.monotonic() + 0.2)
    assert not done.exists()
    assert Slow.path.read_bytes() == b"previous"


def test_a_trial_stuck_running_does_not_pin_the_stale_temporaries(tmp_path):
    """A trial RUNNING for a day (its worker frozen): a temporary nobody wrote for longer than
    ``TMP_IDLE_S`` is stale all the same; one written just now is not."""
    db = tmp_path / "o.db"
    study = optuna.create_study(storage=open_storage(f"sqlite:///{db}"))
    study.ask()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE trials SET datetime_start = datetime('now', '-1 day')")
    folder = tmp_path / "study"
    folder.mkdir()
    old, fresh = folder / ".trial-0.pt.h.1.a.tmp", folder / ".trial-1.pt.h.2.b.tmp"
    for path in (old, fresh):
        path.write_bytes(b"part")
    idle = time.time() - TMP_IDLE_S - 60
    os.utime(old, (idle, idle))
    assert stale_temporaries(study, folder) == [old]


def test_a_retry_the_rule_refuses_takes_its_checkpoint_file_with_it(tmp_path):
    """A retry that made no progress, its worker dead (a finished process of this host): the
    dead-pid check fails it without a further retry, and its chain's file is removed."""
    db = tmp_path / "o.db"
    study = optuna.create_study(storage=open_storage(f"sqlite:///{db}"))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"x": 0.5},
                                              distributions=dist))
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params={"x": 0.5}, distributions=dist,
        system_attrs={FAILED_TRIAL: 0, RETRY_HISTORY: [0]}))
    retry = study.ask()
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    retry.set_user_attr("host", socket.gethostname())
    retry.set_user_attr("pid", gone.pid)
    checkpoints = CheckpointDir(tmp_path / "ckpt", "v", "cpu")
    path = checkpoints.path(study, 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"epoch 2")
    assert fail_dead_trials(study, checkpoints) == [retry.number]
    checkpoints.writer.close(time.monotonic() + 30)
    assert not path.exists()
    assert _retries(db) == [0]  # the one it was; none for the refused retry
