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
  408/429/5xx, a proxy's 404, connection refused: any transient exception) is retried with exponential backoff (0.2 s
  doubling to 5 s); nothing queued is discarded. Once the store has refused for
  ``SWEEP_SPOOL_AFTER_S`` seconds (60), everything pending goes to the spool on local disk
  (``sweep.record.spool``), and so does whatever arrives while the store stays down (one
  attempt every 5 s); the first accepted write ends the outage.
* A run's end (tags, status) goes through the same queue after its points: it is sent only
  once every point of the run is stored, or spooled together with them.
* Credentials refused (HTTP 401/403, ``store_errors.is_credentials``): everything pending goes
  to the spool at once, with one line naming the fix; the store is still tried on the backoff.
* A refusal that will never pass (``store_errors.is_permanent``: a deleted or inactive run, a
  row gone) sets that run's points and end aside in the spool folder with the reason; the
  other runs go on (``sweep status --repair`` puts them back once the cause is fixed).
* More than ``SWEEP_BACKLOG_POINTS`` queued: they go to the spool although the store takes
  writes (memory stays bounded when the store is slower than the trainer).
* A stop (``stopping``): ``settle_by(deadline)`` lets the thread store what it can until the
  deadline, then ``spool_now`` writes the rest to the spool from the stopping thread.

The rules live in ``writer_core.WriterCore`` (no thread, no clock of its own: tested with a fake
clock); this module is the thin shell around it: the one thread, over the inbox the training
thread appends to (``writer_inbox``), the handles callers wait on (``writer_work``) and a stop's
last words (``last_words``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

from sweep.base.text import first_line
from sweep.errors import TrackingError
from sweep.record.batch import MAX_BATCH, metric_sender, run_finisher
from sweep.record.last_words import LastWords
from sweep.record.spool import SpoolWriter
from sweep.record.writer_core import FLUSH_S, WriterCore
from sweep.record.writer_inbox import Inbox
from sweep.record.writer_work import Drain, RunEnd

__all__ = ["FLUSH_S", "MetricWriter", "RunEnd", "backlog_points", "spool_after_s"]


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


class MetricWriter:
    """The one thread that writes a process's points to one MLflow store (see module doc).

    ``client`` is an ``MlflowClient``; ``spool`` this process's spool segment; ``warn`` gets one
    line when an outage starts, when points are spooled and when the store takes writes again.
    ``senders``: threads that send different runs' points at once, for a tracking server (the
    store's work is the server's; the round trips of the 20-35 ms calls then overlap).
    ``on_stored(points, now_ms)`` (benchmarks) hears of every stored chunk. ``send(run_id,
    points)`` stores one chunk (``sql_metrics.bulk_sender`` for MLflow's SQL stores; default
    ``log_batch``)."""

    def __init__(self, client, spool: SpoolWriter, senders: int = 1,
                 warn: Callable[[str], None] | None = None, on_stored: Callable | None = None,
                 send: Callable | None = None):
        self.client, self.spool = client, spool
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self._pool = None
        if senders > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(senders, thread_name_prefix="mlflow-send")
        self.core = WriterCore(send or metric_sender(client), run_finisher(client), spool,
                               spool_after_s=spool_after_s(), backlog_cap=backlog_points(),
                               warn=self.warn, on_stored=on_stored,
                               mapper=self._pool.map if self._pool is not None else None)
        self._inbox = Inbox(self.core, spool, self.warn)
        self._wake = threading.Event()
        self._words = LastWords(self._inbox, spool, self.warn, self._wake)
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()

    # -- the counts (the core's, the inbox's and the last words') --
    stored = property(lambda self: self.core.stored, doc="points the store took")
    spooled = property(lambda self: self.core.spooled + self._inbox.spooled,
                       doc="points written to the spool")
    lost = property(lambda self: self.core.lost + self._words.lost + self._inbox.lost,
                    doc="points neither stored nor spooled (the store and the disk refused)")
    set_aside = property(lambda self: self.core.set_aside,
                         doc="points of runs the store will never take")
    backlog = property(lambda self: self.core.backlog,
                       doc="points taken off the queue and not yet stored (the writer's lag)")
    busy_s = property(lambda self: self.core.busy_s, doc="time spent writing, s")
    stored_by_run = property(lambda self: self.core.stored_by_run)
    seconds_by_run = property(lambda self: self.core.seconds_by_run)

    @property
    def queued(self) -> int:
        """Points handed to the writer and not yet stored or spooled (benchmarks)."""
        return self._inbox.queued_points + sum(len(p) for p in list(self.core.pending.values()))

    @property
    def on_stored(self) -> Callable | None:
        return self.core.on_stored

    @on_stored.setter
    def on_stored(self, hook: Callable | None) -> None:
        self.core.on_stored = hook

    @property
    def refusing(self) -> bool:
        """Whether the store refused the last write (an outage under way)."""
        return self.core.refusing

    # -- the training thread's side: appends only --
    def put_many(self, run_id: str, points) -> None:
        """Queue ``points``: (key, value, timestamp ms, step) tuples of one run. Memory is
        bounded here: while the inbox already holds ``SWEEP_BACKLOG_POINTS`` (the thread is not
        taking them: a store call that does not return), the points go to the spool from this
        thread instead, or are counted lost when the disk refuses too (``writer_inbox``)."""
        self._inbox.put_many(run_id, points)

    def end(self, end: RunEnd) -> threading.Event:
        """Queue a run's end after its points; returns the event set once it is written."""
        self._inbox.append(end)
        self._wake.set()
        return end.done

    def drain(self, deadline: float | None = None) -> bool:
        """Wait until everything queued before this call is stored or spooled, or until
        ``deadline`` (a ``time.monotonic()`` value; None: no limit). True when it is."""
        mark = Drain()
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

    def spool_now(self, wait_s: float | None = None) -> bool:
        """Write every queued point and run end to the spool now, from the calling thread (a
        stop's deadline or second signal, when the writer thread may hang in a store that is
        down); the thread then writes nothing more. One caller at a time; a second waits at
        most ``wait_s`` seconds (``last_words.LastWords.spool_now``). False when the disk
        refuses (the points are counted in ``lost``) or the wait ran out."""
        return self._words.spool_now(wait_s)

    def whereabouts(self) -> str:
        """One line for a stop's exit: what this process's writer stored, spooled (where) and
        lost, with counts; and what a spool write under way holds, if one has not finished."""
        return self._words.whereabouts(self.stored, self.spooled, self.lost)

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
        core, inbox = self.core, self._inbox
        while True:
            self._wake.clear()  # before taking: a wake that comes later is not lost
            if inbox.abandoned:
                for mark in core.queue.drains:
                    mark.done.set()
                return
            inbox.hand_over()
            core.enforce_cap(time.monotonic())
            if self._closing and core.idle and not inbox.items:
                return
            try:
                core.step(time.monotonic())
            except Exception as err:  # a bug here must not stop the thread every run relies on
                self.warn(f"MLflow writer: {type(err).__name__}: {first_line(err)}; retrying")
                core.backoff_after_error(time.monotonic())
            wait = core.wait_s(time.monotonic(), self._closing)
            if wait > 0:
                self._wake.wait(wait)
