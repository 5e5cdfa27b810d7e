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
from sweep.stores.checkpoints import (TMP_IDLE_S, CheckpointDir, stale_temporaries,
                                      storage_key)
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


# --- real workers: a stop in a refill's store wait; one slot's tell; an unopenable file --------

def _study(tmp_path: Path, trials: int, epochs: int, fuse: int) -> Path:
    path = tmp_path / "life.yaml"
    path.write_text(f"""
name: life
seed: 0
trials: {trials}
objective: {{metric: val_acc, direction: maximize}}
sampler: {{type: random}}
pruner: {{type: none}}
data: {{train_size: 100, val_size: 40, test_size: 40}}
train: {{model: resnet8, width: 1, epochs: {epochs}, batch_size: 50, fuse: {fuse}}}
space:
  warmup_steps: 0
  base_lr: {{type: float, low: 0.05, high: 0.4, log: true}}
  scheduler: {{cosine: {{}}}}
""")
    return path


def _launch(tmp_path: Path, study: Path, data: Path, **env) -> subprocess.Popen:
    """``sweep launch`` of ``study`` in ``tmp_path``; a ``hook`` folder there (a
    ``sitecustomize.py``) goes first on the worker's path."""
    base = sweep_env(data)
    if (tmp_path / "hook").is_dir():
        base["PYTHONPATH"] = f"{tmp_path / 'hook'}{os.pathsep}{base['PYTHONPATH']}"
    return subprocess.Popen(sweep_cmd("launch", "--study", str(study), "--quiet"), cwd=tmp_path,
                            env=dict(base, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err


def _wait_sql(db: Path, proc: subprocess.Popen, query: str, done, timeout: float = 200):
    """Until ``done(rows)`` holds for ``query`` on ``db`` (read-only; the file may not exist
    yet); the rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            rows = _sql(db, query)
            if done(rows):
                return rows
        except sqlite3.OperationalError:
            pass  # not created yet, or busy
        time.sleep(0.05)
    raise AssertionError(f"never held: {query}")


def _attr(db: Path, number: int, key: str):
    rows = _sql(db, "SELECT a.value_json FROM trial_user_attributes a JOIN trials t ON "
                    "t.trial_id = a.trial_id WHERE t.number = ? AND a.key = ?", number, key)
    return rows[0][0] if rows else None


@pytest.mark.slow
def test_a_stop_during_a_refills_wait_for_the_store_leaves_no_trial_running(tmp_path, tiny_cifar):
    """A pack of 2 with a budget of 3: once both first runs are open, another process holds the
    MLflow store (``BEGIN EXCLUSIVE``), so the refill's run start waits for it. SIGTERM during
    that wait (its warning line on stderr is the event): the claimed refill is re-enqueued at
    once, nothing stays RUNNING, and a second worker finishes the study and exits 0."""
    import queue
    import threading

    study, db = _study(tmp_path, trials=3, epochs=4, fuse=2), tmp_path / "sweep.db"
    first = _launch(tmp_path, study, tiny_cifar, SWEEP_STOP_S="4")
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in first.stderr], daemon=True).start()
    _wait_sql(db, first, "SELECT count(*) FROM trial_user_attributes WHERE key = 'mlflow_run_id'",
              lambda rows: rows[0][0] == 2)
    holder = sqlite3.connect(tmp_path / "mlflow.db", timeout=60, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        deadline = time.monotonic() + 200
        while True:  # the refill's run start refused: the worker waits for the store
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "refused trial #2's run start" in line:
                break
        assert _attr(db, 2, "pid") == str(first.pid)  # claimed visibly before the wait
        assert _sql(db, "SELECT count(*) FROM trial_heartbeats h JOIN trials t ON "
                        "t.trial_id = h.trial_id WHERE t.number = 2") == [(1,)]
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _sql(db, "SELECT number, state FROM trials ORDER BY number") == [
        (0, "COMPLETE"), (1, "COMPLETE"), (2, "FAIL"), (3, "WAITING")]
    assert _retries(db) == [2]
    _finish(_launch(tmp_path, study, tiny_cifar))
    assert _sql(db, "SELECT number, state FROM trials ORDER BY number") == [
        (0, "COMPLETE"), (1, "COMPLETE"), (2, "FAIL"), (3, "COMPLETE")]


@pytest.mark.slow
def test_one_slots_tell_refused_ends_that_slot_alone(tmp_path, tiny_cifar):
    """A pack of 4; the Optuna store refuses trial 1's COMPLETE (a SQLite trigger that fails
    with an OperationalError, "malformed JSON": a real error of the real database, which Optuna
    raises as StorageInternalError; once, since its retry has another number; not RAISE(),
    whose IntegrityError Optuna's tell swallows). Trial 1 is re-enqueued with one line and its
    retry resumes from its checkpoint; the other three COMPLETE."""
    db = tmp_path / "sweep.db"
    optuna.storages.RDBStorage(f"sqlite:///{db}")  # the tables, so the trigger can be added
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE UPDATE OF state ON trials WHEN NEW.state = "
                     "'COMPLETE' AND NEW.number = 1 BEGIN SELECT json('injected fault'); END")
    err = _finish(_launch(tmp_path, _study(tmp_path, trials=4, epochs=2, fuse=4), tiny_cifar))
    assert _sql(db, "SELECT number, state FROM trials ORDER BY number") == [
        (0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE"), (3, "COMPLETE"), (4, "COMPLETE")]
    assert _retries(db) == [1]
    (line,) = [ln for ln in err.splitlines() if ln.startswith("trial 1:")]
    # the storage guard calls the trigger's error permanent (no wait cures a bad value): one line
    assert line.startswith("trial 1: its tell failed (StorageError: storage sqlite:///sweep.db "
                           "refused to set a trial COMPLETE") and "malformed JSON" in line \
        and line.endswith("; re-enqueued")
    assert _attr(db, 4, "resumed_epochs") == "1"  # its file was kept for it
    for number in (0, 2, 3):
        assert _attr(db, number, "checkpoint_epochs") == "1"
    assert not list((tmp_path / "sweep-checkpoints").glob("*/*.pt"))  # each left with its trial


@pytest.mark.slow
def test_a_stop_re_enqueues_first_and_an_unopenable_checkpoint_restarts_from_step_0(
        tmp_path, tiny_cifar):
    """A disk so slow that no checkpoint write ends within the stop's bound (each waits 60 s,
    ``SWEEP_STOP_S`` is 3): SIGTERM once the trial reported an epoch (a write of it waits). The
    trial is failed and re-enqueued first, so its retry is there although the flush never
    finished (the flush used to come first, and the bound's timer exited before the retry).

    Then a directory stands where its file would be, and beside it a stale temporary that
    cannot be removed (a non-empty directory, as another user's file in a sticky /scratch).
    The retry restarts from step 0 with one line naming the file and the cause, the temporary
    is one warning, and the trial completes."""
    study, db = _study(tmp_path, trials=1, epochs=3, fuse=1), tmp_path / "sweep.db"
    first = _launch(tmp_path, study, tiny_cifar, SWEEP_STOP_S="3",
                    SWEEP_CHECKPOINT_WRITE_DELAY_S="60")
    _wait_sql(db, first, "SELECT count(*) FROM trial_intermediate_values",
              lambda rows: rows[0][0] >= 1)
    first.send_signal(signal.SIGTERM)
    _finish(first, 128 + signal.SIGTERM)
    assert _sql(db, "SELECT number, state FROM trials ORDER BY number") == [
        (0, "FAIL"), (1, "WAITING")]
    assert _retries(db) == [0]

    url = f"sqlite:///{db}"
    path = CheckpointDir(tmp_path / "sweep-checkpoints", "", "cpu", storage_key(url)).path(
        optuna.load_study(study_name="life", storage=url), 0)
    assert not path.exists()  # never written: the disk was slower than the stop
    (path / "inside").mkdir(parents=True)
    stale = path.parent / ".trial-0.pt.node.1.abc.tmp"
    (stale / "inside").mkdir(parents=True)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    err = _finish(_launch(tmp_path, study, tiny_cifar))
    assert _sql(db, "SELECT number, state FROM trials ORDER BY number") == [
        (0, "FAIL"), (1, "COMPLETE")]
    assert f"trial 1 (a retry of trial 0): checkpoint {path} cannot be opened (not a regular " \
           f"file); it restarts from step 0" in err.splitlines()
    assert [ln for ln in err.splitlines() if ln.startswith(f"warning: stale temporary {stale} ")]
    assert _attr(db, 1, "resumed_epochs") is None
    run = _attr(db, 1, "mlflow_run_id").strip('"')
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:  # every step once, from step 0
        steps = conn.execute("SELECT step, count(*) FROM metrics WHERE run_uuid = ? AND key = "
                             "'lr' GROUP BY step", (run,)).fetchall()
    assert steps == [(step, 1) for step in range(3 * 2)]


_PACK_FAULT = '''
import os
if os.environ.get("SWEEP_TEST_PACK_FAULT"):  # the whole pack fails once, at its second epoch
    import sweep.training.fused_pack as fused_pack
    _run_epoch, _epochs = fused_pack.Pack.run_epoch, []

    def run_epoch(self, guards, pack_step):
        _epochs.append(pack_step)
        if len(_epochs) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return _run_epoch(self, guards, pack_step)

    fused_pack.Pack.run_epoch = run_epoch
'''


@pytest.mark.slow
def test_a_failed_pack_re_enqueues_its_slots_to_resume(tmp_path, tiny_cifar):
    """The whole pack of 2 fails in its second epoch (a CUDA error, raised by a
    ``sitecustomize`` on the worker's path): both trials are re-enqueued, not failed, and their
    retries resume from the checkpoint of the first epoch and complete."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_PACK_FAULT)
    db = tmp_path / "sweep.db"
    proc = _launch(tmp_path, _study(tmp_path, trials=2, epochs=3, fuse=2), tiny_cifar,
                   SWEEP_TEST_PACK_FAULT="1")
    err = _finish(proc)
    assert _sql(db, "SELECT number, state FROM trials ORDER BY number") == [
        (0, "FAIL"), (1, "FAIL"), (2, "COMPLETE"), (3, "COMPLETE")]
    assert _retries(db) == [0, 1]
    (line,) = [ln for ln in err.splitlines() if "the pack of 2 trial(s) failed" in ln]
    assert "RuntimeError: CUDA error" in line
    for retry in (2, 3):
        assert _attr(db, retry, "resumed_epochs") == "1"
