"""Fused trials in the study loop: up to K trials of a study train together as one grouped
network (``sweep.training.fused.train_pack``), each keeping all a trial has on its own.

Each slot of a pack is a whole trial, started and ended by the same two halves as an unfused
one (``objective.start_trial`` / ``objective.end_trial``): its own Optuna trial (states,
intermediate values through the same ``PruningListener``, user attributes), its own nested MLflow
run (per-step ``lr`` and ``train_loss``, per-epoch ``val_loss``/``val_acc``, ``test_acc``, the
LR-curve figure) and its own ``DivergenceMonitor``. The worker (``worker.run_worker``) owns the
rest of the study loop: asking trials within the budget and signals; each trial's one outcome
(heartbeat, told or re-enqueued, its checkpoint file) is ``lifecycle.Trials``'; this module
fills slots, tags them and ends them.

One slot, one fate: an error in one slot's start, end, tell, checkpoint or replay ends that slot
alone (re-enqueued under the retry rule, one line); the others train on. A failure of the whole
pack (a CUDA error, out of memory) re-enqueues every live slot to resume from its last
checkpoint, and no checkpoint of a live or re-enqueued trial is removed.

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

from sweep.base.text import first_line
from sweep.loop.lifecycle import Outcome, Phase, Trials
from sweep.loop.objective import StartedTrial, WorkerContext, end_trial, start_trial
from sweep.loop.pack_times import split_time
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
             capacity: int, guard, trials: Trials) -> PackStats | None:
    """Train ``first`` and further trials from ``ask()`` (None: no more within the budget; each
    trial claimed by ``trials``) as one pack of up to ``capacity`` slots, until no slot is live.

    Each slot's outcome goes to ``trials`` (told, or re-enqueued when its own start, end, tell
    or checkpoint failed). An interruption raised by ``guard`` ends every live slot's run as
    KILLED and propagates: the trials still owned are the worker's to re-enqueue. Any other
    exception out of the pack re-enqueues every trial it owns (the live slots resume from
    their last checkpoints); returns None then, else the pack's ``PackStats``."""
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
                raise  # the worker re-enqueues every trial it owns, as at a stop, and stops
            except Exception as err:  # its replay, a store refusing a note: this slot alone
                trials.requeue(trial, why=f"its start failed ({first_line(err, typed=True)})")
                continue
            if isinstance(started, Outcome):  # its run could not be opened: it fails alone
                timed("tell", trials.tell, trial, started)
                continue
            trials.move(trial, Phase.TRAINING, started.checkpoint)
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
        trials.move(slot.trial, Phase.ENDING)
        return end_trial(slot.started, background=True, **how,
                         tags={"sweep.pack_trials": ",".join(map(str, sorted(slot.peers)))})

    def on_end(end: SlotEnd) -> None:  # never raises: one slot's error is that slot's alone
        slot = end.key
        try:
            outcome = ended(slot, result=end.result, stop=end.stop, error=end.error,
                            requeued=end.requeue)
        except Exception as err:
            trials.requeue(slot.trial, why=f"its end failed ({first_line(err, typed=True)})")
            return
        if end.requeue:
            trials.requeue(slot.trial, why=f"its {first_line(end.error)}")
            return
        timed("tell", trials.tell, slot.trial, outcome)

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
            try:  # killed, not failed: the retry resumes from the slot's last checkpoint
                ended(slot, error=err, requeued=True)
            except Exception:
                pass  # the store is away too: the run is reconciled once its trial is failed
        if interrupted:
            raise
        owned = trials.owned()
        if owned:
            trials.log(f"warning: the pack of {len(owned)} trial(s) failed "
                       f"({first_line(err, typed=True)}); each is re-enqueued under the retry "
                       f"rule, to resume from its last checkpoint")
        trials.requeue_all(signalled=False, why="its pack failed")
        return None
