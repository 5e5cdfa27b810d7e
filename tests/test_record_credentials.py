"""What each MLflow store error costs (issue 33, item 4): credentials refused (HTTP 401/403),
a proxy's 404/408/503 during a redeploy, PostgreSQL's read-only error during a failover, and a
run the store will never take, set aside and replayed once the cause is fixed.

Real processes and stores: a real ``mlflow server``, a small HTTP proxy written here (threads
and ``http.server``) in front of it that answers what the test says (401, 503, a proxy's HTML
404) or passes requests through, the suite's PostgreSQL, sweep workers as subprocesses. What
arrived is counted with MLflow's API on the server itself (not through the proxy) or with SQL on
the store's file, never from the writer's own counters.
"""

from __future__ import annotations

import http.client
import http.server
import json
import sqlite3
import subprocess
import threading
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import TINY, plain_storage, sweep_cmd, sweep_env
from sweep.loop.budget import budget_used, counted


class Proxy:
    """An HTTP proxy in front of ``target`` (``host:port``) on 127.0.0.1: ``mode`` is "pass",
    or an HTTP status it answers every request with (a plain-text body, as a load balancer or
    an auth gateway does, not MLflow's JSON). ``refuse_from`` (a substring of a request body)
    switches ``mode`` to ``refuse_with`` when a request holding it arrives. ``answered`` counts
    the statuses it sent."""

    def __init__(self, target: str):
        self.target, self.mode = target, "pass"
        self.refuse_from, self.refuse_with = None, "401"
        self.answered: dict[int, int] = {}
        self.seen = threading.Condition()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.refuse_from is not None and proxy.refuse_from.encode() in body:
                    proxy.mode, proxy.refuse_from = proxy.refuse_with, None
                mode = proxy.mode
                if mode == "pass":
                    conn = http.client.HTTPConnection(proxy.target, timeout=60)
                    # plain bodies: what is relayed is what was read
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "connection", "accept-encoding")}
                    conn.request(self.command, self.path, body, headers)
                    reply = conn.getresponse()
                    status, data = reply.status, reply.read()
                    kind = reply.getheader("Content-Type", "application/json")
                    conn.close()
                else:
                    status, kind = int(mode), "text/plain"
                    data = f"{status} from the proxy (a redeploy, an expired token)\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                with proxy.seen:
                    proxy.answered[status] = proxy.answered.get(status, 0) + 1
                    proxy.seen.notify_all()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_answered(self, status: int, count: int, timeout: float = 120) -> None:
        """Until the proxy has answered ``count`` requests with ``status``."""
        with self.seen:
            assert self.seen.wait_for(lambda: self.answered.get(status, 0) >= count, timeout), \
                f"the proxy answered {self.answered}, not {count} x {status}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URL of a real ``mlflow server`` (its own SQLite backend), stopped after the module."""
    from sweep.views.ui import mlflow_server

    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(f"sqlite:///{root}/server.db",
                       artifacts_destination=str(root / "artifacts")) as (_, url):
        yield url


@pytest.fixture
def proxy(server, monkeypatch, tmp_path):
    """A proxy in front of ``server``; MLflow's own HTTP retries off (each refusal is one
    request the proxy counts), the spool in tmp_path."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("SWEEP_SPOOL_DIR", str(tmp_path / "spool"))
    front = Proxy(server.split("//", 1)[1])
    yield front
    front.close()


def _refusal(client, run_id: str):
    """The exception one ``log_batch`` through the proxy raises (None: it was stored)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    try:
        client.log_batch(run_id, metrics=[Metric("lr", 0.1, 1_700_000_000_000, 0)],
                         synchronous=True)
    except MlflowException as err:
        return err
    return None


