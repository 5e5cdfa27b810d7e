"""The metric writer's direct path into MLflow's SQL stores (``sql_metrics``) against MLflow's
own ``log_batch`` as the reference: the same points fed both ways into two runs of one real
store (SQLite, PostgreSQL) read back identically through MLflow's API (every history, the
latest value per key), and a chunk sent twice is stored once."""

from __future__ import annotations

import math

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from sweep.record import bulk_sender

# Steps out of order, a repeated step with another value, equal (step, ts) with other values:
# the cases MLflow's "latest metric" rule (step, then timestamp, then value) has to decide.
POINTS = [("lr", 0.1 * i, 1_700_000_000_000 + i, i) for i in range(300)] + \
         [("train_loss", 2.0 - i / 100, 1_700_000_000_000 + i, i) for i in range(299, -1, -1)] + \
         [("lr", 5.0, 1_700_000_000_000, 299), ("val_acc", 0.4, 7, 2), ("val_acc", 0.3, 7, 2),
          ("val_acc", 0.2, 9, 1)]


def _read(client, run_id):
    run = client.get_run(run_id)
    keys = sorted(run.data.metrics)
    history = {k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, k))
               for k in keys}
    return run.data.metrics, history


def _compare(uri):
    client = MlflowClient(uri)
    send = bulk_sender(client)
    assert send is not None
    experiment = client.create_experiment("fast")
    fast, reference = (client.create_run(experiment).info.run_id for _ in range(2))
    for start in range(0, len(POINTS), 250):  # in chunks, as the writer sends them
        send(fast, POINTS[start: start + 250])
        client.log_batch(reference, metrics=[Metric(*p[:2], p[2], p[3])
                                             for p in POINTS[start: start + 250]])
    send(fast, POINTS[:250])  # a replay of a stored chunk: nothing new
    latest, history = _read(client, fast)
    want_latest, want_history = _read(client, reference)
    assert history == want_history and sum(map(len, history.values())) == len(set(POINTS))
    assert latest == want_latest == {"lr": 0.1 * 299, "train_loss": 2.0 - 299 / 100, "val_acc": 0.4}

    nan = bulk_sender(client)  # a non-finite value takes MLflow's own path and encoding
    odd = client.create_run(experiment).info.run_id
    nan(odd, [("loss", math.nan, 1, 0), ("loss", 1.0, 2, 1)])
    assert [m.value for m in client.get_metric_history(odd, "loss")][1] == 1.0
    assert math.isnan(sorted(client.get_metric_history(odd, "loss"), key=lambda m: m.step)[0].value)


def test_direct_inserts_read_back_as_log_batch_on_sqlite(tmp_path):
    _compare(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_direct_inserts_read_back_as_log_batch_on_postgresql(postgres_server):
    _compare(postgres_server[1])


def test_a_tracking_server_gets_no_direct_path():
    assert bulk_sender(MlflowClient("http://127.0.0.1:9")) is None


def test_a_metrics_table_it_was_not_tested_with_falls_back_to_log_batch_with_one_warning(
        tmp_path):
    """A store whose ``metrics`` table differs from the tested one (here a column another tool
    added): no direct insert, one warning line, and the writer's points still arrive whole,
    through ``log_batch`` (counted with sqlite3)."""
    import sqlite3
    import time

    from sweep.record import Tracker

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("other")).info.run_id
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE metrics ADD COLUMN note TEXT")
    warned: list[str] = []
    assert bulk_sender(MlflowClient(uri), warn=warned.append) is None
    assert len(warned) == 1 and "\n" not in warned[0] and "log_batch" in warned[0] \
        and "note" in warned[0], warned
    tracker = Tracker(uri)
    tracker.writer.put_many(run_id, POINTS[:600])  # what a trial's run hands the writer
    assert tracker.writer.drain(time.monotonic() + 120)
    tracker.close()
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = ?",
                              (run_id,)).fetchone()[0]
    assert stored == 600
