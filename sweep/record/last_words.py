"""A stop's last words for the writer: everything queued goes to the spool from the stopping
thread (the writer thread may hang in a store that is down), by one speaker at a time, and one
line says what is where (stored, spooled, lost, with counts)."""

from __future__ import annotations

import threading
from typing import Callable

from sweep.base.text import first_line
from sweep.record.writer_inbox import Inbox
from sweep.record.writer_work import RunEnd, end_record, points_record


class LastWords:
    """The spool-now path of one writer: ``inbox`` and its ``core``, the process's ``spool``
    segment, ``warn`` for one line per event, ``wake`` to let the writer thread see it is
    abandoned."""

    def __init__(self, inbox: Inbox, spool, warn: Callable[[str], None], wake: threading.Event):
        self.inbox, self.core, self.spool = inbox, inbox.core, spool
        self.warn, self.wake = warn, wake
        self._words = threading.Lock()  # one speaker at a time
        self.speaking = 0  # points of the spool write under way
        self.lost = 0  # points neither stored nor spooled at the stop (the disk refused them)

    def spool_now(self, wait_s: float | None = None) -> bool:
        """Write every queued point and run end to the spool now, from the calling thread; the
        writer thread then writes nothing more. One caller at a time: a second one (the stop's
        timer while the main thread spools) waits for the first to finish, at most ``wait_s``
        seconds (None: no limit), then adds only what was queued since. A chunk the thread is
        sending right now may end up both stored and spooled: a replay stores it once (the
        spool's exactly-once rule). False when the disk refuses (the points are counted in
        ``lost``) or the wait ran out."""
        if not self._words.acquire(timeout=-1 if wait_s is None else max(0.0, wait_s)):
            return False
        try:
            return self._spool_queued()
        finally:
            self._words.release()

    def _spool_queued(self) -> bool:
        pending, ends, queued = self.inbox.abandon()
        for item in queued:
            if isinstance(item, tuple):
                pending.setdefault(item[0], []).extend(item[1])
            elif isinstance(item, RunEnd):
                ends.append(item)
            else:
                item.done.set()  # a drain: everything before it is spooled below
        records = [points_record(run, points) for run, points in pending.items() if points]
        records += [end_record(e) for e in ends]
        count = sum(len(p) for p in pending.values())
        self.speaking = count
        if records:
            try:
                self.spool.append(records)
            except OSError as disk:
                self.lost += count
                self.warn(f"cannot spool to {self.spool.folder} at the stop "
                          f"({first_line(disk)}): {count} point(s) lost")
                return False
            finally:
                self.speaking = 0
            self.core.count_spooled(count)
            self.warn(f"MLflow: stopping: {count} queued point(s) and {len(ends)} run end(s) "
                      f"spooled to {self.spool.path}; the next sweep launch or `sweep status "
                      f"--repair` replays them")
        for e in ends:
            e.spooled = True
            e.done.set()
        self.wake.set()
        return True

    def whereabouts(self, stored: int, spooled: int, lost: int) -> str:
        """One line for a stop's exit: what the writer stored, spooled (where) and lost, with
        counts; and what a spool write under way holds, if one has not finished."""
        where = self.spool.path or self.spool.folder
        line = (f"MLflow: {stored:,} point(s) stored, {spooled:,} spooled to {where}"
                f"{' (the next sweep launch or `sweep status --repair` replays them)' if spooled else ''}"
                f", {lost:,} lost")
        if self.speaking:
            line += (f"; a spool write of {self.speaking:,} point(s) had not finished "
                     f"(lost unless the segment holds them)")
        return line