def test_a_proxys_answers_and_the_servers_are_classified_by_what_they_mean(server, proxy):
    """Real answers, through a real proxy and a real server: a proxy's 404 (no MLflow error
    body), 408, 502 and 503 are transient; 401 and 403 are the credentials; only the server's
    own "not found" and "not active" are permanent."""
    from sweep.record.store_errors import is_credentials, is_permanent

    client = MlflowClient(proxy.url)
    experiment = client.create_experiment("classified")
    run_id = client.create_run(experiment).info.run_id
    for status in ("404", "408", "502", "503"):
        proxy.mode = status
        err = _refusal(client, run_id)
        assert err is not None and not is_permanent(err) and not is_credentials(err), (status, err)
    for status in ("401", "403"):
        proxy.mode = status
        err = _refusal(client, run_id)
        assert err is not None and is_credentials(err) and not is_permanent(err), (status, err)
    from sweep.errors import TrackingError
    from sweep.record import Tracker

    proxy.mode = "401"
    with pytest.raises(TrackingError) as refused:  # a launch meeting a 401 at its start
        Tracker(proxy.url)
    assert refused.value.exit_code == 2 and "401" in str(refused.value)
    assert "MLFLOW_TRACKING_TOKEN" in str(refused.value)
    proxy.mode = "pass"
    assert _refusal(client, run_id) is None  # the same write passes once the proxy does
    client.delete_run(run_id)
    assert is_permanent(_refusal(client, run_id))  # the server: "must be in the 'active' state"
    assert is_permanent(_refusal(client, "0" * 32))  # the server: no such run


def test_401_then_503_then_through_loses_no_point_and_tells_the_401_in_one_line(server, proxy):
    """Two runs fed through one writer over the proxy: stored while it passes, spooled at once
    while it answers 401 (one line naming the fix), kept in memory and retried while it answers
    503, stored again once it passes; the spool's replay then stores the rest. Every point
    arrives once (MLflow's API on the server itself) and nothing is set aside."""
    from sweep.record import MetricWriter, SpoolWriter, pending, replay, spool_dir
    from sweep.record.writer_work import RunEnd

    client = MlflowClient(proxy.url)
    experiment = client.create_experiment("credentials")
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    lines: list[str] = []
    writer = MetricWriter(client, SpoolWriter(spool_dir(proxy.url), proxy.url), senders=4,
                          warn=lines.append)

    def feed(first: int) -> None:
        for run_id in runs:
            writer.put_many(run_id, [("lr", 0.1, 1_700_000_000_000 + s, s)
                                     for s in range(first, first + 300)])

    try:
        feed(0)
        assert writer.drain(time.monotonic() + 120) and writer.stored == 600
        proxy.mode = "401"
        feed(300)
        assert writer.drain(time.monotonic() + 120)  # spooled at once, not after 60 s
        assert writer.spooled == 600 and writer.set_aside == 0
        proxy.mode = "503"
        feed(600)
        proxy.wait_answered(503, 2)  # tried and refused: transient, kept and retried
        proxy.mode = "pass"
        ends = [RunEnd(run_id, "FINISHED", {"sweep.state": "COMPLETE"}, 1_700_000_100_000)
                for run_id in runs]
        for end in ends:
            writer.end(end)
        assert all(end.done.wait(120) for end in ends)
    finally:
        writer.close()
    sent, problems = replay(proxy.url, MlflowClient(proxy.url))
    assert not problems and sent >= 600
    direct = MlflowClient(server)  # counted on the server, not through the proxy
    for run_id in runs:
        assert sorted(m.step for m in direct.get_metric_history(run_id, "lr")) == list(range(900))
        assert direct.get_run(run_id).info.status == "FINISHED"
    told = [line for line in lines if "credentials" in line]
    assert len(told) == 1 and "401" in told[0] and "MLFLOW_TRACKING_TOKEN" in told[0], lines
    assert not any("set aside" in line or "never take" in line for line in lines), lines
    assert pending(proxy.url).set_aside == {} and not pending(proxy.url).waiting


