"""One MLflow writer per process: every trial run's points go through one thread.

Why one: the store serialises writes anyway (SQLite admits one writer at a time), and a drain
thread per run exhausted SQLAlchemy's connection pool at 16 runs x 60 steps/s ("QueuePool limit
of size 5 overflow 10 reached"), after which a run's later points were dropped (issue 17).

* The training thread only appends to a deque (no lock, no I/O): ``put_many``.
* The writer wakes every ``FLUSH_S`` (at once for a run's end or a drain), takes everything
  queued, and sends each run's points with ``log_batch`` in chunks of at most 1,000 (MLflow's
  cap). When the store is slow, points pile up meanwhile and the next chunks are fuller, so the
  cost per point falls as the load rises.
* A refused write (pool timeout, "database is locked", a read-only file, a full disk, HTTP
  429/5xx, connection refused: any exception) is retried with exponential backoff (0.2 s
  doubling to 5 s); nothing queued is discarded. Once the store has refused for
  ``SWEEP_SPOOL_AFTER_S`` seconds (60), everything pending goes to the spool on local disk
  (``sweep.record.spool``), and so does whatever arrives while the store stays down (one
  attempt every 5 s); the first accepted write ends the outage.
* A run's end (tags, status) goes through the same queue after its points: it is sent only
  once every point of the run is stored, or spooled together with them.
* A refusal that will never pass (``store_errors.is_permanent``: a deleted or inactive run, a
  row gone, HTTP 4xx) sets that run's points and end aside in the spool folder with the
  reason; the other runs go on.
* More than ``SWEEP_BACKLOG_POINTS`` queued: they go to the spool although the store takes
  writes (memory stays bounded when the store is slower than the trainer).
* A stop (``stopping``): ``settle_by(deadline)`` lets the thread store what it can until the
  deadline, then ``spool_now`` writes the rest to the spool from the stopping thread.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from sweep.errors import TrackingError
from sweep.record.store_errors import is_permanent
from sweep.record.spool import MAX_BATCH, SpoolWriter, log_batch
from sweep.base.text import first_line

FLUSH_S = 1.0  # the longest a point waits on the queue before a write (the UI lags this)
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.2, 5.0


def spool_after_s() -> float:
    """Seconds of refused writes before points go to the spool (``SWEEP_SPOOL_AFTER_S``,
    default 60). Raises TrackingError for a value that is not a number >= 0."""
    text = os.environ.get("SWEEP_SPOOL_AFTER_S", "60")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise TrackingError(f"SWEEP_SPOOL_AFTER_S must be a number of seconds >= 0, got "
                            f"{text!r}; fix or unset it")
    return value


DEFAULT_BACKLOG_POINTS = 500_000  # about 100 MB of queued tuples; 87 s of a 32-trial pack


def backlog_points() -> int:
    """The most points the writer keeps in memory (``SWEEP_BACKLOG_POINTS``, default 500,000):
    beyond it, queued points go to the spool even while the store takes writes (a store slower
    than the trainer would otherwise grow memory and lag for the whole study). Raises
    TrackingError for a value that is not a whole number >= 1,000."""
    text = os.environ.get("SWEEP_BACKLOG_POINTS", str(DEFAULT_BACKLOG_POINTS))
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < MAX_BATCH:
        raise TrackingError(f"SWEEP_BACKLOG_POINTS must be a whole number of points >= "
                            f"{MAX_BATCH}, got {text!r}; fix or unset it")
    return value


@dataclass
class RunEnd:
    """A run's last write: tags, then its status. ``done`` is set once stored or spooled."""

    run_id: str
    status: str
    tags: dict[str, str]
    end_time: int  # ms since the epoch, when the trial ended (not when the write went out)
    done: threading.Event = field(default_factory=threading.Event)
    spooled: bool = False


@dataclass
class _Drain:
    done: threading.Event = field(default_factory=threading.Event)


