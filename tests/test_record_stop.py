"""A stop's last words with real processes (issue 33, item 1): a process with 200,000 points
queued for an MLflow SQLite store that another process holds with ``BEGIN EXCLUSIVE`` gets
SIGTERM (and, in two cases, a second SIGTERM while its main thread spools). Whoever spools
finishes before the process exits; the exit line's counts are the spool's own, counted here
line by line with ``json``, and every point fed is in the spool or the store (SQL on the file).
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, spool_records

pytestmark = pytest.mark.slow

POINTS = 200_000
STOP_S = 4  # SWEEP_STOP_S: the drain gives up 2 s in, the timer fires at 3 s

# The body of a worker's stop, without the training: the command's BoundedStop with the
# tracker's last words, points queued, then the orderly path (settle_by the deadline) and a
# main thread that hangs after it (a store call that never returns), so the timer must end it.
CHILD = """
import sys, signal, threading
from sweep.base.stopping import BoundedStop
from sweep.record import Tracker

with BoundedStop() as stop:
    tracker = Tracker(sys.argv[1])
    stop.last_words = tracker.spool_now
    experiment_id = tracker.experiment_id("stop")
    run_id = tracker.client.create_run(experiment_id).info.run_id
    writer = tracker.writer  # started before the store is held, as in a worker
    print(run_id, flush=True)
    sys.stdin.readline()  # the test holds the store now
    for first in range(0, %d, 1000):
        writer.put_many(run_id, [("lr", 0.5, 1_700_000_000_000 + s, s)
                                 for s in range(first, first + 1000)])
    print("fed", flush=True)
    while stop.signum is None:
        signal.pause()
    tracker.settle_by(stop.deadline)
    threading.Event().wait()  # hung: the stop's timer ends the process
""" % POINTS


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An MLflow SQLite store created once (its migrations take seconds), copied per case."""
    from sweep.record import Tracker

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    Tracker(f"sqlite:///{db}").close()
    return db


def _spooled_steps(folder: Path) -> list[int]:
    steps = []
    for path in folder.glob("*.jsonl"):
        for record in spool_records(path):
            steps += [point[3] for point in record.get("metrics", ())]
    return steps


def _stopped_with_its_store_locked(tmp_path, template):
    """A child that queued ``POINTS`` points for a run while another process holds the run's
    SQLite store (``BEGIN EXCLUSIVE``), then got SIGTERM: ``(db, child, lock, run_id)``. The
    caller closes ``lock`` and reaps ``child``."""
    db = tmp_path / "mlflow.db"
    shutil.copy(template, db)
    env = {"SWEEP_STOP_S": str(STOP_S), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, f"sqlite:///{db}"], cwd=tmp_path,
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = sqlite3.connect(db, isolation_level=None, timeout=60)
    try:
        run_id = child.stdout.readline().strip()
        assert run_id, child.stderr.read()[-3000:]
        lock.execute("BEGIN EXCLUSIVE")  # another process holds the store from now on
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "fed"
        child.send_signal(signal.SIGTERM)
    except BaseException:
        lock.close()
        child.kill()
        child.wait()
        raise
    return db, child, lock, run_id


@pytest.mark.parametrize("second", [None, "at once", "while spooling"])
def test_a_stop_with_a_locked_store_and_a_large_backlog_spools_every_point(tmp_path, template,
                                                                           second):
    db, child, lock, run_id = _stopped_with_its_store_locked(tmp_path, template)
    try:
        if second == "at once":
            child.send_signal(signal.SIGTERM)
        elif second == "while spooling":
            # the segment appears when the spool write opens it, before its lines are written
            spool = db.with_name("mlflow.db.spool")
            while child.poll() is None and not list(spool.glob("*.jsonl")):
                time.sleep(0.005)
            child.send_signal(signal.SIGTERM)
        try:
            out, err = child.communicate(timeout=30)  # SLURM's KillWait
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            pytest.fail(f"still running 30 s after SIGTERM:\n{err[-3000:]}")
    finally:
        lock.close()
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    spooled = _spooled_steps(db.with_name("mlflow.db.spool"))
    with sqlite3.connect(db) as conn:
        stored = [s for (s,) in conn.execute("SELECT step FROM metrics WHERE run_uuid = ?",
                                             (run_id,))]
    assert set(spooled) | set(stored) == set(range(POINTS))  # nothing lost
    exit_line = out.strip().splitlines()[-1]
    assert exit_line.startswith("interrupted"), out[-2000:]
    assert f"{len(stored):,} point(s) stored, {len(spooled):,} spooled to " in exit_line, exit_line
    assert ", 0 lost" in exit_line and "had not finished" not in exit_line


@pytest.fixture
def full_spool(tmp_path):
    """``mlflow.db.spool`` as a 64 KiB tmpfs (a full disk for 200,000 points); needs root."""
    folder = tmp_path / "mlflow.db.spool"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_a_stop_onto_a_full_spool_disk_exits_in_time_and_counts_what_it_lost(tmp_path, template,
                                                                             full_spool):
    db, child, lock, run_id = _stopped_with_its_store_locked(tmp_path, template)
    try:
        out, err = child.communicate(timeout=30)  # within SLURM's KillWait, or it fails here
    finally:
        lock.close()
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err[-3000:]
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = ?",
                              (run_id,)).fetchone()[0]
    readable = _spooled_steps(full_spool)  # a torn last line is no point of anyone's
    exit_line = out.strip().splitlines()[-1]
    lost = POINTS - stored - len(set(readable))
    assert lost > 0 and f", {lost:,} lost" in exit_line, exit_line
    assert len([line for line in err.splitlines() if "cannot spool" in line]) == 1
