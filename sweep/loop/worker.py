"""The study loop of one worker process: ask -> run -> tell until the study's budget is used
(what counts towards it: ``budget``; creating or resuming the study: ``study``).
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from sweep.loop.budget import DONE, RUN, next_step, open_slots, over_budget
from sweep.loop.reconcile import end_stale_runs, fail_dead_trials
from sweep.loop.objective import Outcome, WorkerContext, run_trial
from sweep.loop.pack import run_pack
from sweep.training.capacity import pack_capacity, trains_as_pack
from sweep.stores.guard import watch_stop
from sweep.stores.heartbeat import Heartbeat, keeps_heartbeats
from sweep.stores.retry import retry_later
from sweep.base.stopping import BoundedStop, stop_seconds
from sweep.errors import CredentialsRefused
from sweep.study.phases import SEARCH


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived while a trial was training."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """The study loop's view of a stop (``stopping.BoundedStop``): the running trial stops at its
    next check (a few optimizer steps) or the worker stops before the next trial. A second
    signal, or the deadline, spools what is queued and exits (the storages are transactional,
    so nothing is corrupted; the next launch reconciles the abandoned trial).

    ``stop``: the command's own (handlers for the whole command, with its last words); without
    one (a study loop run on its own) the guard installs one for the loop's duration. The guard
    is also a training listener and raises ``Interrupted`` from the loop at a safe point.
    """

    def __init__(self, stop: BoundedStop | None = None):
        self._own = stop is None
        self.stop = stop if stop is not None else BoundedStop()

    @property
    def signum(self) -> int | None:
        return self.stop.signum

    def __enter__(self):
        if self._own:
            self.stop.__enter__()
        return self

    def __exit__(self, *exc):
        if self._own:
            self.stop.__exit__(*exc)

    def check(self) -> None:
        if self.stop.signum is not None:
            raise Interrupted(self.stop.signum)

    def on_steps(self, first_step, lrs, losses) -> None:
        self.check()

    def on_epoch_end(self, epoch, metrics) -> None:
        self.check()


@dataclass
class WorkerReport:
    ran: list[Outcome] = field(default_factory=list)
    interrupted_by: int | None = None
    packs: list = field(default_factory=list)  # fused packs' PackStats (None: a pack failed)


def run_worker(study: optuna.Study, ctx: WorkerContext, budget: int, on_trial=None,
               phase: str = SEARCH) -> WorkerReport:
    """Run trials until ``phase``'s budget is used (or a signal arrives): the search's, or the
    confirmation's (``sweep confirm``: only the trials it enqueued).

    The budget is met when ``budget`` trials have *finished*. While the remaining slots are held
    by RUNNING trials of other workers, this worker waits (polling every second) instead of
    leaving: if such a worker died, its trial is failed (heartbeat or dead local pid) and its
    re-enqueued retry must still be run by someone.
    """
    report = WorkerReport()
    storage = study._storage
    end_stale_runs(study, ctx.tracker, ctx.experiment_id)
    left = open_slots(study.get_trials(deepcopy=False), budget, phase)
    capacity = pack_capacity(ctx.spec.train, ctx.device, left)
    as_pack = trains_as_pack(ctx.spec.train, ctx.device, capacity)
    if ctx.step_clock is not None:
        ctx.step_clock.start(left, capacity)
    writer = ctx.checkpoints.writer if ctx.checkpoints is not None else None
    guard = SignalGuard(ctx.stop)
    watch_stop(storage, guard.stop, guard.check)  # the storage away: wait, bounded by the stop
    try:
        _loop(study, ctx, budget, on_trial, phase, report, guard, storage, capacity, as_pack,
              writer)
    except BaseException:
        # Any exception leaving the worker: the same bound as a stop for what is queued.
        deadline = time.monotonic() + stop_seconds()
        _close_checkpoints(writer, deadline)
        ctx.tracker.settle_by(deadline)
        raise
    if guard.stop.deadline is not None:  # a stop: checkpoints and the record, within the bound
        _close_checkpoints(writer, guard.stop.deadline)
        ctx.tracker.settle_by(guard.stop.deadline)
        return report  # stale runs: the next launch or `sweep status --repair`
    # after a normal end only finished trials' removals are left
    _close_checkpoints(writer, time.monotonic() + stop_seconds())
    ctx.tracker.wait()  # runs ended in the background, the last LR-curve figures
    try:
        end_stale_runs(study, ctx.tracker, ctx.experiment_id)
    except Exception:
        pass  # best effort on the way out; `sweep status --repair` does it again
    return report


def _close_checkpoints(writer, deadline: float) -> None:
    """Checkpoints still queued are written until ``deadline`` (``time.monotonic()``), then
    dropped: the previous file stays (atomic rename)."""
    if writer is not None:
        writer.close(deadline)


def _loop(study, ctx, budget, on_trial, phase, report, guard, storage, capacity,
          as_pack, writer) -> None:
    """``run_worker``'s ask -> run -> tell loop, under the signal guard."""
    with guard:
        while (trial := _ask(study, ctx, budget, guard, True, phase)) is not None:
            live = {trial._trial_id: trial}  # began, not yet told
            heartbeat = Heartbeat(storage, trial._trial_id)

            def began(t):
                live[t._trial_id] = t
                heartbeat.add(t._trial_id)

            def settle(t, outcome):
                heartbeat.discard(t._trial_id)
                live.pop(t._trial_id, None)
                if outcome.state == TrialState.COMPLETE:
                    _tell(study, t, outcome.value)
                else:
                    _tell(study, t, state=outcome.state)
                report.ran.append(outcome)
                if on_trial is not None:
                    on_trial(t.number, outcome)

            try:
                if as_pack:
                    stats = run_pack(trial, lambda: _ask(study, ctx, budget, guard, False, phase),
                                     ctx, capacity, guard, began, settle)
                    report.packs.append(stats)
                else:
                    settle(trial, run_trial(trial, ctx, guard))
            except Interrupted as sig:
                heartbeat.stop()
                _retry_live(study, ctx, live, writer, guard)
                report.interrupted_by = sig.signum
                break
            except CredentialsRefused:
                # The store refuses this process's credentials: every later trial would fail
                # its run start. The live trials are retried like a stop's (budget untouched)
                # and the worker stops with the one line (exit status 6).
                heartbeat.stop()
                _retry_live(study, ctx, live, writer, guard)
                raise
            finally:
                heartbeat.stop()
        if guard.signum is not None and report.interrupted_by is None:
            report.interrupted_by = guard.signum


