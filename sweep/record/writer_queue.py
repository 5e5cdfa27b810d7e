"""The writer's queue state: the points each run has not had stored yet, the run ends waiting for
them and the drain marks waiting for both (what ``writer_core.WriterCore`` works on). Plain
state, no store, no clock, no thread."""

from __future__ import annotations

from typing import Iterable

from sweep.record.writer_work import Drain, RunEnd


class WriterQueue:
    """What the writer holds: ``pending`` (run id -> [(key, value, ts ms, step)] not yet sent),
    ``ends`` (``RunEnd``s waiting for their run's points), ``drains`` (``Drain`` marks) and
    ``backlog`` (the points in ``pending``, kept by whoever changes it through ``recount``)."""

    def __init__(self):
        self.pending: dict[str, list] = {}
        self.ends: list[RunEnd] = []
        self.drains: list[Drain] = []
        self.backlog = 0

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
        self.recount()

    def recount(self) -> None:
        """``backlog`` after ``pending`` changed; runs left without a point leave ``pending``."""
        for run_id in [r for r, points in self.pending.items() if not points]:
            del self.pending[run_id]
        self.backlog = sum(len(p) for p in self.pending.values())

    @property
    def busy(self) -> bool:
        """Points or run ends wait for the store."""
        return bool(self.pending or self.ends)

    @property
    def idle(self) -> bool:
        """Nothing pending and nobody waiting."""
        return not (self.pending or self.ends or self.drains)

    def release(self, end: RunEnd, spooled: bool) -> None:
        """``end`` is written (``spooled``: to the spool) or set aside: its waiter wakes."""
        self.ends.remove(end)
        end.spooled = spooled
        end.done.set()

    def clear_pending(self) -> None:
        """Every pending point is in the spool now."""
        self.pending.clear()
        self.backlog = 0

    def settle(self) -> None:
        """Set every drain mark once nothing is pending."""
        if self.drains and not self.busy:
            for mark in self.drains:
                mark.done.set()
            self.drains.clear()

    def snapshot(self) -> tuple[dict[str, list], list[RunEnd]]:
        """Copies of what is pending (a stop's last words spool them from another thread)."""
        return {run: list(points) for run, points in list(self.pending.items())}, list(self.ends)

    def drop_newest(self, excess: int) -> dict[str, int]:
        """Drop the ``excess`` newest points from the runs holding the most; returns the points
        dropped per run."""
        dropped: dict[str, int] = {}
        while excess > 0:
            run_id = max(self.pending, key=lambda r: len(self.pending[r]))
            points = self.pending[run_id]
            cut = min(excess, len(points))
            del points[len(points) - cut:]
            dropped[run_id] = dropped.get(run_id, 0) + cut
            excess -= cut
        self.backlog -= sum(dropped.values())
        return dropped