@pytest.mark.slow
def test_a_run_start_refused_for_credentials_stops_the_worker_and_burns_no_budget(
        tmp_path, tiny_cifar, server, proxy):
    """The proxy answers 401 from trial 1's run start on (an expired token): the launch exits 6
    with one line naming the fix, trial 1 is re-enqueued and the budget holds one trial. With
    the proxy passing again the next launch replays the spool and finishes the study: every
    trial run holds each of its steps (MLflow's API on the server itself)."""
    proxy.refuse_from, proxy.refuse_with = '"trial-0001"', "401"
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = sweep_cmd("launch", "--study", str(TINY), "--trials", "3", "--quiet", "--storage",
                     storage, "--tracking-uri", proxy.url)
    env = dict(sweep_env(tiny_cifar), SWEEP_SPOOL_DIR=str(tmp_path / "spool"),
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    first = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 6, first.stdout[-2000:] + first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "credentials" in errors[0] and "401" in errors[0], first.stderr
    assert "MLFLOW_TRACKING_TOKEN" in errors[0] and "Traceback" not in first.stderr
    study = optuna.load_study(study_name="tiny", storage=plain_storage(storage))
    trials = study.get_trials(deepcopy=False)
    assert budget_used(study) == 1 and trials[0].state == TrialState.COMPLETE
    assert trials[1].state == TrialState.FAIL
    assert [t.system_attrs.get("failed_trial") for t in trials
            if t.state == TrialState.WAITING] == [1]  # re-enqueued, not counted

    proxy.mode = "pass"
    second = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=plain_storage(storage))
    done = [t for t in counted(study.get_trials(deepcopy=False)) if t.state.is_finished()]
    assert len(done) == 3 and all(t.state == TrialState.COMPLETE for t in done)
    direct = MlflowClient(server)
    steps = 2  # tiny.yaml: 100 training images in batches of 50, one epoch
    for t in done:
        run_id = t.user_attrs["mlflow_run_id"]
        assert sorted(m.step for m in direct.get_metric_history(run_id, "lr")) == list(range(steps))
        assert direct.get_run(run_id).info.status == "FINISHED"
    assert not list((tmp_path / "spool").rglob("*.jsonl"))


def test_postgresql_read_only_in_a_failover_is_transient_and_the_same_write_passes_after(
        postgres_server):
    """The suite's PostgreSQL made read-only (a standby during a failover answers so): MLflow
    turns the driver's error into a 400 (``BAD_REQUEST``) and the direct insert raises it
    bare; neither is permanent nor the credentials, and the same writes pass once the database
    takes writes again (counted with SQL)."""
    import psycopg
    from mlflow.entities import Metric

    from sweep.record import Tracker, bulk_sender
    from sweep.record.store_errors import is_credentials, is_permanent

    uri = postgres_server[1]
    tracker = Tracker(uri)
    run_id = tracker.client.create_run(tracker.experiment_id("failover")).info.run_id
    engine = tracker.client._tracking_client.store.engine
    database = uri.rsplit("/", 1)[1]

    def read_only(on: bool) -> None:
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = '
                         f'{"on" if on else "off"}')
        engine.dispose()  # the pool's next connections see the setting

    points = [("lr", 0.1, 1_700_000_000_000 + s, s) for s in range(10)]
    send = bulk_sender(tracker.client)
    read_only(True)
    errors = []
    for write in (lambda: tracker.client.log_batch(
                      run_id, metrics=[Metric(*p) for p in points], synchronous=True),
                  lambda: send(run_id, points)):
        try:
            write()
        except Exception as err:
            errors.append(err)
    read_only(False)
    assert len(errors) == 2 and all("read-only" in str(err) for err in errors), errors
    assert not any(is_permanent(err) or is_credentials(err) for err in errors)
    send(run_id, points)
    with psycopg.connect(uri) as conn:
        stored = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s",
                              (run_id,)).fetchone()[0]
    assert stored == 10


