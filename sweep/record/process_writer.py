"""The process's side of the record: its one metric writer for a store (started on first use),
the background thread that ends runs and draws LR curves, and what a stop and the progress line
ask of them (wait, settle by a deadline, spool now, the lag)."""

from __future__ import annotations

import threading
import time

from sweep.base.stopping import LAST_WORDS_S, WORDS_WAIT_S
from sweep.record.metric_writer import MetricWriter
from sweep.record.spool import SpoolWriter, spool_dir
from sweep.record.sql_metrics import bulk_sender

# A backlog shown in the progress line: more than a pack of 32 logs in about two seconds (two
# steps' points per slot at 60 steps/s), i.e. the writer is more than a flush or two behind.
LAG_SHOWN_POINTS = 8_000


class ProcessWriter:
    """The writer and background thread of one process for one store (``uri``, ``client``);
    safe to share between threads."""

    def __init__(self, uri: str, client):
        self.uri, self.client = uri, client
        self._pending: list = []  # futures of in_background work
        self._executor = None
        self._writer: MetricWriter | None = None
        self._writer_lock = threading.Lock()

    @property
    def started(self) -> MetricWriter | None:
        """The metric writer if one was started (None: no point was ever queued)."""
        return self._writer

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

    @writer.setter
    def writer(self, writer: MetricWriter) -> None:  # benchmarks hand in their own
        self._writer = writer

    def in_background(self, work) -> None:
        """Run ``work`` on the one background thread, in order (ending runs, drawing LR curves:
        MLflow calls the training thread need not wait for). ``wait()`` joins it; the
        executor's thread is also joined at interpreter exit."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-finish")
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._executor.submit(work))

    def wait(self, deadline: float | None = None) -> None:
        """Wait for the work handed to ``in_background`` and for every queued point to be
        stored or spooled, until ``deadline`` (a ``time.monotonic()`` value; None: no limit)."""
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
            # Two last-words lengths before the deadline: this thread's spool write is done
            # before the stop's timer fires, which then has nothing left to write.
            self._writer.settle_by(deadline - 2 * LAST_WORDS_S)

    def spool_now(self) -> str:
        """The process's last words at a stop's deadline or second signal: spool what is
        queued, from this thread, at once (waiting at most ``WORDS_WAIT_S`` for a spool write
        already under way); returns the line that says what is stored, spooled and lost."""
        if self._writer is None:
            return "MLflow: nothing was queued"
        self._writer.spool_now(wait_s=WORDS_WAIT_S)
        return self._writer.whereabouts()

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

    def close(self) -> None:
        """``wait``, then stop the writer and release this process's spool segment."""
        self.wait()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
