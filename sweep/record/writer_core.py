"""The metric writer's thread-free core: what is queued, when to try the store again, and when
points go to the spool or are set aside. No thread, no sleep, no clock of its own: the caller
(``metric_writer.MetricWriter``, or a test with a fake clock) feeds it items, asks whether a
write is ``due(now)``, runs a ``step(now)`` and sleeps for ``wait_s(now)``.

The rules (``metric_writer`` tells the story):

* a refused write (any exception the ``permanent`` rule does not name) is retried with the
  project's ``Backoff`` (0.2 s doubling to 5 s here); nothing queued is discarded;
* credentials refused (HTTP 401/403): everything pending goes to the spool at once, one line
  names the fix, and the store is still tried on the backoff;
* once the store has refused for ``spool_after_s`` seconds everything pending goes to the
  spool, and so does whatever arrives while it stays down; the first accepted write ends it;
* a run's end is sent only once every point of the run is stored, or spooled with them;
* a permanent refusal sets that run's points and end aside; the other runs go on;
* more than ``backlog_cap`` points queued: they go to the spool although the store takes
  writes.

The store is reached only through the two callables it is handed: ``send(run_id, points)``
(one chunk of at most ``MAX_BATCH`` points) and ``finish(end)`` (a ``RunEnd``).

The core is three parts, each a file (as MLflow's ``async_logging/``): the queue state
(``writer_queue``), the outage rule (``writer_outage``) and the spool and set-aside rules
(``writer_spool``); this module drives one write through them."""

from __future__ import annotations

import collections
import time
from typing import Callable, Iterable

from sweep.base.text import first_line
from sweep.record.batch import MAX_BATCH
from sweep.record.store_errors import is_permanent
from sweep.record.writer_outage import FIRST_BACKOFF_S, MAX_BACKOFF_S, REPLAY_HINT, Outage
from sweep.record.writer_queue import WriterQueue
from sweep.record.writer_spool import SpoolRules
from sweep.record.writer_work import RunEnd

__all__ = ["FIRST_BACKOFF_S", "FLUSH_S", "MAX_BACKOFF_S", "REPLAY_HINT", "WriterCore"]

FLUSH_S = 1.0  # the longest a point waits on the queue before a write (the UI lags this)


