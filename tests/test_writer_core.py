"""The metric writer's thread-free core (``sweep.record.writer_core``) under a fake clock: no
thread, no sleep. The store is a callable the core is handed (a small in-memory store that can
refuse, or a real MLflow SQLite store through ``log_batch``); the spool is a real segment on
disk, read back here with ``json`` line by line, not through the spool's own reader.
"""

from __future__ import annotations

import collections
import errno
import json
import sqlite3
from pathlib import Path

import pytest

from sweep.record import SpoolWriter
from sweep.record.writer_core import FIRST_BACKOFF_S, MAX_BACKOFF_S, WriterCore
from sweep.record.writer_work import Drain, RunEnd


class Store:
    """A store that takes every write, or refuses every one while ``down``."""

    def __init__(self):
        self.points: dict[str, int] = collections.Counter()
        self.ends: dict[str, str] = {}
        self.down = False

    def send(self, run_id: str, points: list) -> None:
        if self.down:
            raise ConnectionError("connection refused")
        self.points[run_id] += len(points)

    def finish(self, end: RunEnd) -> None:
        if self.down:
            raise ConnectionError("connection refused")
        self.ends[end.run_id] = end.status


class FullDisk(SpoolWriter):
    """A real spool segment whose disk is full while ``full`` (ENOSPC, as a full file system
    answers; ``tests/test_record_stop.py`` fills a real one)."""

    full = False

    def append(self, records: list[dict]) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().append(records)


def _points(n: int, first_step: int = 0) -> list:
    return [("lr", 0.1, 1_700_000_000_000 + s, s) for s in range(first_step, first_step + n)]


