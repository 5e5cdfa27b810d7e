"""The spool at its edges (issue 33): a folder whose file system refuses ``flock`` (NFS without
lockd: ``ENOLCK``) through a real store outage; two replays and a status at once; a torn append
(a segment cut mid-record, and ``ulimit -f``); a COMPLETE trial whose worker was killed before
its points were stored; one spool for every spelling of a store's URL and every working folder.

Real processes and stores: sweep code runs in subprocesses, the outage is a SQLite store held by
another connection's ``BEGIN EXCLUSIVE``, the missing ``flock`` is a ``sitecustomize`` that makes
``fcntl.flock`` raise ``ENOLCK`` for files in the spool folder only (as such a mount does).
Points are counted with ``sqlite3`` on the store's file, spool files with ``helpers.spool_records``.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import (REPO, has_trials, plain_storage, spool_records, sweep_cmd, sweep_env,
                     wait_running)

NO_FLOCK = textwrap.dedent("""
    # Injected by tests/test_spool_edges.py: the spool folder's file system has no flock.
    import errno, fcntl, os
    _flock, _folder = fcntl.flock, os.environ["NO_FLOCK_UNDER"]
    def _refused(fd, operation):
        fileno = fd if isinstance(fd, int) else fd.fileno()
        if os.readlink(f"/proc/self/fd/{fileno}").startswith(_folder):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return _flock(fd, operation)
    fcntl.flock = _refused
""")


def _env(tmp_path: Path, spool: Path | None) -> dict:
    """A sweep subprocess's environment; ``spool``: a folder whose flock raises ENOLCK."""
    env = sweep_env(tmp_path)
    if spool is not None:
        inject = tmp_path / "no-flock"
        inject.mkdir(exist_ok=True)
        (inject / "sitecustomize.py").write_text(NO_FLOCK)
        env["PYTHONPATH"] = f"{inject}:{REPO}"
        env["NO_FLOCK_UNDER"] = str(spool)
    return env


def _python(code: str, env: dict, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _rows(db: Path) -> dict[str, tuple[int, int]]:
    """run -> (metric rows, distinct (key, step)), read with sqlite3 itself."""
    with sqlite3.connect(db) as conn:
        return {run: (n, d) for run, n, d in conn.execute(
            "SELECT run_uuid, count(*), count(DISTINCT key || ':' || step) FROM metrics "
            "GROUP BY run_uuid")}


def _status(db: Path, run_id: str) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()[0]


def _runs(uri: str, n: int) -> list[str]:
    from sweep.record import Tracker

    tracker = Tracker(uri)
    experiment_id = tracker.experiment_id("edges")
    parent = tracker.study_run(experiment_id, "edges", {}, None)
    ids = [tracker.start_trial(experiment_id, parent, "edges", i, {}, {}).run_id
           for i in range(n)]
    tracker.close()
    return ids


# A worker's record in a child process: 400 steps of one run (800 points), then its end; with
# ``die`` it is killed (SIGKILL) once everything sits in the spool, before it closes anything.
FEED = """
    import os, signal, sys
    from sweep.record import Tracker, TrialRun
    uri, run_id, die = sys.argv[1], sys.argv[2], sys.argv[3] == "die"
    tracker = Tracker(uri)
    run = TrialRun(tracker, run_id)
    print("ready", flush=True)
    sys.stdin.readline()  # the store is locked now
    for first in range(0, 400, 50):
        run.on_steps(first, [0.1] * 50, [1.0 + 0.001 * (first + j) for j in range(50)])
    run.finish("FINISHED", curve_png=False)
    tracker.wait()
    writer = tracker.process.started
    print("spooled", writer.spooled, "lost", writer.lost, flush=True)
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    tracker.close()
"""


def test_without_flock_a_store_outage_spools_where_replay_looks_and_every_point_arrives(
        tmp_path):
    """The spool folder refuses flock (ENOLCK) and the MLflow store is held by another
    process's BEGIN EXCLUSIVE: two workers spool (one exits, one is killed with SIGKILL), both
    segments are named ``*.jsonl`` (none hidden), a status counts every point, and a replay in
    a process without flock stores each point once and ends both runs."""
    from sweep.record import pending, spool_dir

    uri = f"sqlite:///{tmp_path}/m.db"
    runs = _runs(uri, 2)
    spool = spool_dir(uri)
    env = dict(_env(tmp_path, spool), SWEEP_SPOOL_AFTER_S="0")
    feeders = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(FEED), uri, run_id, how],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
               for run_id, how in zip(runs, ("exit", "die"))]
    lock = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        for child in feeders:  # connected to the store while it was there
            assert child.stdout.readline() == "ready\n", child.communicate(timeout=60)
        lock.execute("BEGIN EXCLUSIVE")  # the outage
        for child in feeders:
            child.stdin.write("go\n")
            child.stdin.flush()
        said = [child.communicate(timeout=300) for child in feeders]
    finally:
        lock.close()  # rolls the held transaction back
        for child in feeders:
            if child.poll() is None:
                child.kill()
    assert feeders[0].returncode == 0, said[0][1][-3000:]
    assert feeders[1].returncode == -signal.SIGKILL, said[1][1][-3000:]
    for out, err in said:
        assert "spooled 800 lost 0" in out, out + err[-3000:]
    assert not list(spool.glob(".*.tmp"))  # nothing where replay does not look
    segments = sorted(spool.glob("*.jsonl"))
    assert len(segments) == 2
    assert sorted(p.suffix for p in spool.glob("*.live")) == [".live"]  # the killed one's marker
    on_disk = [r for path in segments for r in spool_records(path)]
    assert sum(len(r.get("metrics", ())) for r in on_disk) == 1600
    waiting = pending(uri)  # a status: no lock taken, the killed writer is seen as gone
    assert waiting.total == 1600 and waiting.ends == set(runs) and waiting.live == 0

    replayed = _python("""
        import sys
        from mlflow.tracking import MlflowClient
        from sweep.record import replay
        print(replay(sys.argv[1], MlflowClient(sys.argv[1])))
    """, env, args=[uri])
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert replayed.stdout.strip() == "(1600, [])", replayed.stdout
    assert _rows(tmp_path / "m.db") == {run_id: (800, 800) for run_id in runs}
    assert all(_status(tmp_path / "m.db", run_id) == "FINISHED" for run_id in runs)
    assert not list(spool.glob("*.jsonl")) and not list(spool.glob("*.live"))
    assert not pending(uri).waiting


