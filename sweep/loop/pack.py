"""Fused trials in the study loop: up to K trials of a study train together as one grouped
network (``sweep.training.fused.train_pack``), each keeping all a trial has on its own.

Each slot of a pack is a whole trial, started and ended by the same two halves as an unfused
one (``objective.start_trial`` / ``objective.end_trial``): its own Optuna trial (states,
intermediate values through the same ``PruningListener``, user attributes), its own nested MLflow
run (per-step ``lr`` and ``train_loss``, per-epoch ``val_loss``/``val_acc``, ``test_acc``, the
LR-curve figure) and its own ``DivergenceMonitor``. The worker (``worker.run_worker``) owns the
rest of the study loop: asking trials within the budget, heartbeats, signals and telling Optuna;
this module only fills slots, tags them and ends them.

Tags on each slot's run: ``sweep.pack`` (an id shared by the trials of one pack),
``sweep.slot`` (the seat it took, 0..K-1; a seat freed by a pruned trial is taken by the next
trial at the following epoch boundary) and, when the run ends, ``sweep.pack_trials`` (the
numbers of every trial that trained beside it at some point, itself included).

A slot's run is ended through the process's one metric writer (``metric_writer``: its points,
then tags and status, in order; 0.25 s of the 0.36 s fixed cost per trial measured on the H200,
FACTS.md, when it was done on the training thread): the training thread only queues it and
tells Optuna, so the other slots are not held up by it.

How many slots a pack has: ``sweep.training.capacity``; where its time went: ``pack_times``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import optuna

from sweep.loop.objective import Outcome, StartedTrial, WorkerContext, end_trial, note, start_trial
from sweep.loop.pack_times import split_time
from sweep.base.urls import mask_url
from sweep.errors import CredentialsRefused
from sweep.training.fused import PackStats, SlotEnd, SlotJob, train_pack


@dataclass
class _Seated:
    started: StartedTrial
    seat: int
    peers: set[int] = field(default_factory=set)  # trial numbers that trained beside it

    @property
    def trial(self) -> optuna.Trial:
        return self.started.trial


def run_pack(first: optuna.Trial, ask: Callable[[], optuna.Trial | None], ctx: WorkerContext,
             capacity: int, guard, began: Callable[[optuna.Trial], None],
             settle: Callable[[optuna.Trial, Outcome], None]) -> PackStats | None:
    """Train ``first`` and further trials from ``ask()`` (None: no more within the budget) as
    one pack of up to ``capacity`` slots, until no slot is live.

    The worker hears of each trial twice: ``began(trial)`` once its run is open (it beats the
    trial's heartbeat from then on) and ``settle(trial, outcome)`` once it has ended (it tells
    Optuna; the trial's run is already ended or queued to be). An interruption raised by
    ``guard`` ends every live slot's run as KILLED and propagates: the trials that got
    ``began`` and no ``settle`` are the worker's to fail and re-enqueue. Any other exception
    out of the pack fails every live slot with it; returns None then, else the pack's
    ``PackStats``."""
    pack_id = uuid.uuid4().hex[:12]
    stats = PackStats()
    waiting = [first]
    live: dict[int, _Seated] = {}
    free = list(range(capacity))

    spent = {"ask": 0.0, "start_trial": 0.0, "tell": 0.0}  # seconds, see time_table

    def timed(part: str, call: Callable, *args, **kwargs):
        began = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - began

    def next_job() -> SlotJob | None:
        while True:
            trial = waiting.pop() if waiting else timed("ask", ask)
            if trial is None:
                return None
            seat = min(free)
            try:
                started = timed("start_trial", start_trial, trial, ctx, row=1 + seat,
                                tags={"sweep.pack": pack_id, "sweep.slot": seat}, interrupt=guard)
            except CredentialsRefused:
                began(trial)  # the worker retries it with the live slots, and stops
                raise
            if isinstance(started, Outcome):  # its run could not be opened: it fails alone
                settle(trial, started)
                continue
            began(trial)
            free.remove(seat)
            slot = _Seated(started, seat, {trial.number})
            for other in live.values():
                other.peers.add(trial.number)
                slot.peers.add(other.trial.number)
            live[trial.number] = slot
            return SlotJob(started.cfg, started.listeners, key=slot,
                           checkpoint=started.save_later(on_written=stats.add_write_seconds),
                           resume=started.resume)

    def ended(slot: _Seated, **how) -> Outcome:
        live.pop(slot.trial.number, None)
        free.append(slot.seat)
        return end_trial(slot.started, background=True, **how,
                         tags={"sweep.pack_trials": ",".join(map(str, sorted(slot.peers)))})

    def on_end(end: SlotEnd) -> None:
        slot = end.key
        outcome = ended(slot, result=end.result, stop=end.stop, error=end.error)
        timed("tell", settle, slot.trial, outcome)

    t = ctx.spec.train
    try:
        # the guards hear each chunk of the pack's steps once (the slots' listeners, per slot)
        guards = (guard,) if ctx.step_clock is None else (ctx.step_clock, guard)
        train_pack(next_job, capacity, ctx.splits, ctx.device, on_end, guards=guards,
                   precision="auto", graphs="auto", compile=t.compile,  # the study's precision
                   stats=stats)
        split_time(stats, spent)
        return stats
    except BaseException as err:
        # credentials refused at a slot's run start: every slot's trial is retried, as at a stop
        interrupted = not isinstance(err, Exception) or isinstance(err, CredentialsRefused)
        for slot in list(live.values()):
            outcome = ended(slot, error=err)
            if not interrupted:
                settle(slot.trial, outcome)
        if interrupted:
            raise
        for trial in waiting:  # the pack failed before its first slot was filled
            message = mask_url(f"{type(err).__name__}: {err}")[:2000]
            note(trial, "error", message)
            settle(trial, Outcome(optuna.trial.TrialState.FAIL, detail=message))
        return None
