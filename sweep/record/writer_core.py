"""The metric writer's thread-free core: what is queued, when to try the store again, and when
points go to the spool or are set aside. No thread, no sleep, no clock of its own: the caller
(``metric_writer.MetricWriter``, or a test with a fake clock) feeds it items, asks whether a
write is ``due(now)``, runs a ``step(now)`` and sleeps for ``wait_s(now)``.

The rules (``metric_writer`` tells the story):

* a refused write (any exception the ``permanent`` rule does not name) is retried with the
  project's ``Backoff`` (0.2 s doubling to 5 s here); nothing queued is discarded;
* once the store has refused for ``spool_after_s`` seconds everything pending goes to the
  spool, and so does whatever arrives while it stays down; the first accepted write ends it;
* a run's end is sent only once every point of the run is stored, or spooled with them;
* a permanent refusal sets that run's points and end aside; the other runs go on;
* more than ``backlog_cap`` points queued: they go to the spool although the store takes
  writes.

The store is reached only through the two callables it is handed: ``send(run_id, points)``
(one chunk of at most ``MAX_BATCH`` points) and ``finish(end)`` (a ``RunEnd``)."""

from __future__ import annotations

import collections
import time
from typing import Callable, Iterable

from sweep.base.backoff import Backoff
from sweep.base.text import first_line
from sweep.record.batch import MAX_BATCH
from sweep.record.store_errors import is_permanent
from sweep.record.writer_work import Drain, RunEnd, end_record, points_record