REPLAYER = """
    import sys
    from mlflow.tracking import MlflowClient
    from sweep.record import replay
    sys.stdin.readline()  # every process starts its work at once
    print(replay(sys.argv[1], MlflowClient(sys.argv[1])), flush=True)
"""
READER = """
    import pathlib, sys
    from sweep.record import pending
    sys.stdin.readline()
    reads = 0
    while reads < 2000 and any(pathlib.Path(sys.argv[2]).glob("*.jsonl")):
        pending(sys.argv[1])  # must neither crash nor make a replay skip a segment
        reads += 1
    print("reads", reads, flush=True)
"""


@pytest.mark.parametrize("locks", ["flock", "lock files"])
def test_two_replays_and_a_status_at_once_store_every_point_once(tmp_path, locks):
    """Eight hosts' segments; two replaying processes and one reading ``pending`` in a loop,
    started together: every point stored once, every segment taken (none skipped), the
    reader never crashed. Also with the lock files a folder without flock gets."""
    from sweep.record import SpoolWriter, spool_dir

    uri = f"sqlite:///{tmp_path}/m.db"
    runs = _runs(uri, 8)
    spool = spool_dir(uri)
    for i, run_id in enumerate(runs):
        writer = SpoolWriter(spool, uri, host=f"node-{i}")
        writer.append([{"run": run_id, "metrics": [["lr", 0.1, 1_700_000_000_000 + s, s]
                                                    for s in range(300)]}])
        writer.append([{"run": run_id, "end": "FINISHED", "end_time": 1_700_000_100_000,
                        "tags": {}}])
        writer.close()
    env = _env(tmp_path, spool if locks == "lock files" else None)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), uri, str(spool)],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for code in (READER, REPLAYER, REPLAYER)]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    said = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, said):
        assert proc.returncode == 0, err[-3000:]
    sent = [ast.literal_eval(out.strip()) for out, _ in said[1:]]  # (points, problems) per replayer
    assert sum(n for n, _ in sent) == 8 * 300 and all(p == [] for _, p in sent)
    assert _rows(tmp_path / "m.db") == {run_id: (300, 300) for run_id in runs}
    assert all(_status(tmp_path / "m.db", run_id) == "FINISHED" for run_id in runs)
    assert not list(spool.glob("*.jsonl"))  # no replay skipped a segment
    assert not list(spool.glob("*.claim"))


