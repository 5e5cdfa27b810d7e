"""One trial's life in a worker, from its claim to its one outcome (for users: docs/clusters.md,
"What a stop does, in order").

    claimed -> started -> training -> ending -> told
       '---------'-----------'-----------'-----> re-enqueued

claimed      the worker took the trial: ``study.ask()`` (a fresh trial, or a WAITING retry
             popped). Its heartbeat row is written at once and its ``host``/``pid`` notes
             before anything can wait (the MLflow store, a checkpoint read): should the worker
             die from here on, a stale check (heartbeat) or a dead-pid check on this host finds
             the trial (``reconcile.fail_dead_trials``); ``kill -9`` leaves nothing unowned.
started      its config is drawn and its MLflow run open (``objective.start_trial``).
training     in ``train`` or in a slot of a pack.
ending       its run is being ended (``objective.end_trial``): the outcome is known.
told         Optuna heard the outcome once (COMPLETE, PRUNED or FAIL). Its checkpoint file is
             removed after that tell succeeded, so whether the trial owned the file is never
             guessed: a tell refused because another worker failed the trial meanwhile leaves
             the file to that trial's retry.
re-enqueued  the worker gives the trial up, the trial itself did not fail: a stop (SIGTERM,
             Ctrl-C), an error of its slot's machinery (its start, end, tell, checkpoint or
             replay), the whole pack failing (a CUDA error, out of memory). The trial is failed
             by a compare-and-set of its state (RUNNING -> FAIL: the storage refuses to finish a
             finished trial) and only the winner enqueues its retry under the one rule
             (``stores.retry``): a stale check on another worker fails a trial by the same
             compare-and-set before its callback enqueues, so however the two race, one retry.
             A retry the rule refuses takes the trial's checkpoint file with it.

Exactly one outcome: a trial leaves ``Trials`` at its first ``tell`` or ``requeue``; any later
call for it does nothing. The compare-and-set comes before the enqueue, so a process killed in
the milliseconds between them leaves a FAIL without a retry (never two retries; in the other
order a stale check racing the enqueue made two owners of one checkpoint file).
"""

from __future__ import annotations

import enum
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable

import optuna
from optuna.trial import TrialState

from sweep.base.text import first_line
from sweep.stores import original_number
from sweep.stores import Heartbeat
from sweep.stores import retry_later


class Phase(enum.Enum):
    CLAIMED = "claimed"
    STARTED = "started"
    TRAINING = "training"
    ENDING = "ending"
    TOLD = "told"
    REENQUEUED = "re-enqueued"


@dataclass
class Outcome:
    """How a trial ended, to be told to Optuna (``value`` for COMPLETE)."""

    state: optuna.trial.TrialState
    value: float | None = None
    run_id: str = ""
    detail: str = ""