class WriterCore:
    """The writer's state and rules (module docstring), driven by an explicit ``now``
    (``time.monotonic()`` seconds, or a test's fake clock).

    ``spool`` is a ``spool.SpoolWriter`` (``append``, ``set_aside``, ``folder``, ``path``);
    ``warn`` hears one line per event a person should know of. ``mapper(fn, runs)`` sends
    several runs at once (a thread pool's ``map``; None: one after the other, stopping at the
    first refusal). ``on_stored(points, now_ms)`` (benchmarks) hears of every stored chunk;
    ``timer`` measures the time spent writing (``busy_s``)."""

    def __init__(self, send: Callable[[str, list], None], finish: Callable[[RunEnd], None],
                 spool, *, spool_after_s: float, backlog_cap: int, warn: Callable[[str], None],
                 permanent: Callable[[BaseException], bool] = is_permanent,
                 mapper: Callable | None = None, on_stored: Callable | None = None,
                 timer: Callable[[], float] = time.perf_counter):
        self.send, self.finish, self.spool, self.warn = send, finish, spool, warn
        self.permanent, self.mapper, self.on_stored, self.timer = permanent, mapper, on_stored, timer
        self.queue = WriterQueue()
        self.outage = Outage(spool_after_s, warn, spool.folder)
        self.rules = SpoolRules(spool, self.queue, warn, backlog_cap)
        self.stored = 0  # points the store took
        self.busy_s = 0.0  # time spent writing (benchmarks: capacity = stored / busy_s)
        self.stored_by_run: dict[str, int] = collections.Counter()
        self.seconds_by_run: dict[str, float] = collections.Counter()

    # -- the parts' state, as the shell and the tests read it --
    pending = property(lambda self: self.queue.pending,
                       doc="run id -> [(key, value, ts, step)] not yet sent")
    ends = property(lambda self: self.queue.ends, doc="run ends waiting for their run's points")
    backlog = property(lambda self: self.queue.backlog,
                       doc="points fed and not yet stored (the writer's lag)")
    busy = property(lambda self: self.queue.busy, doc="points or run ends wait for the store")
    idle = property(lambda self: self.queue.idle, doc="nothing pending and nobody waiting")
    refusing = property(lambda self: self.outage.refusing,
                        doc="whether the store refused the last write (an outage under way)")
    spool_after_s = property(lambda self: self.outage.spool_after_s)
    backlog_cap = property(lambda self: self.rules.backlog_cap)
    spooled = property(lambda self: self.rules.spooled, doc="points written to the spool")
    set_aside = property(lambda self: self.rules.set_aside,
                         doc="points of runs the store will never take")
    lost = property(lambda self: self.rules.lost,
                    doc="points dropped: the store and the disk refused, memory at the cap")

    # -- what the shell asks --
    def feed(self, items: Iterable) -> None:
        """Take queued items: ``(run_id, points)`` tuples, ``RunEnd``s and ``Drain`` marks."""
        self.queue.feed(items)

    def enforce_cap(self, now: float) -> None:
        """Spool every pending point when more than ``backlog_cap`` are pending (the disk
        refusing: drop the newest beyond it, counted; ``SpoolRules.enforce_cap``)."""
        self.rules.enforce_cap(now)

    def due(self, now: float) -> bool:
        """Whether a write should be tried at ``now``."""
        return self.busy and now >= self.outage.next_try

    def step(self, now: float) -> None:
        """One turn: a write if one is due, then release the drains that are settled."""
        if self.due(now):
            began = self.timer()
            self.write(now)
            self.busy_s += self.timer() - began
        self.queue.settle()

    def wait_s(self, now: float, closing: bool = False) -> float:
        """Seconds the shell may sleep before the next ``step`` (0: at once); new items
        arriving meanwhile may cut it short."""
        queue, next_try, disk_at = self.queue, self.outage.next_try, self.rules.disk_retry_at
        if queue.busy and next_try > now:  # backing off after a refusal
            return next_try - now
        if queue.ends and not queue.pending and disk_at > now and all(
                e.run_id in self.rules.spooled_runs for e in queue.ends):
            return disk_at - now  # only ends the refusing disk must take are left
        if queue.busy and (queue.ends or queue.drains or closing
                           or any(len(p) >= MAX_BATCH for p in queue.pending.values())):
            return 0.0  # someone waits for these, or a full chunk is ready: no pause
        if closing or queue.drains:
            return 0.0
        return FLUSH_S

    def settle(self) -> None:
        """Set every drain mark once nothing is pending."""
        self.queue.settle()

    def mark_spooled(self, run_id: str) -> None:
        """Points of ``run_id`` went to the spool past the core (the point of entry's bound):
        its end follows them there."""
        self.rules.spooled_runs.add(run_id)

    def count_spooled(self, points: int) -> None:
        """``points`` went to the spool past the core (a stop's last words)."""
        self.rules.spooled += points

    def snapshot(self) -> tuple[dict[str, list], list[RunEnd]]:
        """Copies of what is pending (a stop's last words spool them from another thread)."""
        return self.queue.snapshot()

    def backoff_after_error(self, now: float) -> None:
        """A bug in a step (not a refusal): try again after the longest backoff."""
        self.outage.after_error(now)

    # -- one write --
    def write(self, now: float) -> None:
        """Send every pending point, then every end whose run has none left; on a refusal note
        it and return (what was not sent waits for the next try)."""
        queue, rules = self.queue, self.rules
        for run_id in [r for r in queue.pending if r in rules.set_aside_runs]:
            rules.set_aside_run(run_id, rules.set_aside_runs[run_id])  # not sent again
        runs = list(queue.pending)
        if self.mapper is not None and len(runs) > 1:
            results = list(self.mapper(lambda r: self._send_run(r, queue.pending[r]), runs))
        else:
            results = []
            for run_id in runs:
                results.append(self._send_run(run_id, queue.pending[run_id]))
                if results[-1][0] is not None and not self.permanent(results[-1][0]):
                    break  # the store is away: the other runs would be refused too
        refused = None
        for run_id, (err, stored, seconds) in zip(runs, results):
            self.stored += stored
            self.stored_by_run[run_id] += stored
            self.seconds_by_run[run_id] += seconds
            if err is not None and self.permanent(err):
                rules.set_aside_run(run_id, first_line(err))
            elif err is not None and refused is None:
                refused = err
        queue.recount()
        if refused is not None:
            self._refused(refused, now)
            return
        for end in [e for e in queue.ends if e.run_id not in queue.pending]:
            if end.run_id in rules.set_aside_runs:
                rules.set_aside_run(end.run_id, rules.set_aside_runs[end.run_id])
            elif end.run_id in rules.spooled_runs:  # its points wait in the spool: so does its end
                rules.spool_end(end, now)
            elif not self._finish(end, now):
                return
        self.outage.accepted(rules.spooled)

    def _finish(self, end: RunEnd, now: float) -> bool:
        """Send one run's end; False when the store refused it for now (an outage)."""
        try:
            self.finish(end)
        except Exception as err:
            if self.permanent(err):
                self.rules.set_aside_run(end.run_id, first_line(err))
                return True
            self._refused(err, now)
            return False
        self.queue.release(end, spooled=False)
        return True

    def _refused(self, err: Exception, now: float) -> None:
        if self.outage.refused(err, now):
            # credentials refused: the outage's line already said where the points go
            self.rules.spool_all(err, now, self.outage.spool_after_s,
                                 told=self.outage.credentials)

    def _send_run(self, run_id: str, points: list) -> tuple[Exception | None, int, float]:
        """Send one run's points in chunks of MAX_BATCH, removing each chunk once stored:
        (the refusal or None, points stored, seconds spent). May run on a sender thread."""
        stored, seconds = 0, 0.0
        while points:
            chunk = points[:MAX_BATCH]
            began = self.timer()
            try:
                self.send(run_id, chunk)
            except Exception as err:
                return err, stored, seconds
            del points[:len(chunk)]
            stored += len(chunk)
            seconds += self.timer() - began
            if self.on_stored is not None:
                self.on_stored(chunk, time.time() * 1000)
        return None, stored, seconds