def test_a_torn_segment_replays_its_whole_records_and_is_moved_aside_and_named(tmp_path):
    """A segment cut mid-record (a node dying mid-write), holding a line of the format before
    framing too: the whole records replay, the segment moves to ``damaged/``, and both the
    replay and ``sweep status``'s check name it (the record is incomplete until a person
    removes it)."""
    from sweep.record import SpoolWriter, check_completeness, pending, replay, spool_dir
    from sweep.record import Tracker

    uri = f"sqlite:///{tmp_path}/m.db"
    old, whole, torn = _runs(uri, 3)
    writer = SpoolWriter(spool_dir(uri), uri)
    writer.append([{"run": whole, "metrics": [["lr", 0.2, 1_700_000_000_000 + s, s]
                                              for s in range(100)]}])
    writer.close()
    segment = writer.path
    line = json.dumps({"run": torn, "metrics": [["lr", 0.4, 1_700_000_000_000 + s, s]
                                                for s in range(50)]}).encode()
    with open(segment, "ab") as f:
        # a record as spools wrote them before framing, then one cut in the middle of its line
        f.write(json.dumps({"run": old, "metrics": [["lr", 0.3, 1_700_000_000_000, 0]]}).encode()
                + b"\n" + line[:len(line) // 2])
    assert pending(uri).unreadable  # named before the replay already

    sent, problems = replay(uri, MlflowClient(uri))
    assert sent == 101
    moved = spool_dir(uri) / "damaged" / segment.name
    assert problems == [f"{segment}: 1 line(s) cannot be read (an append cut short); its 2 "
                        f"whole record(s) are stored and the segment moved aside to {moved}"]
    assert moved.is_file() and not segment.exists()
    assert _rows(tmp_path / "m.db") == {whole: (100, 100), old: (1, 1)}
    record = check_completeness(Tracker(uri), None)
    assert str(moved) in record.spool.unreadable and not record.complete
    assert any(str(moved) in line for line in record.lines("edges"))


def test_an_append_cut_by_ulimit_f_raises_and_leaves_only_whole_records(tmp_path):
    """``ulimit -f`` a little above the segment's size: the append that does not fit raises
    (EFBIG) and the file is cut back to its last whole record; the next one that fits is
    appended whole. Read back independently: every record whole, none torn."""
    from sweep.record import spool_dir

    uri = f"sqlite:///{tmp_path}/m.db"
    child = _python("""
        import resource, sys
        from pathlib import Path
        from sweep.record import SpoolWriter
        uri, folder = sys.argv[1], Path(sys.argv[2])
        writer = SpoolWriter(folder, uri)
        small = [{"run": "a", "metrics": [["lr", 0.1, 1, s] for s in range(10)]}]
        writer.append(small)
        size = writer.path.stat().st_size
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 3 * size // 2, resource.RLIM_INFINITY))
        try:
            writer.append([{"run": "b", "metrics": [["lr", 0.1, 1, s] for s in range(1000)]}])
        except OSError as err:
            print("refused", err.errno, writer.path.stat().st_size == size, flush=True)
        writer.append(small)
        writer.close()
        print("path", writer.path)
    """, sweep_env(tmp_path), args=[uri, str(spool_dir(uri))])
    assert child.returncode == 0, child.stderr[-3000:]
    assert f"refused {errno.EFBIG} True" in child.stdout, child.stdout
    path = Path(child.stdout.split("path ", 1)[1].strip())
    records = spool_records(path)
    assert [r["run"] for r in records] == ["a", "a"]
    assert path.read_bytes().count(b"\n") == 2  # nothing torn between or after them


@pytest.mark.slow
def test_a_complete_trial_killed_before_its_points_were_stored_fails_status(tmp_path,
                                                                            tiny_cifar):
    """The MLflow store is held by BEGIN EXCLUSIVE while trial 0 trains: Optuna hears COMPLETE,
    the points wait in the writer's memory, and the launch is killed (SIGKILL). After a repair
    ends the run (FINISHED, sweep.state=COMPLETE, no count), ``sweep status`` exits 3 and names
    the trial and its run."""
    from sweep.record import Tracker, check_completeness

    smoke = REPO / "studies" / "smoke.yaml"
    small = ("--set", "data.train_size=100", "--set", "data.val_size=40", "--set",
             "data.test_size=40", "--set", "train.batch_size=25", "--set", "train.epochs=6")
    storage = f"sqlite:///{tmp_path}/sweep.db"
    env = sweep_env(tiny_cifar)
    proc = subprocess.Popen(sweep_cmd("launch", "--study", str(smoke), "--trials", "2", "--quiet",
                                      *small), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = None
    try:
        deadline = time.time() + 300
        while not has_trials(tmp_path / "sweep.db") and time.time() < deadline:
            time.sleep(0.1)
        trial = wait_running(plain_storage(storage), "smoke", set(), deadline)
        run_id = trial.user_attrs["mlflow_run_id"]
        # Locked as soon as the run exists: 24 steps (over a second on an idle 2-core machine) are
        # left to train, so the run's end (queued after the trial's COMPLETE) never gets in.
        lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, timeout=60)
        lock.execute("BEGIN EXCLUSIVE")  # from here on the writer stores nothing
        while time.time() < deadline:
            study = optuna.load_study(study_name="smoke", storage=plain_storage(storage))
            if study.trials[trial.number].state == TrialState.COMPLETE:
                break
            time.sleep(0.1)
        assert study.trials[trial.number].state == TrialState.COMPLETE
    finally:
        proc.kill()  # SIGKILL: what the writer held in memory is gone
        proc.wait()
        if lock is not None:
            lock.rollback()
            lock.close()
    repaired = subprocess.run(sweep_cmd("status", "--study", "smoke", "--repair", "--json"),
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:
        held = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = ?",
                            (run_id,)).fetchone()[0]
        state = conn.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = 'sweep.state'",
                             (run_id,)).fetchone()[0]
    assert state == "COMPLETE"  # the repair ended the run as its trial finished
    assert repaired.returncode == 3, repaired.stdout + repaired.stderr[-2000:]
    lost = json.loads(repaired.stdout)["mlflow"]["finished_without_count"]
    assert lost == [{"trial": trial.number, "run_id": run_id, "points": held,
                     "state": "COMPLETE"}]
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")  # the text `sweep status` prints
    lines = check_completeness(tracker, tracker.experiment_id("smoke", create=False)).lines()
    assert any(line.startswith(f"MLflow: COMPLETE trial #{trial.number} run {run_id} holds "
                               f"only {held} point(s)") for line in lines), lines


def test_every_spelling_of_a_server_url_and_every_folder_see_one_spool(tmp_path, monkeypatch):
    """Points spooled for ``http://Tracking.example:5000/`` from one folder are what a status in
    another folder, without SWEEP_SPOOL_DIR, sees for ``http://tracking.example:5000``: the
    folder comes from the store's identity and the per-user cache, never the working folder;
    no credential is in its name or its STORE note."""
    from sweep.record import SpoolWriter, pending, spool_dir

    monkeypatch.delenv("SWEEP_SPOOL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    spelled = "http://user:s3cret@Tracking.example:5000/"
    writer = SpoolWriter(spool_dir(spelled), spelled)
    writer.append([{"run": "r1", "metrics": [["lr", 0.1, 1, 0], ["lr", 0.1, 2, 1]]}])
    writer.close()
    monkeypatch.chdir(tmp_path / "b")
    seen = pending("http://tracking.example:5000")
    assert seen.total == 2 and seen.folder == writer.folder
    assert seen.folder.parent == tmp_path / "cache" / "sweep" / "spool"
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())
    assert "s3cret" not in (seen.folder / "STORE").read_text()
    assert spool_dir("postgresql+psycopg2://u:pw@DB:5432/sweep") == spool_dir(
        "postgresql://other@db/sweep")


def test_without_flock_a_dead_replayers_claim_is_broken_and_a_live_ones_is_respected(
        tmp_path, monkeypatch):
    """Lock files (this process's flock raises ENOLCK in the spool folder): a segment whose
    claim and writer's marker name a process that is gone is replayed; one claimed by a live
    process (this one) is left alone, as is one whose writer's marker is fresh on another
    host."""
    import errno as errnos
    import fcntl
    import socket

    from sweep.record import SpoolWriter, pending, replay, spool_dir

    uri = f"sqlite:///{tmp_path}/m.db"
    dead_claim, live_claim, other_host = _runs(uri, 3)
    spool = spool_dir(uri)
    real = fcntl.flock

    def refused(fd, operation):
        fileno = fd if isinstance(fd, int) else fd.fileno()
        if Path(f"/proc/self/fd/{fileno}").readlink().is_relative_to(spool):
            raise OSError(errnos.ENOLCK, "No locks available")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", refused)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = {"host": socket.gethostname(), "pid": int(gone.stdout), "locks": "files"}
    segments = {}
    for run_id in (dead_claim, live_claim, other_host):
        writer = SpoolWriter(spool, uri, host=f"h{run_id[:6]}")
        writer.append([{"run": run_id, "metrics": [["lr", 0.5, 1_700_000_000_000, 0]]}])
        writer.close()
        segments[run_id] = writer.path
    notes = {segments[dead_claim].with_suffix(".claim"): dead,
             segments[dead_claim].with_suffix(".live"): dead,
             segments[live_claim].with_suffix(".claim"): {**dead, "pid": os.getpid()},
             segments[other_host].with_suffix(".live"): {**dead, "host": "node-elsewhere"}}
    for path, note in notes.items():
        path.write_text(json.dumps(note))
    assert pending(uri).live == 1  # the fresh marker of another host's writer
    assert replay(uri, MlflowClient(uri)) == (1, [])
    assert _rows(tmp_path / "m.db") == {dead_claim: (1, 1)}
    assert not segments[dead_claim].exists() and segments[live_claim].exists()
    assert segments[other_host].exists()