FLUSH_S = 1.0  # the longest a point waits on the queue before a write (the UI lags this)
# Shorter than the loop's 0.5 -> 10 s: a refused metric write is retried within a flush or two
# (a lock held for a moment), and an outage is still tried every 5 s.
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.2, 5.0
REPLAY_HINT = "the next sweep launch or `sweep status --repair` replays them"


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
        self.spool_after_s, self.backlog_cap = spool_after_s, backlog_cap
        self.permanent, self.mapper, self.on_stored, self.timer = permanent, mapper, on_stored, timer
        self.pending: dict[str, list] = {}  # run id -> [(key, value, ts, step)] not yet sent
        self.ends: list[RunEnd] = []  # waiting for their run's points
        self.drains: list[Drain] = []
        self.backoff = Backoff(FIRST_BACKOFF_S, MAX_BACKOFF_S)
        self.failing_since: float | None = None  # when the store began refusing
        self.next_try = 0.0  # no write before this ``now``
        self._spooled_runs: set[str] = set()  # runs with points in the spool: their ends follow
        # The spool's disk refused (full, over quota): retried on its own backoff, warned once
        # per episode, so a full disk never makes the writer spin or fill the log.
        self._disk_backoff = Backoff(FIRST_BACKOFF_S, MAX_BACKOFF_S)
        self.disk_retry_at = 0.0  # no spool write before this ``now``
        self._disk_warned = False
        self._drop_warned = False  # one line per episode of drops, however many batches
        self.lost = 0  # points dropped: the store and the disk refused, and memory was at the cap
        self._set_aside_runs: dict[str, str] = {}  # run id -> why the store will never take it
        self.set_aside = 0  # points of runs the store will never take
        self.stored = 0  # points the store took
        self.spooled = 0  # points written to the spool
        self.backlog = 0  # points fed and not yet stored (the writer's lag)
        self.busy_s = 0.0  # time spent writing (benchmarks: capacity = stored / busy_s)
        self.stored_by_run: dict[str, int] = collections.Counter()
        self.seconds_by_run: dict[str, float] = collections.Counter()

    # -- what the shell asks --
    def feed(self, items: Iterable) -> None:
        """Take queued items: ``(run_id, points)`` tuples, ``RunEnd``s and ``Drain`` marks."""
        for item in items:
            if isinstance(item, tuple):
                run_id, points = item
                self.pending.setdefault(run_id, []).extend(points)
            elif isinstance(item, RunEnd):
                self.ends.append(item)
            else:
                self.drains.append(item)
        self.backlog = sum(len(p) for p in self.pending.values())

    def enforce_cap(self, now: float) -> None:
        """Spool every pending point when more than ``backlog_cap`` are pending. While the disk
        refuses, what exceeds the cap is dropped (counted in ``lost``, warned once): memory
        stays bounded whatever the store and the disk do."""
        if self.backlog <= self.backlog_cap:
            return
        if now >= self.disk_retry_at and self._spool_backlog(now):
            return
        self._drop_beyond_cap()

    @property
    def busy(self) -> bool:
        """Points or run ends wait for the store."""
        return bool(self.pending or self.ends)

    @property
    def idle(self) -> bool:
        """Nothing pending and nobody waiting."""
        return not (self.pending or self.ends or self.drains)

    @property
    def refusing(self) -> bool:
        """Whether the store refused the last write (an outage under way)."""
        return self.failing_since is not None

    def due(self, now: float) -> bool:
        """Whether a write should be tried at ``now``."""
        return self.busy and now >= self.next_try

    def step(self, now: float) -> None:
        """One turn: a write if one is due, then release the drains that are settled."""
        if self.due(now):
            began = self.timer()
            self.write(now)
            self.busy_s += self.timer() - began
        self.settle()

    def wait_s(self, now: float, closing: bool = False) -> float:
        """Seconds the shell may sleep before the next ``step`` (0: at once); new items
        arriving meanwhile may cut it short."""
        if self.busy and self.next_try > now:  # backing off after a refusal
            return self.next_try - now
        if self.ends and not self.pending and self.disk_retry_at > now and all(
                e.run_id in self._spooled_runs for e in self.ends):
            return self.disk_retry_at - now  # only ends the refusing disk must take are left
        if self.busy and (self.ends or self.drains or closing
                          or any(len(p) >= MAX_BATCH for p in self.pending.values())):
            return 0.0  # someone waits for these, or a full chunk is ready: no pause
        if closing or self.drains:
            return 0.0
        return FLUSH_S

    def settle(self) -> None:
        """Set every drain mark once nothing is pending."""
        if self.drains and not self.busy:
            for mark in self.drains:
                mark.done.set()
            self.drains.clear()

    def mark_spooled(self, run_id: str) -> None:
        """Points of ``run_id`` went to the spool past the core (the point of entry's bound):
        its end follows them there."""
        self._spooled_runs.add(run_id)

    def snapshot(self) -> tuple[dict[str, list], list[RunEnd]]:
        """Copies of what is pending (a stop's last words spool them from another thread)."""
        return {run: list(points) for run, points in list(self.pending.items())}, list(self.ends)

    def backoff_after_error(self, now: float) -> None:
        """A bug in a step (not a refusal): try again after the longest backoff."""
        self.next_try = now + MAX_BACKOFF_S

    # -- one write --
    def write(self, now: float) -> None:
        """Send every pending point, then every end whose run has none left; on a refusal note
        it and return (what was not sent waits for the next try)."""
        for run_id in [r for r in self.pending if r in self._set_aside_runs]:
            self._set_aside_run(run_id, self._set_aside_runs[run_id])  # not sent again
        runs = list(self.pending)
        if self.mapper is not None and len(runs) > 1:
            results = list(self.mapper(lambda r: self._send_run(r, self.pending[r]), runs))
        else:
            results = []
            for run_id in runs:
                results.append(self._send_run(run_id, self.pending[run_id]))
                if results[-1][0] is not None and not self.permanent(results[-1][0]):
                    break  # the store is away: the other runs would be refused too
        refused = None
        for run_id, (err, stored, seconds) in zip(runs, results):
            self.stored += stored
            self.stored_by_run[run_id] += stored
            self.seconds_by_run[run_id] += seconds
            if err is not None and self.permanent(err):
                self._set_aside_run(run_id, first_line(err))
            elif err is not None and refused is None:
                refused = err
        for run_id in runs:
            if run_id in self.pending and not self.pending[run_id]:
                del self.pending[run_id]
        self.backlog = sum(len(p) for p in self.pending.values())
        if refused is not None:
            self._refused(refused, now)
            return
        for end in [e for e in self.ends if e.run_id not in self.pending]:
            if end.run_id in self._set_aside_runs:
                self._set_aside_run(end.run_id, self._set_aside_runs[end.run_id])
                continue
            if end.run_id in self._spooled_runs:  # its points wait in the spool: so does its end
                if now < self.disk_retry_at:
                    continue
                try:
                    self.spool.append([end_record(end)])
                except OSError as disk:
                    self._disk_refused(disk, now, f"the end of run {end.run_id}")
                    continue
                self._disk_accepted()
                self._release(end, spooled=True)
                continue
            try:
                self.finish(end)
            except Exception as err:
                if self.permanent(err):
                    self._set_aside_run(end.run_id, first_line(err))
                    continue
                self._refused(err, now)
                return
            self._release(end, spooled=False)
        self._accepted()

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

    def _release(self, end: RunEnd, spooled: bool) -> None:
        self.ends.remove(end)
        end.spooled = spooled
        end.done.set()

    def _accepted(self) -> None:
        if self.failing_since is not None:
            self.warn("MLflow store takes writes again"
                      + (f"; {self.spooled} point(s) spooled to {self.spool.folder} are replayed "
                         f"by the next sweep launch or `sweep status --repair`"
                         if self.spooled else ""))
        self.failing_since, self.next_try = None, 0.0
        self.backoff.reset()

    def _refused(self, err: Exception, now: float) -> None:
        if self.failing_since is None:
            self.failing_since = now
            self.backoff.reset()
            self.warn(f"MLflow store refused a write ({first_line(err)}); retrying, and "
                      f"spooling to {self.spool.folder} if it still refuses after "
                      f"{self.spool_after_s:g} s")
        self.next_try = now + self.backoff.next_wait()
        if now - self.failing_since >= self.spool_after_s:
            self._spool_all(err, now)

    # -- the spool --
    def _spool_all(self, err: Exception, now: float) -> None:
        """Everything pending to the spool: points, then the ends of runs that have no
        unsent point left. Kept in memory (and retried) when the disk refuses too."""
        if now < self.disk_retry_at:
            return
        records = [points_record(run_id, points) for run_id, points in self.pending.items()]
        ends = list(self.ends)
        records += [end_record(e) for e in ends]
        count = sum(len(p) for p in self.pending.values())
        try:
            self.spool.append(records)
        except OSError as disk:
            self._disk_refused(disk, now, f"{count} point(s) and {len(ends)} run end(s)")
            return
        self._disk_accepted()
        first = self.spooled == 0
        self.spooled += count
        self._spooled_runs.update(self.pending)
        self.pending.clear()
        self.backlog = 0
        for e in ends:
            self._release(e, spooled=True)
        if first:
            self.warn(f"MLflow store refused writes for {self.spool_after_s:g} s "
                      f"({first_line(err)}): points go to {self.spool.path} until it takes "
                      f"them again; {REPLAY_HINT}")

    def _disk_refused(self, disk: OSError, now: float, what: str) -> None:
        """The spool's disk refused a write: try it again on the disk's own backoff; one line
        per episode."""
        self.disk_retry_at = now + self._disk_backoff.next_wait()
        if not self._disk_warned:
            self._disk_warned = True
            self.warn(f"cannot spool to {self.spool.folder} ({first_line(disk, strerror=True)}): "
                      f"{what} kept in memory (at most {self.backlog_cap} points) and retried "
                      f"every {MAX_BACKOFF_S:g} s at most; free space there or set "
                      f"SWEEP_SPOOL_DIR")

    def _disk_accepted(self) -> None:
        if self._disk_warned:
            self.warn(f"the spool at {self.spool.folder} takes writes again")
        self._disk_warned = False
        self._drop_warned = False
        self._disk_backoff.reset()
        self.disk_retry_at = 0.0

    def _drop_beyond_cap(self) -> None:
        """Memory at the cap and nowhere to put more: drop the newest points beyond it, from
        the runs holding the most (``sweep status`` names each run that lacks points)."""
        excess = self.backlog - self.backlog_cap
        dropped: dict[str, int] = {}
        while excess > 0:
            run_id = max(self.pending, key=lambda r: len(self.pending[r]))
            points = self.pending[run_id]
            cut = min(excess, len(points))
            del points[len(points) - cut:]
            dropped[run_id] = dropped.get(run_id, 0) + cut
            excess -= cut
        count = sum(dropped.values())
        self.lost += count
        self.backlog -= count
        if self._drop_warned:  # counted in ``lost``; the first line said what is happening
            return
        self._drop_warned = True
        self.warn(f"MLflow store and spool both refuse and {self.backlog_cap} points are held in "
                  f"memory (SWEEP_BACKLOG_POINTS): newer points are dropped and counted ({count} of "
                  f"{len(dropped)} run(s) so far); `sweep status` names those runs")

    def _spool_backlog(self, now: float) -> bool:
        """More points pending than the cap: the store takes them more slowly than they come.
        Every pending point goes to the spool (memory stays bounded); the runs' ends follow
        their points there. False when the disk refuses."""
        records = [points_record(run_id, points)
                   for run_id, points in self.pending.items() if points]
        count = sum(len(r["metrics"]) for r in records)
        try:
            self.spool.append(records)
        except OSError as disk:
            self._disk_refused(disk, now, f"a backlog of {count} point(s)")
            return False
        self._disk_accepted()
        if not self.spooled:
            self.warn(f"MLflow store takes points more slowly than they come: over "
                      f"{self.backlog_cap} queued, spooling to {self.spool.path} (replayed by "
                      f"the next sweep launch or `sweep status --repair`)")
        self.spooled += count
        self._spooled_runs.update(r["run"] for r in records)
        self.pending.clear()
        self.backlog = 0
        return True

    def _set_aside_run(self, run_id: str, reason: str) -> None:
        """A run the store will never take (deleted, not active, its row gone): its points and
        end leave the queue for the spool's set-aside file, with the reason; other runs go on.
        Warned once per run; its later points and end follow without another try."""
        points = self.pending.pop(run_id, [])
        ends = [e for e in self.ends if e.run_id == run_id]
        records = ([points_record(run_id, points)] if points else []) + \
            [end_record(e) for e in ends]
        try:
            self.spool.set_aside(records, reason)
        except OSError as disk:
            self.lost += len(points)
            self.warn(f"cannot set aside run {run_id}'s points ({first_line(disk)}): "
                      f"{len(points)} point(s) lost")
        else:
            self.set_aside += len(points)
        if run_id not in self._set_aside_runs:
            self._set_aside_runs[run_id] = reason
            self.warn(f"MLflow store will never take run {run_id}'s writes ({reason}): its "
                      f"points are set aside in {self.spool.folder}; `sweep status` names them")
        for e in ends:
            self._release(e, spooled=True)
