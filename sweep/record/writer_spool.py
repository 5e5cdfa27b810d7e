"""The writer's spool and set-aside rules: what goes to the spool (an outage past its bound, a
backlog over its cap, the ends of runs whose points are there), what is set aside (runs the
store will never take), and what happens when the spool's disk refuses too (kept in memory
within the cap, tried again on the disk's own backoff, the newest beyond the cap dropped and
counted; one line per episode). Works on a ``writer_queue.WriterQueue``; no clock of its own."""

from __future__ import annotations

from typing import Callable

from sweep.base.backoff import Backoff
from sweep.base.text import first_line
from sweep.record.writer_outage import FIRST_BACKOFF_S, MAX_BACKOFF_S, REPLAY_HINT
from sweep.record.writer_queue import WriterQueue
from sweep.record.writer_work import RunEnd, end_record, points_record


class SpoolRules:
    """Moves the queue's points and ends to ``spool`` (a ``spool.SpoolWriter``: ``append``,
    ``set_aside``, ``folder``, ``path``) and counts them: ``spooled``, ``set_aside`` (runs the
    store will never take) and ``lost`` (the store and the disk refused, memory at
    ``backlog_cap``). ``warn`` hears one line per episode."""

    def __init__(self, spool, queue: WriterQueue, warn: Callable[[str], None], backlog_cap: int):
        self.spool, self.queue, self.warn, self.backlog_cap = spool, queue, warn, backlog_cap
        self.spooled_runs: set[str] = set()  # runs with points in the spool: their ends follow
        self.set_aside_runs: dict[str, str] = {}  # run id -> why the store will never take it
        # The spool's disk refused (full, over quota): retried on its own backoff, warned once
        # per episode, so a full disk never makes the writer spin or fill the log.
        self._disk_backoff = Backoff(FIRST_BACKOFF_S, MAX_BACKOFF_S)
        self.disk_retry_at = 0.0  # no spool write before this ``now``
        self._disk_warned = False
        self._drop_warned = False  # one line per episode of drops, however many batches
        self.spooled = 0  # points written to the spool
        self.set_aside = 0  # points of runs the store will never take
        self.lost = 0  # points dropped: the store and the disk refused, and memory was at the cap

    def disk_ready(self, now: float) -> bool:
        """Whether a spool write may be tried at ``now`` (the disk is not backing off)."""
        return now >= self.disk_retry_at

    # -- points --
    def enforce_cap(self, now: float) -> None:
        """Spool every pending point when more than ``backlog_cap`` are pending. While the disk
        refuses, what exceeds the cap is dropped (counted in ``lost``, warned once): memory
        stays bounded whatever the store and the disk do."""
        if self.queue.backlog <= self.backlog_cap:
            return
        if self.disk_ready(now) and self._spool_backlog(now):
            return
        self._drop_beyond_cap()

    def spool_all(self, err: BaseException, now: float, spool_after_s: float,
                  told: bool = False) -> None:
        """Everything pending to the spool (the store has refused for ``spool_after_s``, or
        refused the credentials): points, then the ends of runs that have no unsent point left.
        Kept in memory (and retried) when the disk refuses too. ``told``: a line already said
        where the points go (no line of its own)."""
        if not self.disk_ready(now):
            return
        queue = self.queue
        records = [points_record(run_id, points) for run_id, points in queue.pending.items()]
        ends = list(queue.ends)
        records += [end_record(e) for e in ends]
        count = sum(len(p) for p in queue.pending.values())
        try:
            self.spool.append(records)
        except OSError as disk:
            self._disk_refused(disk, now, f"{count} point(s) and {len(ends)} run end(s)")
            return
        self._disk_accepted()
        first = self.spooled == 0
        self.spooled += count
        self.spooled_runs.update(queue.pending)
        queue.clear_pending()
        for e in ends:
            queue.release(e, spooled=True)
        if first and not told:
            self.warn(f"MLflow store refused writes for {spool_after_s:g} s "
                      f"({first_line(err)}): points go to {self.spool.path} until it takes "
                      f"them again; {REPLAY_HINT}")

    def _spool_backlog(self, now: float) -> bool:
        """More points pending than the cap: the store takes them more slowly than they come.
        Every pending point goes to the spool (memory stays bounded); the runs' ends follow
        their points there. False when the disk refuses."""
        queue = self.queue
        records = [points_record(run_id, points)
                   for run_id, points in queue.pending.items() if points]
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
        self.spooled_runs.update(r["run"] for r in records)
        queue.clear_pending()
        return True

    def _drop_beyond_cap(self) -> None:
        """Memory at the cap and nowhere to put more: drop the newest points beyond it, from
        the runs holding the most (``sweep status`` names each run that lacks points)."""
        dropped = self.queue.drop_newest(self.queue.backlog - self.backlog_cap)
        count = sum(dropped.values())
        self.lost += count
        if self._drop_warned:  # counted in ``lost``; the first line said what is happening
            return
        self._drop_warned = True
        self.warn(f"MLflow store and spool both refuse and {self.backlog_cap} points are held in "
                  f"memory (SWEEP_BACKLOG_POINTS): newer points are dropped and counted ({count} of "
                  f"{len(dropped)} run(s) so far); `sweep status` names those runs")

    # -- a run's end whose points are in the spool --
    def spool_end(self, end: RunEnd, now: float) -> None:
        """``end`` follows its run's points to the spool (released once there); while the
        disk refuses it waits in the queue."""
        if not self.disk_ready(now):
            return
        try:
            self.spool.append([end_record(end)])
        except OSError as disk:
            self._disk_refused(disk, now, f"the end of run {end.run_id}")
            return
        self._disk_accepted()
        self.queue.release(end, spooled=True)

    # -- the disk --
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

    # -- runs the store will never take --
    def set_aside_run(self, run_id: str, reason: str) -> None:
        """A run the store will never take (deleted, not active, its row gone): its points and
        end leave the queue for the spool's set-aside file, with the reason; other runs go on.
        Warned once per run; its later points and end follow without another try."""
        queue = self.queue
        points = queue.pending.pop(run_id, [])
        ends = [e for e in queue.ends if e.run_id == run_id]
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
        if run_id not in self.set_aside_runs:
            self.set_aside_runs[run_id] = reason
            self.warn(f"MLflow store will never take run {run_id}'s writes ({reason}): its "
                      f"points are set aside in {self.spool.folder}; `sweep status` names them "
                      f"and `sweep status --repair` replays them once the run is restored")
        for e in ends:
            queue.release(e, spooled=True)
