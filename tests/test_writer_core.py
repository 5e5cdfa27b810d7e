"""The metric writer's thread-free core (``sweep.record.writer_core``) under a fake clock: no
thread, no sleep. The store is a callable the core is handed (a small in-memory store that can
refuse, or a real MLflow SQLite store through ``log_batch``); the spool is a real segment on
disk, read back here with ``json`` line by line, not through the spool's own reader.
"""

from __future__ import annotations

import collections
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
    core.enforce_cap()
    assert core.backlog == 1000 and _spooled(tmp_path / "spool") == ({}, {})  # at the cap: kept
    core.feed([("a", _points(1, 600))])
    core.enforce_cap()
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
