"""The writer's inbox: what the training thread appends to (no lock, no I/O on the common path)
and the writer thread takes from, bounded at the point of entry. While the inbox already holds
the backlog cap (the thread is not taking: a store call that does not return), further points go
to the spool from the training thread, or are counted lost when the disk refuses too."""

from __future__ import annotations

import collections
import threading
from typing import Callable

from sweep.base.text import first_line
from sweep.record.writer_work import points_record


class Inbox:
    """Items queued for the writer: ``(run_id, points)`` tuples, run ends and drain marks, in
    order. ``core`` is the ``writer_core.WriterCore`` they are handed to (its ``backlog_cap``
    bounds the inbox too); ``spool`` the process's segment; ``warn`` hears one line the first
    time the bound spools or loses points."""

    def __init__(self, core, spool, warn: Callable[[str], None]):
        self.core, self.spool, self.warn = core, spool, warn
        self.items: collections.deque = collections.deque()
        # Held while items move from the inbox into the core, so that a stop's last words
        # (another thread) see every queued item in one place or the other.
        self._moving = threading.RLock()  # reentrant: a second signal's handler may speak
        self.abandoned = False  # the last words took everything: the thread writes nothing more
        self._entry = threading.Lock()
        self._points = 0  # points in the inbox (not yet taken by the thread)
        self.spooled = 0  # points the bound sent to the spool
        self.lost = 0  # points the bound could not spool (the disk refused)
        self._warned = False

    def put_many(self, run_id: str, points) -> None:
        """Queue one run's points; over the cap, spool them from this thread instead."""
        with self._entry:
            over = self._points + len(points) > self.core.backlog_cap
            if not over:
                self._points += len(points)
        if over:
            self._spool_at_entry(run_id, list(points))
            return
        self.items.append((run_id, points))

    def append(self, item) -> None:
        """Queue a run end or a drain mark (after everything queued before it)."""
        self.items.append(item)

    @property
    def queued_points(self) -> int:
        """Points in the inbox, not yet taken by the thread."""
        return sum(len(item[1]) for item in list(self.items) if isinstance(item, tuple))

    def hand_over(self) -> None:
        """The writer thread's turn: everything queued goes to the core (nothing once the last
        words took over)."""
        with self._moving:
            if self.abandoned:
                return
            items = self._pop_all()
            self.core.feed(items)
        taken = sum(len(item[1]) for item in items if isinstance(item, tuple))
        with self._entry:
            self._points -= taken

    def abandon(self) -> tuple[dict[str, list], list, list]:
        """The last words take over: (copies of what the core holds, the first time only, as
        pending points and ends; every item still in the inbox). The thread writes nothing
        more."""
        with self._moving:
            pending, ends = {}, []
            if not self.abandoned:  # a second call adds only new items
                pending, ends = self.core.snapshot()
            self.abandoned = True
            return pending, ends, self._pop_all()

    def _pop_all(self) -> list:
        items = []
        while self.items:
            items.append(self.items.popleft())
        return items

    def _spool_at_entry(self, run_id: str, points: list) -> None:
        try:
            self.spool.append([points_record(run_id, points)])
        except OSError as disk:
            with self._entry:
                self.lost += len(points)
            why = f"the spool refuses too ({first_line(disk, strerror=True)}): point(s) lost"
        else:
            self.core.mark_spooled(run_id)
            with self._entry:
                self.spooled += len(points)
            why = f"point(s) go to {self.spool.path} as they come"
        if not self._warned:
            self._warned = True
            self.warn(f"MLflow writer: over {self.core.backlog_cap} points wait for a store call "
                      f"that has not returned; {why} (SWEEP_BACKLOG_POINTS bounds the memory)")
