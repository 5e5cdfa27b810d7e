"""MLflow tracking: one experiment per study, one parent run, one nested run per trial.

Contract (the UI, ``sweep report`` and users' notebooks rely on these names):

* experiment = the study name; the parent run has tag ``sweep.role=study`` and is a finished
  container (never left RUNNING); trial runs have ``mlflow.parentRunId`` = the parent,
  ``sweep.role=trial``, ``sweep.trial_number``, ``sweep.state``, ``optuna.study_name``.
* trial metrics: ``lr`` and ``train_loss`` at every optimizer step, ``val_loss``/``val_acc``
  per epoch, ``test_acc`` and ``epoch_seconds`` at the end. Non-finite values are never logged.

* completeness: each trial run's end records what it should hold: ``sweep.steps_trained``,
  ``sweep.epochs_trained`` and ``sweep.expected_points`` (``lr=1200,train_loss=1200,...``:
  points per metric key), pruned, failed and interrupted trials too (``completeness``).

Metrics go through the process's one writer thread (``metric_writer``), which sends batches of
up to 1,000 with ``log_batch`` (a synchronous ``log_metric`` costs 10-23 ms on SQLite; a batch
of 1,000 costs 0.1-0.2 s), retries refused writes and spools them to local disk when the store
stays down (``spool``).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from sweep.errors import TrackingError
from sweep.record.metric_writer import MetricWriter, RunEnd, backlog_points, spool_after_s
from sweep.record.spool import SpoolWriter, log_batch, replay, spool_dir
from sweep.record.sql_metrics import bulk_sender
from sweep.base.stopping import LAST_WORDS_S, stop_seconds
from sweep.record.store_errors import is_permanent, is_read_only, wait_for_store
from sweep.base.files import check_writable_file, creation_lock
from sweep.base.urls import mask_url, sqlite_path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ROLE, STATE, REASON = "sweep.role", "sweep.state", "sweep.prune_reason"
CODE_VERSION = "sweep.code_version"  # on every trial run, and on the parent (last launch)
STEPS_TRAINED, EPOCHS_TRAINED = "sweep.steps_trained", "sweep.epochs_trained"
EXPECTED_POINTS = "sweep.expected_points"  # "lr=1200,train_loss=1200,val_loss=10,..."
EPOCH_METRICS = ("val_loss", "val_acc")  # logged once per epoch, step = the epoch (0-based)
FINAL_METRICS = ("test_acc", "epoch_seconds")  # logged once when a trial completes
STEP_METRICS = ("lr", "train_loss")  # logged at every optimizer step, step = the step
# MLflow's SQLite store per point (measured: 96,144 points of 16 runs added 23.8 MB; the metrics
# table's primary key repeats the run id and key per row); PostgreSQL is of the same order.
BYTES_PER_POINT = 250


def points_per_trial(total_steps: int, epochs: int) -> int:
    """The points a trial that trains to its end logs (a pruned one logs fewer): every
    ``STEP_METRICS`` at each of its ``total_steps`` steps, ``EPOCH_METRICS`` per epoch, and the
    ``FINAL_METRICS`` once."""
    return len(STEP_METRICS) * total_steps + len(EPOCH_METRICS) * epochs + len(FINAL_METRICS)
# Optuna user attribute: by when (s since the epoch) the trial's run end is written or spooled;
# until then another worker's stale-run cleanup leaves the run to its own worker.
RUN_END_BY = "sweep.run_end_by"
# A backlog shown in the progress line: more than a pack of 32 logs in about two seconds (two
# steps' points per slot at 60 steps/s), i.e. the writer is more than a flush or two behind.
LAG_SHOWN_POINTS = 8_000


def check_tracking_uri(uri: str) -> None:
    """Validate a tracking URI (and the writer's ``SWEEP_SPOOL_AFTER_S``, ``SWEEP_STOP_S`` and
    ``SWEEP_BACKLOG_POINTS``) without creating anything. ``file:`` stores are refused: they have
    no primary key on metrics, so a retried or replayed write would store points twice."""
    spool_after_s()
    stop_seconds()
    backlog_points()
    path = sqlite_path(uri)
    if path is not None:
        check_writable_file(path, "MLflow store", TrackingError)
    elif uri.startswith(("http://", "https://")):
        check_server_answers(uri)
    elif uri.startswith("sqlite:"):
        raise TrackingError(f"tracking URI {mask_url(uri)!r}: use sqlite:///PATH.db")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"tracking URI {mask_url(uri)!r}: MLflow's file store keeps no key "
                            f"on metrics, so a retried or replayed write would store points twice; "
                            f"use sqlite:///PATH.db or http://HOST:PORT of an MLflow server")
    elif not uri.startswith(("postgresql", "mysql", "databricks")):
        raise TrackingError(f"tracking URI {mask_url(uri)!r}: unsupported; use sqlite:///PATH.db "
                            f"or http://HOST:PORT of an MLflow server")


def check_server_answers(uri: str, timeout_s: float = 10) -> None:
    """Raise TrackingError when nothing listens at a tracking server's URL. Asked before any
    store is created, so a launch against a server that is down writes nothing; MLflow's own
    client would fail only after its retries (over 10 s) with a page of urllib3 text."""
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2], path=parts.path.rstrip("/"),
                          query="", fragment="")  # no credentials in the probe: /health needs none
    try:
        with urllib.request.urlopen(f"{bare.geturl()}/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        pass  # something answers (a proxy, a login in front of /health): the client decides
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, (ConnectionError, socket.gaierror, TimeoutError)):
            raise TrackingError(f"no MLflow tracking server answers at {mask_url(uri)} "
                                f"({reason}); start it (mlflow server ...) or fix --tracking-uri "
                                f"/ MLFLOW_TRACKING_URI") from None


def _never_starts(err: BaseException) -> bool:
    """A run start that waiting cannot cure: a permanent refusal or a read-only store."""
    return is_permanent(err) or is_read_only(err)


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _artifact_root(uri: str) -> str | None:
    path = sqlite_path(uri)
    return (path.resolve().parent / "mlartifacts").as_uri() if path is not None else None


class Tracker:
    """An MLflow client bound to one tracking URI; safe to share between threads."""

    def __init__(self, uri: str):
        check_tracking_uri(uri)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # Over HTTP MLflow prints two "View run ... at" lines per ended run, after fetching the
        # run once more: a request on the trial's thread and clutter in every job's output.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._pending: list = []  # futures of in_background work
        self._executor = None
        self._writer: MetricWriter | None = None
        self._writer_lock = threading.Lock()
        path = sqlite_path(uri)
        try:
            if path is not None:
                # Creating a fresh MLflow SQLite store from several processes at once corrupts
                # it (alembic migrations race); serialise the first connection.
                with creation_lock(path):
                    self.client = MlflowClient(tracking_uri=uri)
                    self.client.search_experiments(max_results=1)
            else:
                self.client = MlflowClient(tracking_uri=uri)
                self.client.search_experiments(max_results=1)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingError(f"MLflow tracking URI {mask_url(uri)!r} cannot be used: "
                                f"{mask_url(first)[:300]}") from None

    def in_background(self, work) -> None:
        """Run ``work`` on the tracker's one background thread, in order (ending runs, drawing
        LR curves: MLflow calls the training thread need not wait for). ``wait()`` joins it;
        the executor's thread is also joined at interpreter exit."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-finish")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._executor.submit(work))

    def wait(self, deadline: float | None = None) -> None:
        """Wait for the work handed to ``in_background`` and for every queued point to be
        stored or spooled (call before the process exits), until ``deadline`` (a
        ``time.monotonic()`` value; None: no limit)."""
        from concurrent.futures import TimeoutError as FutureTimeout

        for future in self._pending:
            try:  # the work catches and reports its own errors
                future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                break
        self._pending = [f for f in self._pending if not f.done()]
        if self._writer is not None:
            self._writer.drain(deadline)

    def settle_by(self, deadline: float) -> None:
        """A stop's way out (``stopping``): every queued point and run end is stored by
        ``deadline`` or, failing that, spooled now. The LR-curve figures still being drawn are
        left (the curve is in the ``lr`` metric)."""
        if self._writer is not None:
            self._writer.settle_by(deadline - LAST_WORDS_S)

    @property
    def refusing(self) -> bool:
        """Whether the store refused this process's last write (an outage under way)."""
        return self._writer is not None and self._writer.refusing

    def lag_text(self) -> str:
        """The record's lag for a progress line: points queued beyond one flush and points
        spooled by this process (empty while the store keeps up)."""
        writer = self._writer
        if writer is None:
            return ""
        parts = [f"{writer.backlog:,} pts queued"] if writer.backlog > LAG_SHOWN_POINTS else []
        if writer.spooled:
            parts.append(f"{writer.spooled:,} spooled")
        return ", ".join(parts)

    def spool_now(self) -> None:
        """The process's last words at a stop's deadline or second signal: spool what is
        queued, from this thread, at once."""
        if self._writer is not None:
            self._writer.spool_now()

    @property
    def writer(self) -> MetricWriter:
        """The process's one metric writer for this store, started on first use."""
        with self._writer_lock:
            if self._writer is None:
                # Over HTTP the store's work is the server's: four senders overlap the round
                # trips. A database written from this process (SQLite, PostgreSQL) costs this
                # process's CPU per point, which more threads only contend for, and SQLite
                # admits one writer at a time: one sender (bench_tracking.py), with one
                # multi-row INSERT per chunk instead of MLflow's ORM (sql_metrics).
                http = self.uri.startswith(("http://", "https://"))
                self._writer = MetricWriter(self.client, SpoolWriter(spool_dir(self.uri), self.uri),
                                            senders=4 if http else 1,
                                            send=None if http else bulk_sender(self.client))
            return self._writer

    def close(self) -> None:
        """``wait``, then stop the writer and release this process's spool segment."""
        self.wait()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def replay_spool(self) -> tuple[int, list[str]]:
        """Send what earlier processes spooled for this store (``spool.replay``): (points
        sent, one line per segment that could not be replayed and stays)."""
        return replay(self.uri, self.client)

    def experiment_id(self, name: str, create: bool = True) -> str | None:
        """The experiment named ``name``; created when absent (two creators may race: fine)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        if not create:
            return None
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_root(self.uri))
        except Exception:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def study_run(self, experiment_id: str, study_name: str, params: Mapping[str, Any],
                  study_file: Path | None) -> str:
        """The study's parent run, created once. Concurrent creators converge on the oldest."""
        existing = self.study_runs(experiment_id, study_name)
        if existing:
            return existing[0].info.run_id
        run = self.client.create_run(experiment_id, run_name=study_name,
                                     tags={ROLE: "study", "optuna.study_name": study_name})
        run_id = run.info.run_id
        winners = self.study_runs(experiment_id, study_name)
        if winners and winners[0].info.run_id != run_id:
            self.client.delete_run(run_id)  # another worker won the race
            return winners[0].info.run_id
        self.log_params(run_id, params)
        if study_file is not None:
            self.client.log_artifact(run_id, str(study_file))
        # The parent is a container; ended at once so no crash can leave it RUNNING. Its start
        # (now, before the first trial) stays; update_study_run moves its end along the study.
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def update_study_run(self, run_id: str, summary: "StudySummary") -> None:
        """Bring the study's parent run up to date, so the MLflow runs table answers "how did
        this study go" without opening trials: metrics ``best_value``, ``budget``,
        ``trials_used`` and ``trials_<outcome>`` (step = trials used, so their history follows
        the study across launches), the same as ``sweep.*`` tags, and an end time spanning the
        study so far. The run stays FINISHED (a container never left RUNNING by a crash); its
        start time was set when it was created, before the first trial."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        values = {"budget": summary.budget, "trials_used": summary.used,
                  **{f"trials_{k}": v for k, v in summary.counts.items()}}
        if summary.best_value is not None and math.isfinite(summary.best_value):
            values["best_value"] = summary.best_value
        tags = {"sweep.budget": summary.budget, "sweep.trials_used": summary.used,
                **{f"sweep.trials_{k}": v for k, v in summary.counts.items()}}
        if summary.best_trial is not None:
            tags["sweep.best_trial"] = summary.best_trial
            tags["sweep.best_value"] = f"{summary.best_value:.6g}"
        log_batch(self.client, run_id, metrics=[Metric(k, float(v), now, summary.used)
                                               for k, v in values.items()],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])
        start = self.client.get_run(run_id).info.start_time or now
        # Trials still running: the study goes on now; otherwise it ended with its last trial.
        end = now if summary.last_end_ms is None or summary.counts.get("running") else summary.last_end_ms
        self.client.set_terminated(run_id, "FINISHED", end_time=max(end, start + 1))

    def study_runs(self, experiment_id: str, study_name: str):
        """The study's parent runs, oldest first (one, unless a creation race is being settled)."""
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{ROLE}` = 'study' and "
                                           f"tags.`optuna.study_name` = '{study_name}'",
            max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, mask_url(str(v))[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            log_batch(self.client, run_id, params=items[start: start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """One synchronous batch of metrics on ``run_id`` (a study run's summary figures)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        log_batch(self.client, run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def start_trial(self, experiment_id: str, parent_run_id: str, study_name: str,
                    trial_number: int, params: Mapping[str, Any], tags: Mapping[str, str],
                    check=None):
        """Open a trial's run. While the store is away (an outage, a restart) this waits and
        retries (``store_errors.wait_for_store``): a trial never fails for an outage; ``check``
        raises to stop the waiting (a stop signal). A permanent refusal is raised."""
        run = wait_for_store(lambda: self.client.create_run(
            experiment_id, run_name=f"trial-{trial_number:04d}",
            tags={ROLE: "trial", "mlflow.parentRunId": parent_run_id, STATE: "RUNNING",
                  "sweep.trial_number": str(trial_number), "optuna.study_name": study_name,
                  **{k: mask_url(str(v)) for k, v in tags.items()}}),
            f"trial #{trial_number}'s run start", check, _warn, _never_starts)
        wait_for_store(lambda: self.log_params(run.info.run_id, params),
                       f"trial #{trial_number}'s params", check, _warn, _never_starts)
        return TrialRun(self, run.info.run_id)

    def trial_runs(self, experiment_id: str, status: str | None = None):
        """All trial runs of an experiment (paged), optionally only those with this status."""
        filt = f"tags.`{ROLE}` = 'trial'"
        if status:
            filt += f" and attributes.status = '{status}'"
        runs, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], filter_string=filt, max_results=1000,
                                           page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs


@dataclass(frozen=True)
class StudySummary:
    """How a study stands, for its parent run (built from Optuna by
    ``sweep.loop.budget.study_summary``, where the counting rules live)."""

    budget: int
    used: int  # finished trials that count towards the budget
    counts: Mapping[str, int]  # complete, pruned, diverged, failed, running
    best_value: float | None = None
    best_trial: int | None = None
    last_end_ms: int | None = None  # when the last finished trial ended (ms since the epoch)


class TrialRun:
    """One trial's MLflow run, and a training listener whose points go to the process's one
    metric writer (``Tracker.writer``): the training thread only appends to its queue."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id
        self.lr_curve: list[tuple[int, float]] = []
        self.expected: dict[str, int] = {}  # points handed to the writer, per metric key
        self.epochs_trained = 0
        self._writer = tracker.writer

    @property
    def metrics_logged(self) -> int:
        """Points of this run the store has taken so far (spooled ones not counted)."""
        return self._writer.stored_by_run.get(self.run_id, 0)

    @property
    def logging_seconds(self) -> float:
        """Time the writer spent in this run's ``log_batch`` calls."""
        return self._writer.seconds_by_run.get(self.run_id, 0.0)

    def _count(self, key: str, n: int) -> None:
        self.expected[key] = self.expected.get(key, 0) + n

    # -- listener interface (called from the training thread; must be cheap) --
    def on_steps(self, first_step: int, lrs: Sequence[float], losses: Sequence[float]) -> None:
        now = int(time.time() * 1000)
        steps = range(first_step, first_step + len(lrs))
        self.lr_curve.extend(zip(steps, lrs))
        points = [("lr", lr, now, step) for step, lr in zip(steps, lrs)]
        finite = [("train_loss", loss, now, step) for step, loss in zip(steps, losses)
                  if math.isfinite(loss)]
        self._count("lr", len(points))
        if finite:
            self._count("train_loss", len(finite))
            points += finite
        self._writer.put_many(self.run_id, points)

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        self.epochs_trained += 1
        for key in EPOCH_METRICS:
            self.log_metric(key, metrics[key], epoch)

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        if value is not None and math.isfinite(value):
            self._count(key, 1)
            self._writer.put_many(self.run_id, [(key, float(value), int(time.time() * 1000), step)])

    def end_by(self) -> float:
        """When (s since the epoch) an end queued now is written or spooled at the latest
        (``RUN_END_BY``): the writer's outage allowance and a stop's bound, with a margin."""
        return time.time() + spool_after_s() + stop_seconds() + 30

    def completeness_tags(self) -> dict[str, str]:
        """What the run should hold once every point is stored (``completeness`` reads it)."""
        return {STEPS_TRAINED: str(len(self.lr_curve)), EPOCHS_TRAINED: str(self.epochs_trained),
                EXPECTED_POINTS: ",".join(f"{k}={n}" for k, n in sorted(self.expected.items()))}

    def finish(self, status: str, tags: Mapping[str, Any] | None = None,
               curve_png: bool = True, background: bool = False) -> None:
        """End the run with ``status`` (FINISHED, KILLED or FAILED) and ``tags`` once the writer
        has stored (or spooled) every point queued before; the LR-curve figure (about 0.1 s of
        matplotlib plus an artifact upload) is drawn on the tracker's background thread.

        With ``background`` nothing here waits (the fused pack's slots, FACTS.md: 0.25 s per
        trial on the H200); otherwise this waits until the end is written or spooled. A store
        that refuses is never an exception: the writer retries, then spools (``metric_writer``).
        """
        items = {k: mask_url(str(v))[:5000] for k, v in (tags or {}).items()}
        items.update(self.completeness_tags())
        end = RunEnd(self.run_id, status, items, int(time.time() * 1000))
        done = self._writer.end(end)
        if curve_png and self.lr_curve:
            # After the run's end is written: an upload then never races the run's points for
            # a store that is coming back, and a dead server costs the figure, not the points.
            self.tracker.in_background(lambda: done.wait(spool_after_s() + 60) and not end.spooled
                                       and self._log_curve())
        if not background and not done.wait(spool_after_s() + 60):
            print(f"warning: the end of run {self.run_id} is still queued (MLflow store and "
                  f"spool both refuse); it is written when one of them takes it",
                  file=sys.stderr)

    def _log_curve(self) -> None:
        try:
            self.tracker.client.log_figure(self.run_id, _curve_figure(self.lr_curve),
                                           "lr_curve.png")
        except Exception as err:  # the curve is also in the `lr` metric; say so and go on
            print(f"warning: lr_curve.png of run {self.run_id} not logged: "
                  f"{mask_url(str(err).splitlines()[0] if str(err) else type(err).__name__)}",
                  file=sys.stderr)


def _curve_figure(curve: list[tuple[int, float]]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    steps, lrs = zip(*curve)
    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, lrs, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    if min(lrs) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.16, top=0.95)  # tight_layout costs 40 ms
    return fig


def open_existing_tracker(uri: str):
    """An MLflow client for a store that must already exist (a missing SQLite file is a
    TrackingError rather than a fresh empty store)."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingError(f"no MLflow store at {path}: run `sweep launch` in this folder first, "
                            f"or pass --tracking-uri URI of the study's MLflow store")
    return Tracker(uri)
