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
from sweep.loop.lifecycle import Outcome, Phase, Trials
from sweep.loop.objective import WorkerContext, run_trial
from sweep.loop.pack import run_pack
from sweep.training.capacity import pack_capacity, trains_as_pack
from sweep.stores import watch_stop
from sweep.stores import keeps_heartbeats
from sweep.base.stopping import BoundedStop, stop_seconds
from sweep.base.text import first_line
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
    end_stale_runs(study, ctx.tracker, ctx.experiment_id)
    left = open_slots(study.get_trials(deepcopy=False), budget, phase)
    capacity = pack_capacity(ctx.spec.train, ctx.device, left)
    as_pack = trains_as_pack(ctx.spec.train, ctx.device, capacity)
    if ctx.step_clock is not None:
        ctx.step_clock.start(left, capacity)
    writer = ctx.checkpoints.writer if ctx.checkpoints is not None else None
    guard = SignalGuard(ctx.stop)
    watch_stop(study._storage, guard.stop, guard.check)  # the storage away: wait, bounded by the stop
    try:
        _loop(study, ctx, budget, on_trial, phase, report, guard, capacity, as_pack)
    except BaseException:
        # Any exception leaving the worker: the same bound as a stop for what is queued.
        deadline = time.monotonic() + stop_seconds()
        _close_checkpoints(writer, deadline)
        ctx.tracker.settle_by(deadline)
        raise
    if guard.stop.deadline is not None:
        # a stop: the trials are re-enqueued or told already (``_loop``); the checkpoint flush
        # and the record's then share what is left of the bound
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


def _loop(study, ctx, budget, on_trial, phase, report, guard, capacity, as_pack) -> None:
    """``run_worker``'s ask -> run -> tell loop, under the signal guard; each trial's one
    outcome is ``lifecycle.Trials``'."""
    def heard(t, outcome: Outcome) -> None:
        report.ran.append(outcome)
        if on_trial is not None:
            on_trial(t.number, outcome)

    trials = Trials(study, ctx.checkpoints, on_outcome=heard)
    with guard:
        try:
            while (trial := _ask(study, ctx, budget, guard, True, phase, trials)) is not None:
                try:
                    if as_pack:
                        stats = run_pack(trial, lambda: _ask(study, ctx, budget, guard, False,
                                                             phase, trials),
                                         ctx, capacity, guard, trials)
                        report.packs.append(stats)
                    else:
                        _run_one(trial, ctx, guard, trials)
                except Interrupted as sig:
                    # First, before anything that can take long: every trial this worker owns
                    # is re-enqueued (its run was ended KILLED on the way out)
                    trials.requeue_all(signalled=True)
                    report.interrupted_by = sig.signum
                    break
                except CredentialsRefused:
                    # The store refuses this process's credentials: every later trial would fail
                    # its run start. The owned trials are retried as at a stop (not their doing:
                    # the budget untouched) and the worker stops with the one line (exit 6).
                    trials.requeue_all(signalled=True)
                    raise
        except BaseException as err:
            trials.requeue_all(signalled=False, why=f"its worker failed "
                                                    f"({first_line(err, typed=True)})")
            raise
        finally:
            trials.close()
        if guard.signum is not None and report.interrupted_by is None:
            report.interrupted_by = guard.signum


def _run_one(trial: optuna.Trial, ctx: WorkerContext, guard: "SignalGuard", trials: Trials) -> None:
    """An unfused trial: trained, then told; an error of its start or end (not of its training,
    which is its outcome) re-enqueues it under the rule. Credentials refused stop the worker."""
    try:
        outcome = run_trial(trial, ctx, guard, on_started=lambda started: trials.move(
            trial, Phase.TRAINING, started.checkpoint))
    except CredentialsRefused:
        raise
    except Exception as err:
        trials.requeue(trial, why=f"its start or end failed ({first_line(err, typed=True)})")
        return
    trials.tell(trial, outcome)


def _ask(study: optuna.Study, ctx: WorkerContext, budget: int, guard: SignalGuard,
         wait: bool, phase: str, trials: Trials) -> optuna.Trial | None:
    """The next trial within the budget, claimed by ``trials`` at once (its heartbeat and
    host/pid notes before anything waits), or None once the budget is spent (or a signal came).

    With ``wait``, while the remaining budget is held by other workers' RUNNING trials, poll
    every second instead of leaving: if such a worker died, its trial is failed (heartbeat or
    dead local pid) and its re-enqueued retry must still be run by someone. A fused pack asks
    without waiting for its later slots (its own live trials hold the rest of the budget)."""
    while guard.signum is None:
        if fail_dead_trials(study, ctx.checkpoints):
            try:
                end_stale_runs(study, ctx.tracker, ctx.experiment_id)
            except Exception:
                pass  # the MLflow store is away: the next reconcile ends them
        known = study.get_trials(deepcopy=False)
        step = next_step(known, budget, phase)
        if step != RUN:
            if not wait or step == DONE or not _can_wait(study, known):
                return None
            time.sleep(_POLL_SECONDS)  # others' trials are running; one may be dead
            continue
        trial = study.ask()  # warns that heartbeats suit optimize(): cli.options.silence_known_warnings
        trials.claim(trial)
        if not over_budget(study, trial, budget, phase):
            return trial
        trials.release(trial)  # told FAIL as over the budget
    return None


_POLL_SECONDS = 1.0


def _can_wait(study: optuna.Study, trials) -> bool:
    """Whether a dead worker's RUNNING trial would ever be noticed: always with heartbeats;
    without them (journal storage) only when every running trial is on this host (pid check)."""
    if keeps_heartbeats(study._storage):
        return True
    host = socket.gethostname()
    return all(t.user_attrs.get("host") == host for t in trials if t.state == TrialState.RUNNING)