class MetricWriter:
    """The one thread that writes a process's points to one MLflow store (see module doc).

    ``client`` is an ``MlflowClient``; ``spool`` this process's spool segment; ``warn`` gets one
    line when an outage starts, when points are spooled and when the store takes writes again.
    ``senders``: threads that send different runs' points at once, for a tracking server (the
    store's work is the server's; the round trips of the 20-35 ms calls then overlap). ``on_stored(points, now_ms)``
    (benchmarks) hears of every stored chunk. ``send(run_id, points)`` stores one chunk
    (``sql_metrics.bulk_sender`` for MLflow's SQL stores; default ``log_batch``)."""

    def __init__(self, client, spool: SpoolWriter, senders: int = 1,
                 warn: Callable[[str], None] | None = None, on_stored: Callable | None = None,
                 send: Callable | None = None):
        self.client, self.spool = client, spool
        self._send = send or self._log_batch
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self.on_stored = on_stored
        self._inbox: collections.deque = collections.deque()
        # Held while items move from the inbox to the writer's own lists, so that ``spool_now``
        # (another thread, at a stop's deadline) sees every queued item in one place or the other.
        self._moving = threading.RLock()  # reentrant: a second signal's handler may spool_now
        self._abandoned = False  # spool_now took everything: the thread writes nothing more
        self._wake = threading.Event()
        self._pending: dict[str, list] = {}  # run id -> [(key, value, ts, step)] not yet sent
        self._ends: list[RunEnd] = []  # waiting for their run's points
        self._drains: list[_Drain] = []
        self._closing = False
        self._failing_since: float | None = None
        self._delay = FIRST_BACKOFF_S
        self._next_try = 0.0
        self._spool_failed = False
        self._backlog_cap = backlog_points()
        self._spooled_runs: set[str] = set()  # runs with points in the spool: their ends follow
        self.set_aside = 0  # points of runs the store will never take (store_errors)
        self.stored = 0  # points the store took
        self.spooled = 0  # points written to the spool
        self.backlog = 0  # points taken off the queue and not yet stored (the writer's lag)
        self.busy_s = 0.0  # wall time spent writing (benchmarks: capacity = stored / busy_s)
        self.stored_by_run: dict[str, int] = collections.Counter()
        self.seconds_by_run: dict[str, float] = collections.Counter()
        self._count_lock = threading.Lock()
        self._pool = None
        if senders > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(senders, thread_name_prefix="mlflow-send")
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()

    # -- the training thread's side: appends only --
    def put_many(self, run_id: str, points) -> None:
        """Queue ``points``: (key, value, timestamp ms, step) tuples of one run."""
        self._inbox.append((run_id, points))

    def end(self, end: RunEnd) -> threading.Event:
        """Queue a run's end after its points; returns the event set once it is written."""
        self._inbox.append(end)
        self._wake.set()
        return end.done

    def drain(self, deadline: float | None = None) -> bool:
        """Wait until everything queued before this call is stored or spooled, or until
        ``deadline`` (a ``time.monotonic()`` value; None: no limit). True when it is."""
        mark = _Drain()
        self._inbox.append(mark)
        self._wake.set()
        return mark.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def settle_by(self, deadline: float) -> bool:
        """A stop's way out: let the thread store (or spool) what is queued until ``deadline``,
        then spool whatever is left from this thread (``spool_now``). True when everything
        queued is stored or spooled (False only when the spool's disk refuses too). In an outage
        (the store refuses now) it spools at once: waiting would only spend the bound."""
        if not self.refusing and self.drain(deadline):
            return True
        return self.spool_now()

    @property
    def refusing(self) -> bool:
        """Whether the store refused the last write (an outage under way)."""
        return self._failing_since is not None

    def spool_now(self) -> bool:
        """Write every queued point and run end to the spool now, from the calling thread
        (a stop's deadline or second signal, when the writer thread may hang in a store that is
        down); the thread then writes nothing more. A chunk the thread is sending right now
        may end up both stored and spooled: a replay stores it once (the spool's exactly-once
        rule). Returns False when the disk refuses."""
        with self._moving:
            pending, ends = {}, []
            if not self._abandoned:  # a second call (a signal after the deadline's) adds only new items
                pending = {run: list(points) for run, points in list(self._pending.items())}
                ends = list(self._ends)
            self._abandoned = True
            queued = []
            while self._inbox:
                queued.append(self._inbox.popleft())
        for item in queued:
            if isinstance(item, tuple):
                pending.setdefault(item[0], []).extend(item[1])
            elif isinstance(item, RunEnd):
                ends.append(item)
            else:
                item.done.set()  # a drain: everything before it is spooled below
        records = [{"run": run, "metrics": points} for run, points in pending.items() if points]
        records += [_end_record(e) for e in ends]
        if records:
            try:
                self.spool.append(records)
            except OSError as disk:
                self.warn(f"cannot spool to {self.spool.folder} at the stop "
                          f"({first_line(disk)}): {sum(len(p) for p in pending.values())} "
                          f"point(s) lost")
                return False
            self.spooled += sum(len(p) for p in pending.values())
            self.warn(f"MLflow: stopping: {sum(len(p) for p in pending.values())} queued "
                      f"point(s) and {len(ends)} run end(s) spooled to {self.spool.path}; the next "
                      f"sweep launch or `sweep status --repair` replays them")
        for e in ends:
            e.spooled = True
            e.done.set()
        self._wake.set()
        return True

    def close(self) -> None:
        """Drain, stop the thread and close the spool segment (a replay may then take it)."""
        self._closing = True
        self._wake.set()
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()
        self.spool.close()

    # -- the writer thread --
    def _loop(self) -> None:
        while True:
            self._wake.clear()  # before taking: a wake that comes later is not lost
            if self._abandoned:
                for mark in self._drains:
                    mark.done.set()
                return
            self._take()
            self.backlog = sum(len(p) for p in self._pending.values())
            if self.backlog > self._backlog_cap:
                self._spool_backlog()
            if self._closing and not (self._inbox or self._pending or self._ends or self._drains):
                return
            try:
                if (self._pending or self._ends) and time.monotonic() >= self._next_try:
                    began = time.perf_counter()
                    self._write()
                    self.busy_s += time.perf_counter() - began
                self._settle()
            except Exception as err:  # a bug here must not stop the thread every run relies on
                self.warn(f"MLflow writer: {type(err).__name__}: {first_line(err)}; retrying")
                self._next_try = time.monotonic() + MAX_BACKOFF_S
            self._wait()

    def _take(self) -> None:
        inbox = self._inbox
        with self._moving:
            if self._abandoned:
                return
            while inbox:
                item = inbox.popleft()
                if isinstance(item, tuple):
                    run_id, points = item
                    self._pending.setdefault(run_id, []).extend(points)
                elif isinstance(item, RunEnd):
                    self._ends.append(item)
                else:
                    self._drains.append(item)

    def _wait(self) -> None:
        busy = self._pending or self._ends
        wait = self._next_try - time.monotonic()
        if busy and wait > 0:  # backing off after a refusal
            self._wake.wait(wait)
        elif busy and (self._ends or self._drains or self._closing
                       or any(len(p) >= MAX_BATCH for p in self._pending.values())):
            return  # someone waits for these, or a full chunk is ready: no pause
        elif not (self._closing or self._drains):
            self._wake.wait(FLUSH_S)

    def _write(self) -> None:
        """Send every pending point, then every end whose run has none left; on a refusal note
        it and return (what was not sent waits for the next try)."""
        from mlflow.entities import RunTag

        runs = list(self._pending)
        if self._pool is not None and len(runs) > 1:
            errors = list(self._pool.map(lambda r: self._send_run(r, self._pending[r]), runs))
        else:
            errors = []
            for run_id in runs:
                errors.append(self._send_run(run_id, self._pending[run_id]))
                if errors[-1] is not None and not is_permanent(errors[-1]):
                    break  # the store is away: the other runs would be refused too
        for run_id, err in zip(runs, errors):
            if err is not None and is_permanent(err):
                self._set_aside_run(run_id, err)
        errors = [e for e in errors if e is not None and not is_permanent(e)]
        for run_id in runs:
            if run_id in self._pending and not self._pending[run_id]:
                del self._pending[run_id]
        refused = next(iter(errors), None)
        if refused is not None:
            self._refused(refused)
            return
        for end in [e for e in self._ends if e.run_id not in self._pending]:
            if end.run_id in self._spooled_runs:  # its points wait in the spool: so does its end
                try:
                    self.spool.append([_end_record(end)])
                except OSError:
                    continue
                self._ends.remove(end)
                end.spooled = True
                end.done.set()
                continue
            try:
                if end.tags:
                    log_batch(self.client, end.run_id, tags=[RunTag(k, v) for k, v in end.tags.items()])
                self.client.set_terminated(end.run_id, end.status, end_time=end.end_time)
            except Exception as err:
                if is_permanent(err):
                    self._set_aside_run(end.run_id, err)
                    continue
                self._refused(err)
                return
            self._ends.remove(end)
            end.done.set()
        self._accepted()

    def _log_batch(self, run_id: str, points: list) -> None:
        from mlflow.entities import Metric

        log_batch(self.client, run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in points])

    def _send_run(self, run_id: str, points: list) -> Exception | None:
        """Send one run's points in chunks of MAX_BATCH, removing each chunk once stored;
        returns the refusal, if any (on a sender thread when the store takes several)."""
        while points:
            chunk = points[:MAX_BATCH]
            began = time.perf_counter()
            try:
                self._send(run_id, chunk)
            except Exception as err:
                return err
            del points[:len(chunk)]
            with self._count_lock:
                self.stored += len(chunk)
                self.stored_by_run[run_id] += len(chunk)
                self.seconds_by_run[run_id] += time.perf_counter() - began
            if self.on_stored is not None:
                self.on_stored(chunk, time.time() * 1000)
        return None

    def _accepted(self) -> None:
        if self._failing_since is not None:
            self.warn(f"MLflow store takes writes again"
                      + (f"; {self.spooled} point(s) spooled to {self.spool.folder} are replayed "
                         f"by the next sweep launch or `sweep status --repair`"
                         if self.spooled else ""))
        self._failing_since, self._delay, self._next_try = None, FIRST_BACKOFF_S, 0.0

    def _refused(self, err: Exception) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since, self._delay = now, FIRST_BACKOFF_S
            self.warn(f"MLflow store refused a write ({first_line(err)}); retrying, and "
                      f"spooling to {self.spool.folder} if it still refuses after "
                      f"{spool_after_s():g} s")
        else:
            self._delay = min(self._delay * 2, MAX_BACKOFF_S)
        self._next_try = now + self._delay
        if now - self._failing_since >= spool_after_s():
            self._spool_all(err)

    def _spool_all(self, err: Exception) -> None:
        """Everything pending to the spool: points, then the ends of runs that have no
        unsent point left. Kept in memory (and retried) when the disk refuses too."""
        records = [{"run": run_id, "metrics": points} for run_id, points in self._pending.items()]
        ends = list(self._ends)
        records += [_end_record(e) for e in ends]
        count = sum(len(p) for p in self._pending.values())
        try:
            self.spool.append(records)
        except OSError as disk:
            if not self._spool_failed:
                self.warn(f"cannot spool to {self.spool.folder} either ({first_line(disk)}); "
                          f"{count} point(s) kept in memory and retried")
            self._spool_failed = True
            return
        first = self.spooled == 0
        self._spool_failed = False
        self.spooled += count
        self._spooled_runs.update(self._pending)
        self._pending.clear()
        self._ends.clear()
        for e in ends:
            e.spooled = True
            e.done.set()
        if first:
            self.warn(f"MLflow store refused writes for {spool_after_s():g} s "
                      f"({first_line(err)}): points go to {self.spool.path} until it takes "
                      f"them again; the next sweep launch or `sweep status --repair` replays them")

    def _spool_backlog(self) -> None:
        """More points queued than ``SWEEP_BACKLOG_POINTS``: the store takes them more slowly
        than they come. Every queued point goes to the spool (memory stays bounded); the runs'
        ends follow their points there."""
        records = [{"run": run_id, "metrics": points}
                   for run_id, points in self._pending.items() if points]
        count = sum(len(r["metrics"]) for r in records)
        try:
            self.spool.append(records)
        except OSError as disk:
            self.warn(f"backlog of {count} point(s) not spooled ({first_line(disk)}); kept")
            return
        if not self.spooled:
            self.warn(f"MLflow store takes points more slowly than they come: over "
                      f"{self._backlog_cap} queued, spooling to {self.spool.path} (replayed by the "
                      f"next sweep launch or `sweep status --repair`)")
        self.spooled += count
        self._spooled_runs.update(r["run"] for r in records)
        self._pending.clear()

    def _set_aside_run(self, run_id: str, err: Exception) -> None:
        """A run the store will never take (deleted, not active, its row gone): its points and
        end leave the queue for the spool's set-aside file, with the reason; other runs go on."""
        points = self._pending.pop(run_id, [])
        ends = [e for e in self._ends if e.run_id == run_id]
        records = ([{"run": run_id, "metrics": points}] if points else []) + \
            [_end_record(e) for e in ends]
        try:
            self.spool.set_aside(records, first_line(err))
        except OSError as disk:
            self.warn(f"cannot set aside run {run_id}'s points ({first_line(disk)}); dropped")
        self.set_aside += len(points)
        self.warn(f"MLflow store will never take run {run_id}'s writes ({first_line(err)}): "
                  f"{len(points)} point(s) set aside in {self.spool.folder}; `sweep status` "
                  f"names them")
        for e in ends:
            self._ends.remove(e)
            e.spooled = True
            e.done.set()

    def _settle(self) -> None:
        if self._drains and not (self._pending or self._ends):
            for mark in self._drains:
                mark.done.set()
            self._drains.clear()


def _end_record(end: RunEnd) -> dict:
    """A run's end as a spool line (``spool`` describes the format)."""
    return {"run": end.run_id, "end": end.status, "end_time": end.end_time, "tags": end.tags}