def note(trial: optuna.Trial, key: str, value) -> None:
    """``trial.set_user_attr`` that tolerates a trial another worker already failed: this worker
    stalled past the heartbeat grace period and its trial was failed and re-enqueued meanwhile.
    The trial's run still ends and ``Trials.tell`` ignores it; the worker goes on."""
    try:
        trial.set_user_attr(key, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def tell(study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> bool:
    """``study.tell`` of ``outcome``; False (nothing told) for a trial another worker's stale
    check already failed (this worker stalled past the grace period: its retry is queued)."""
    try:
        if outcome.state == TrialState.COMPLETE:
            study.tell(trial, outcome.value)
        else:
            study.tell(trial, state=outcome.state)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    except ValueError:  # "Cannot tell a FAIL trial": failed by another worker's stale check
        if not study._storage.get_trial(trial._trial_id).state.is_finished():
            raise
        return False
    return True


def give_up(study: optuna.Study, trial_id: int, signalled: bool) -> tuple[bool, bool]:
    """Fail the RUNNING trial ``trial_id`` by compare-and-set and, only when this call won it,
    re-enqueue it under the retry rule (``signalled``: a stop, not the trial's doing). Returns
    (won, retried): a stale check or another worker that failed it first owns its retry."""
    storage = study._storage
    try:
        won = storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        won = False
    if not won:
        return False, False
    return True, retry_later(study, storage.get_trial(trial_id), signalled=signalled)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class _Owned:
    trial: optuna.Trial
    phase: Phase
    checkpoint: object | None = None  # its ``TrialCheckpoint`` once started


class Trials:
    """The trials one worker owns (one, or the slots of a pack) and the one outcome of each.

    ``checkpoints``: the worker's ``CheckpointDir`` (None: no files). ``on_outcome(trial,
    outcome)`` hears each trial's outcome once, told or re-enqueued (the worker's report)."""

    def __init__(self, study: optuna.Study, checkpoints=None,
                 on_outcome: Callable[[optuna.Trial, Outcome], None] | None = None,
                 log: Callable[[str], None] = _log):
        self.study, self.checkpoints, self.on_outcome, self.log = study, checkpoints, on_outcome, log
        self.heartbeat = Heartbeat(study._storage)
        self._owned: dict[int, _Owned] = {}  # by trial id

    # --- transitions ----------------------------------------------------------------------
    def claim(self, trial: optuna.Trial) -> None:
        """claimed: the heartbeat row at once, then the host/pid notes (before any wait)."""
        self._owned[trial._trial_id] = _Owned(trial, Phase.CLAIMED)
        self.heartbeat.add(trial._trial_id)
        note(trial, "host", socket.gethostname())
        note(trial, "pid", os.getpid())

    def move(self, trial: optuna.Trial, phase: Phase, checkpoint=None) -> None:
        """started / training / ending (``checkpoint``: the trial's ``TrialCheckpoint``)."""
        owned = self._owned.get(trial._trial_id)
        if owned is not None:
            owned.phase = phase
            owned.checkpoint = checkpoint if checkpoint is not None else owned.checkpoint

    def release(self, trial: optuna.Trial) -> None:
        """Forget a claimed trial that was told elsewhere (``budget.over_budget`` yields it)."""
        self._owned.pop(trial._trial_id, None)
        self.heartbeat.discard(trial._trial_id)

    def tell(self, trial: optuna.Trial, outcome: Outcome) -> None:
        """told: Optuna hears ``outcome`` once; the checkpoint file goes after that. A tell that
        raises (the storage refused it) re-enqueues the trial under the rule instead."""
        owned = self._owned.get(trial._trial_id)
        if owned is None:
            return  # it has its outcome already
        try:
            told = tell(self.study, trial, outcome)
        except Exception as err:
            self.requeue(trial, why=f"its tell failed ({first_line(err, typed=True)})")
            return
        self._leave(owned, Phase.TOLD)
        if told:
            self._remove_file(owned)
        self._heard(trial, outcome)

    def requeue(self, trial: optuna.Trial, signalled: bool = False, why: str = "") -> bool:
        """re-enqueued: failed by compare-and-set, then its retry under the rule; ``why`` (one
        line on stderr) names what went wrong (none for a stop). Whether it has a retry."""
        owned = self._owned.get(trial._trial_id)
        if owned is None:
            return False
        note(trial, "error", why or "interrupted")  # a finished trial takes no more notes
        won, retried = give_up(self.study, trial._trial_id, signalled)
        self._leave(owned, Phase.REENQUEUED)
        if won and retried and owned.checkpoint is not None:
            # The writes still queued hold the epochs the retry resumes from: still this
            # worker's to finish (a stop's flush, within SWEEP_STOP_S; a retry taken by this
            # worker waits for them before it reads the file), not the retry's to lose.
            owned.checkpoint.owns = lambda: True
        if won and not retried:
            self._remove_file(owned)  # nobody will resume it
        if why:
            fate = ("re-enqueued" if retried else "not retried (its retry made no progress)") \
                if won else "already failed by another worker"
            self.log(f"trial {trial.number}: {why}; {fate}")
        self._heard(trial, Outcome(TrialState.FAIL, detail=why or "interrupted"))
        return retried

    def requeue_all(self, signalled: bool, why: str = "") -> None:
        """Every trial still owned, re-enqueued (a stop: ``signalled``; a failed pack). A
        storage that refuses leaves the rest to the stale check (their heartbeat stops)."""
        for owned in list(self._owned.values()):
            try:
                self.requeue(owned.trial, signalled, why)
            except Exception as err:
                self._owned.pop(owned.trial._trial_id, None)
                self.log(f"warning: trial {owned.trial.number} could not be re-enqueued "
                         f"({first_line(err, typed=True)}); its heartbeat stops, so a stale "
                         f"check retries it")

    # --- views ----------------------------------------------------------------------------
    def owned(self) -> list[optuna.Trial]:
        return [o.trial for o in self._owned.values()]

    def phase(self, trial: optuna.Trial) -> Phase | None:
        owned = self._owned.get(trial._trial_id)
        return owned.phase if owned is not None else None

    def close(self) -> None:
        """Stop the heartbeat (the trials still owned are then the stale check's)."""
        self.heartbeat.stop()

    # --- internals ------------------------------------------------------------------------
    def _leave(self, owned: _Owned, phase: Phase) -> None:
        owned.phase = phase
        self._owned.pop(owned.trial._trial_id, None)
        self.heartbeat.discard(owned.trial._trial_id)

    def _heard(self, trial: optuna.Trial, outcome: Outcome) -> None:
        if self.on_outcome is not None:
            self.on_outcome(trial, outcome)

    def _remove_file(self, owned: _Owned) -> None:
        """The trial's checkpoint file, once it is certain nobody resumes it (after any pending
        write of it: the writer's removal)."""
        if self.checkpoints is None:
            return
        if owned.checkpoint is not None:
            path = owned.checkpoint.path
        else:
            try:
                attrs = self.study._storage.get_trial_system_attrs(owned.trial._trial_id)
            except Exception:
                return  # the storage is away: `sweep status` lists the file as an orphan
            path = self.checkpoints.path(self.study, original_number(attrs, owned.trial.number))
        self.checkpoints.writer.remove(path)