def _retry_live(study: optuna.Study, ctx: WorkerContext, live: dict, writer,
                guard: SignalGuard) -> None:
    """Fail the trials this worker began and has not told (``live``), each re-enqueued first
    (``retry.retry_later``, as for a signal: not the trial's doing), after the checkpoints
    their retries load are written, within the stop bound."""
    if writer is not None:
        # the files the retries load, and the notes retry_later reads: written first, within
        # the stop bound (an exception, not a signal: the same bound)
        writer.flush(guard.stop.deadline or time.monotonic() + stop_seconds())
    for t in live.values():  # their runs are ended KILLED; the trials retried
        # Enqueue first, tell second: a second Ctrl-C in between must not leave a FAIL
        # without a retry (see retry.py).
        frozen = study._storage.get_trial(t._trial_id)
        if not retry_later(study, frozen, signalled=True) and ctx.checkpoints is not None:
            ctx.checkpoints.discard(study, frozen)  # no retry: nobody will resume its checkpoint
        _tell(study, t, state=TrialState.FAIL)


def _ask(study: optuna.Study, ctx: WorkerContext, budget: int, guard: SignalGuard,
         wait: bool, phase: str = SEARCH) -> optuna.Trial | None:
    """The next trial within the budget, or None once it is spent (or a signal came).

    With ``wait``, while the remaining budget is held by other workers' RUNNING trials, poll
    every second instead of leaving: if such a worker died, its trial is failed (heartbeat or
    dead local pid) and its re-enqueued retry must still be run by someone. A fused pack asks
    without waiting for its later slots (its own live trials hold the rest of the budget)."""
    while guard.signum is None:
        if fail_dead_trials(study):
            try:
                end_stale_runs(study, ctx.tracker, ctx.experiment_id)
            except Exception:
                pass  # the MLflow store is away: the next reconcile ends them
        trials = study.get_trials(deepcopy=False)
        step = next_step(trials, budget, phase)
        if step != RUN:
            if not wait or step == DONE or not _can_wait(study, trials):
                return None
            time.sleep(_POLL_SECONDS)  # others' trials are running; one may be dead
            continue
        trial = study.ask()  # warns that heartbeats suit optimize(): cli._silence_known_warnings
        if not over_budget(study, trial, budget, phase):
            return trial
    return None


_POLL_SECONDS = 1.0


def _can_wait(study: optuna.Study, trials) -> bool:
    """Whether a dead worker's RUNNING trial would ever be noticed: always with heartbeats;
    without them (journal storage) only when every running trial is on this host (pid check)."""
    if keeps_heartbeats(study._storage):
        return True
    host = socket.gethostname()
    return all(t.user_attrs.get("host") == host for t in trials if t.state == TrialState.RUNNING)


def _tell(study: optuna.Study, trial: optuna.Trial, value=None, state=None) -> None:
    """``study.tell`` that tolerates a trial already failed by another worker's stale check
    (a worker that stalled longer than the grace period): its retry is already queued."""
    try:
        if state is None:
            study.tell(trial, value)
        else:
            study.tell(trial, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    except ValueError:  # "Cannot tell a FAIL trial": failed by another worker's stale check
        if not study._storage.get_trial(trial._trial_id).state.is_finished():
            raise
