"""What a pack and its caller hand each other: a job to train (``SlotJob``), a slot's end
(``SlotEnd``), and how one slot ends alone: its listeners told, an exception of theirs or of the
slot's machinery ending that slot only, never the pack (the ``PackEnds`` mixin of
``fused_pack.Pack``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from sweep.study.space import TrialConfig
from sweep.training.train import Listener, StopTraining, TrainResult


@dataclass
class SlotJob:
    cfg: TrialConfig              # the slot's complete trial config
    listeners: Sequence[Listener]  # as train()'s; steps/epochs are the slot's own, from 0
    key: object = None            # the caller's handle, handed back in SlotEnd
    # as train()'s: called at each of the slot's epoch ends (before its listeners) with a
    # function that returns the slot's training state from a copy taken then (call it later, on
    # any thread); and a state to continue from (sweep.training.checkpoint)
    checkpoint: Callable[[Callable[[], dict]], None] | None = None
    resume: dict | None = None


@dataclass
class SlotEnd:
    key: object
    result: TrainResult | None = None  # trained all epochs
    stop: StopTraining | None = None   # a listener stopped it (pruned / diverged)
    error: Exception | None = None     # a listener raised another Exception, or the job was bad
    # the slot's machinery failed, not its training (its checkpoint hand-off raised): the
    # caller may re-enqueue the trial to resume it rather than fail it
    requeue: bool = False


class PackEnds:
    """Telling a slot's listeners, and ending one slot (``self.on_end``, timed in the stats)."""

    def _notify(self, s, call: Callable[[Listener], None]) -> None:
        """Call ``s``'s listeners; StopTraining or another Exception ends this slot alone."""
        if s.ended:
            return
        end = None
        try:
            for listener in s.job.listeners:
                began = time.perf_counter()
                try:
                    call(listener)
                finally:  # per listener type too: tracking, pruning, divergence, progress
                    seconds = time.perf_counter() - began
                    self.stats.add_time("listeners", seconds)
                    self.stats.add_time(f"listener {type(listener).__name__}", seconds)
        except StopTraining as stop:
            end = SlotEnd(s.job.key, stop=stop)
        except Exception as err:
            end = SlotEnd(s.job.key, error=err)
        if end is not None:
            self._end(s, end, wasted=True)

    def _machinery_failed(self, s, why: str) -> None:
        """End ``s`` alone for an error of its machinery (``why``), not of its training: its
        ``SlotEnd`` asks the caller to re-enqueue it (``requeue``)."""
        self._end(s, SlotEnd(s.job.key, error=RuntimeError(why), requeue=True), wasted=True)

    def _end(self, s, end: SlotEnd, wasted: bool = False) -> None:
        s.ended, s.wasted = True, wasted
        began = time.perf_counter()
        try:
            self.on_end(end)
        finally:
            self.stats.add_time("ends", time.perf_counter() - began)