def _spooled(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Points per run and end statuses in the spool's segments, read line by line."""
    points, ends = collections.Counter(), {}
    for path in folder.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "metrics" in record:
                points[record["run"]] += len(record["metrics"])
            else:
                ends[record["run"]] = record["end"]
    return points, ends


def _core(tmp_path, store, **kw) -> tuple[WriterCore, list[str]]:
    lines: list[str] = []
    spool = SpoolWriter(tmp_path / "spool", "sqlite:///unused.db", host="test")
    options = dict(spool_after_s=60.0, backlog_cap=100_000, warn=lines.append)
    options.update(kw)
    return WriterCore(store.send, store.finish, spool, **options), lines


def _run_until(core: WriterCore, now: float, until: float) -> tuple[float, list[float]]:
    """Step the core as its thread would, sleeping on the fake clock, until ``until``;
    returns the clock and the waits it asked for."""
    waits = []
    while now < until:
        core.step(now)
        wait = core.wait_s(now)
        waits.append(wait)
        now += wait
    return now, waits


def test_a_store_refusing_for_60_s_is_retried_with_backoff_then_the_points_spool(tmp_path):
    store = Store()
    store.down = True
    core, lines = _core(tmp_path, store)
    core.feed([("a", _points(2500)), ("b", _points(300))])
    now, waits = _run_until(core, 0.0, 59.9)
    assert core.refusing and _spooled(tmp_path / "spool") == ({}, {})  # nothing before 60 s
    expected, wait = [], FIRST_BACKOFF_S  # the backoff, written out: 0.2 s doubling to 5 s
    while sum(expected) < 59.9:
        expected.append(wait)
        wait = min(wait * 2, MAX_BACKOFF_S)
    assert waits == pytest.approx(expected)
    assert len([line for line in lines if "refused a write" in line]) == 1

    now, _ = _run_until(core, now, 60.0 + MAX_BACKOFF_S)
    assert _spooled(tmp_path / "spool") == ({"a": 2500, "b": 300}, {})
    assert core.spooled == 2800 and not core.pending and core.stored == 0
    end = RunEnd("a", "FINISHED", {"sweep.state": "COMPLETE"}, 1)
    core.feed([("a", _points(40, 2500)), ("b", _points(10, 300)), end])
    now, _ = _run_until(core, now, now + MAX_BACKOFF_S)  # the next try, at most 5 s on
    # still down: the new points and a's end go straight to the spool
    assert end.done.is_set() and end.spooled
    assert _spooled(tmp_path / "spool") == ({"a": 2540, "b": 310}, {"a": "FINISHED"})

    store.down = False  # back: the next try is accepted, b's later points go to the store
    core.feed([("b", _points(5, 310))])
    now, _ = _run_until(core, now, now + MAX_BACKOFF_S + 1)
    assert not core.refusing and store.points == {"b": 5}
    assert any("takes writes again" in line for line in lines)
    b_end = RunEnd("b", "KILLED", {}, 2)
    core.feed([b_end])
    core.step(now)
    assert b_end.spooled  # b has points in the spool: its end follows them there
    assert store.ends == {} and _spooled(tmp_path / "spool")[1] == {"a": "FINISHED", "b": "KILLED"}


def test_the_backlog_cap_spools_what_the_store_has_not_taken_yet(tmp_path):
    store = Store()
    core, lines = _core(tmp_path, store, backlog_cap=1000)
    core.feed([("a", _points(600)), ("b", _points(400))])
    core.enforce_cap(0.0)
    assert core.backlog == 1000 and _spooled(tmp_path / "spool") == ({}, {})  # at the cap: kept
    core.feed([("a", _points(1, 600))])
    core.enforce_cap(0.0)
    assert _spooled(tmp_path / "spool") == ({"a": 601, "b": 400}, {})
    assert core.backlog == 0 and not core.pending and core.spooled == 1001
    assert len([line for line in lines if "more slowly than they come" in line]) == 1
    end = RunEnd("a", "FINISHED", {}, 1)
    core.feed([("a", _points(5, 601)), end])
    core.step(0.0)
    assert store.points == {"a": 5} and end.spooled  # a's end follows its spooled points
    assert _spooled(tmp_path / "spool")[1] == {"a": "FINISHED"}


def test_a_drain_waits_for_every_point_and_end_before_it(tmp_path):
    store = Store()
    core, _ = _core(tmp_path, store)
    mark = Drain()
    core.feed([("a", _points(1500)), RunEnd("a", "FINISHED", {}, 1), mark])
    store.down = True
    core.step(0.0)
    assert not mark.done.is_set() and core.wait_s(0.0) == pytest.approx(FIRST_BACKOFF_S)
    store.down = False
    core.step(FIRST_BACKOFF_S)
    assert mark.done.is_set() and store.points == {"a": 1500} and store.ends == {"a": "FINISHED"}
    assert core.idle and core.wait_s(1.0) == 1.0  # nothing queued: the next flush


@pytest.fixture
def mlflow_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("core")
    return client, experiment, tmp_path / "mlflow.db"


def test_a_run_the_store_will_never_take_is_set_aside_while_another_flows(tmp_path, mlflow_store):
    """A real MLflow SQLite store: run ``gone`` deleted through MLflow's API; its points and end
    are set aside with MLflow's reason, ``live``'s points and end are stored (counted with SQL)."""
    from sweep.record.batch import metric_sender, run_finisher

    client, experiment, db = mlflow_store
    live = client.create_run(experiment).info.run_id
    gone = client.create_run(experiment).info.run_id
    client.delete_run(gone)
    lines: list[str] = []
    spool = SpoolWriter(tmp_path / "spool", f"sqlite:///{db}", host="test")
    core = WriterCore(metric_sender(client), run_finisher(client), spool, spool_after_s=60.0,
                      backlog_cap=100_000, warn=lines.append)
    gone_end, live_end = RunEnd(gone, "FINISHED", {}, 1), RunEnd(live, "FINISHED", {}, 1)
    core.feed([(gone, _points(1200)), (live, _points(1200)), gone_end, live_end])
    core.step(0.0)
    assert not core.refusing and core.idle
    assert gone_end.done.is_set() and live_end.done.is_set() and not live_end.spooled
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT run_uuid, count(*) FROM metrics GROUP BY run_uuid"))
        status = dict(conn.execute("SELECT run_uuid, status FROM runs"))
    assert rows == {live: 1200} and status[live] == "FINISHED"
    aside = [json.loads(line) for path in (tmp_path / "spool" / "set-aside").glob("*.jsonl")
             for line in path.read_text().splitlines()]
    assert sum(len(r.get("metrics", ())) for r in aside) == 1200
    assert {r["run"] for r in aside} == {gone} and all(r["reason"] for r in aside)
    assert len([line for line in lines if "will never take" in line]) == 1


def test_a_full_disk_in_an_outage_is_warned_once_never_spins_and_memory_stays_at_the_cap(tmp_path):
    store = Store()
    store.down = True
    spool = FullDisk(tmp_path / "spool", "sqlite:///unused.db", host="test")
    spool.full = True
    lines: list[str] = []
    core = WriterCore(store.send, store.finish, spool, spool_after_s=0.0, backlog_cap=2000,
                      warn=lines.append)
    end = RunEnd("a", "FINISHED", {}, 1)
    core.feed([("a", _points(1500)), end])
    now, waits = _run_until(core, 0.0, 120.0)
    assert min(waits) > 0 and len(waits) < 40  # backing off, never spinning
    assert len([line for line in lines if "cannot spool" in line]) == 1
    assert core.backlog == 1500 and not end.done.is_set() and core.lost == 0  # kept in memory
    core.feed([("a", _points(1000, 1500)), ("b", _points(300))])
    core.enforce_cap(now)
    assert core.backlog == 2000 and core.lost == 800  # the newest beyond the cap, counted
    assert sum(len(p) for p in core.pending.values()) == 2000
    core.feed([("b", _points(400, 300))])  # a later batch of the same episode: counted, no line
    core.enforce_cap(now)
    assert core.backlog == 2000 and core.lost == 1200
    assert len([line for line in lines if "dropped" in line]) == 1
    spool.full = False  # space again: the next try spools what was kept, the end after it
    now, _ = _run_until(core, now, now + 2 * MAX_BACKOFF_S)
    assert end.done.is_set() and end.spooled
    points, ends = _spooled(tmp_path / "spool")
    assert sum(points.values()) == 2000 and ends == {"a": "FINISHED"}
    assert any("takes writes again" in line for line in lines)


def test_a_run_end_behind_spooled_points_waits_for_a_full_disk_without_spinning(tmp_path):
    """The store takes writes; a run's points went to the spool (the backlog cap), then the disk
    fills: its end waits for the disk on the disk's backoff, with one warning line."""
    store = Store()
    spool = FullDisk(tmp_path / "spool", "sqlite:///unused.db", host="test")
    lines: list[str] = []
    core = WriterCore(store.send, store.finish, spool, spool_after_s=60.0, backlog_cap=1000,
                      warn=lines.append)
    core.feed([("a", _points(1001))])
    core.enforce_cap(0.0)
    spool.full = True
    end = RunEnd("a", "FINISHED", {}, 1)
    core.feed([end])
    now, waits = _run_until(core, 0.0, 60.0)
    assert min(waits) > 0 and len(waits) < 30 and not end.done.is_set()
    assert len([line for line in lines if "cannot spool" in line]) == 1
    spool.full = False
    _run_until(core, now, now + MAX_BACKOFF_S + 1)
    assert end.spooled and store.ends == {} and _spooled(tmp_path / "spool")[1] == {"a": "FINISHED"}


def test_a_set_aside_run_is_warned_once_and_not_sent_again(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    class Refusing(Store):
        tries = 0

        def send(self, run_id, points):
            if run_id == "gone":
                self.tries += 1
                raise MlflowException(f"Run '{run_id}' not found",
                                      error_code=RESOURCE_DOES_NOT_EXIST)
            super().send(run_id, points)

    store = Refusing()
    core, lines = _core(tmp_path, store)
    for second in range(5):  # five flushes of a trial whose run was deleted in the UI
        core.feed([("gone", _points(100, 100 * second)), ("live", _points(100, 100 * second))])
        core.step(float(second))
    assert store.tries == 1 and store.points == {"live": 500} and core.set_aside == 500
    assert len([line for line in lines if "will never take" in line]) == 1


def test_a_store_call_that_never_returns_bounds_memory_at_the_point_of_entry(tmp_path,
                                                                             monkeypatch):
    """The shell (``MetricWriter``) over a store whose call hangs: once the inbox holds the cap,
    ``put_many`` spools what comes from the training thread; a full disk then counts it lost."""
    import threading

    from sweep.record.metric_writer import MetricWriter

    monkeypatch.setenv("SWEEP_BACKLOG_POINTS", "1000")
    entered, release = threading.Event(), threading.Event()

    def hung(run_id, points):  # a PostgreSQL call over a half-open connection
        entered.set()
        release.wait()

    lines: list[str] = []
    spool = FullDisk(tmp_path / "spool", "sqlite:///unused.db", host="test")
    writer = MetricWriter(None, spool, warn=lines.append, send=hung)
    try:
        writer.put_many("a", _points(500))
        writer.drain(0.0)  # wakes the thread, which takes the 500 and hangs in the store
        assert entered.wait(60)
        for first in range(500, 3500, 500):
            writer.put_many("a", _points(500, first))
        assert writer.queued <= 1000 + 500  # the hung chunk and a full inbox, no more
        assert _spooled(tmp_path / "spool")[0] == {"a": 2000} and writer.spooled == 2000
        spool.full = True
        writer.put_many("a", _points(500, 3500))
        assert writer.lost == 500
        assert len([line for line in lines if "has not returned" in line]) == 1
    finally:
        release.set()
        spool.full = False
        writer.close()


def test_the_postgresql_client_has_keepalives_and_a_statement_timeout(postgres_server):
    """A hung PostgreSQL becomes an outage: the record's connections carry TCP keepalives and a
    statement timeout, read back from the server and the driver."""
    from sweep.record import Tracker

    tracker = Tracker(postgres_server[1])
    engine = tracker.client._tracking_client.store.engine
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1min"
        dsn = conn.connection.driver_connection.info.dsn
    assert "keepalives=1" in dsn and "keepalives_idle=30" in dsn
    assert tracker.uri == postgres_server[1]  # the spool's identity keeps the user's URL


def test_credentials_refused_spool_at_once_in_one_line_and_the_store_is_tried_again(tmp_path):
    """HTTP 401 (an MlflowException with the code MLflow gives a 401): everything pending and
    the run's end go to the spool at the first refusal, not after 60 s; one line, however many
    refusals; nothing set aside or lost; the first accepted write ends the episode."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import UNAUTHENTICATED

    class Gate(Store):
        refusal = None

        def send(self, run_id, points):
            if self.refusal is not None:
                raise self.refusal
            super().send(run_id, points)

        def finish(self, end):
            if self.refusal is not None:
                raise self.refusal
            super().finish(end)

    store = Gate()
    store.refusal = MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-batch "
                                    "failed with error code 401 != 200. Response body: 'expired'",
                                    error_code=UNAUTHENTICATED)
    core, lines = _core(tmp_path, store)
    end = RunEnd("a", "FINISHED", {}, 1)
    core.feed([("a", _points(1500)), end])
    core.step(0.0)
    assert end.done.is_set() and end.spooled
    assert _spooled(tmp_path / "spool") == ({"a": 1500}, {"a": "FINISHED"})
    now = 0.0
    for second in range(1, 31):  # 30 s more of refusals: each batch spooled, no new line
        core.feed([("b", _points(10, 10 * second))])
        now, _ = _run_until(core, now, float(second))
    assert _spooled(tmp_path / "spool")[0]["b"] + core.backlog == 300
    assert len([line for line in lines if "credentials" in line]) == 1 and len(lines) == 1
    assert "MLFLOW_TRACKING_TOKEN" in lines[0] and core.set_aside == 0 and core.lost == 0
    store.refusal = None
    core.feed([("c", _points(5))])
    _run_until(core, now, now + MAX_BACKOFF_S + 1)
    assert store.points["c"] == 5 and not core.refusing
    assert any("takes writes again" in line for line in lines)