def test_set_aside_records_are_put_back_by_repair_once_the_run_is_restored(tmp_path,
                                                                           monkeypatch):
    """A run deleted through MLflow's API while its trial ends: its end is set aside. `sweep
    status --repair` puts it back and the replay sets it aside again while the run is still
    deleted (named once, not twice); once the run is restored (MLflow's API), the next repair
    stores it: the record is complete, the run FINISHED, each point once (SQL)."""
    from sweep.commands.status import show_status
    from sweep.record import Tracker, pending

    monkeypatch.setenv("SWEEP_SPOOL_AFTER_S", "600")  # a permanent error must not wait for it
    uri, storage = f"sqlite:///{tmp_path}/m.db", f"sqlite:///{tmp_path}/o.db"
    optuna.create_study(study_name="restored", storage=storage)
    tracker = Tracker(uri)
    experiment_id = tracker.experiment_id("restored")
    parent = tracker.study_run(experiment_id, "restored", {}, None)
    run = tracker.start_trial(experiment_id, parent, "restored", 0, {"slot": 0}, {})
    run.on_steps(0, [0.1] * 50, [1.0] * 50)
    tracker.wait()
    MlflowClient(uri).delete_run(run.run_id)
    run.on_steps(50, [0.1] * 50, [1.0] * 50)
    run.finish("FINISHED", {"sweep.state": "COMPLETE"}, curve_png=False)
    tracker.close()
    assert run.run_id in pending(uri).set_aside

    said, facts = show_status("restored", storage, uri, repair=True)  # still deleted
    assert "put back" in said and not facts.completeness.complete
    assert list(pending(uri).set_aside) == [run.run_id] and facts.exit_code == 3
    assert len([line for line in facts.text().splitlines() if run.run_id in line]) == 1

    MlflowClient(uri).restore_run(run.run_id)
    said, facts = show_status("restored", storage, uri, repair=True)
    assert facts.completeness.complete and facts.exit_code == 0, facts.text()
    assert pending(uri).set_aside == {} and not pending(uri).waiting
    with sqlite3.connect(tmp_path / "m.db") as conn:
        rows = conn.execute("SELECT count(*), count(DISTINCT step) FROM metrics WHERE run_uuid = ? "
                            "AND key = 'lr'", (run.run_id,)).fetchone()
    assert rows == (100, 100)
    assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"


def test_two_restorers_at_once_move_each_set_aside_file_once_and_later_ones_stay(tmp_path):
    """Two ``sweep status --repair`` at once (threads: each renames on its own, as two processes
    on two hosts would): every set-aside file is moved into the spool exactly once, a record a
    writer sets aside afterwards lands in a fresh file, and nothing is lost (read back with
    ``json`` line by line)."""
    from sweep.record import spool_dir
    from sweep.record.set_aside import append, restore

    uri = f"sqlite:///{tmp_path}/m.db"
    folder = spool_dir(uri)
    record = {"run": "r" * 32, "metrics": [["lr", 0.1, 1_700_000_000_000, 0]]}
    for n in range(20):
        append(folder, f"node-{n}-1", [record], "not active")
    moved: list[int] = []
    restorers = [threading.Thread(target=lambda: moved.append(restore(folder))) for _ in range(2)]
    for thread in restorers:
        thread.start()
    for thread in restorers:
        thread.join()
    assert sum(moved) == 20
    append(folder, "node-0-1", [record], "not active")  # a live writer, after the move
    segments = sorted(folder.glob("restored-*.jsonl"))
    assert len(segments) == 20 and [p.name for p in (folder / "set-aside").iterdir()] == [
        "node-0-1.jsonl"]
    runs = [json.loads(line)["run"] for path in [*segments, folder / "set-aside" / "node-0-1.jsonl"]
            for line in path.read_text().splitlines()]
    assert runs == ["r" * 32] * 21
