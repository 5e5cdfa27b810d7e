"""Reconciling the stores with what really happened to the workers. Free of torch; talks to
MLflow only through ``sweep.record.repair``.

Workers die without telling anyone (kill -9, node loss, preemption past the grace time). What
that leaves behind, and who cleans it up:

* an Optuna trial stuck RUNNING: with RDB storages its heartbeat stops, and after the grace
  period ``optuna.storages.fail_stale_trials`` fails it and the retry callback re-enqueues its
  parameters once. A trial whose worker ran on *this* host and whose pid is gone is failed at
  once (the only detection the journal storage has: it keeps no heartbeats).
* an MLflow trial run stuck RUNNING although its Optuna trial is finished: ended (by
  ``sweep.record.repair.end_stale_run``) with status FAILED (FINISHED for a complete trial) and
  tag ``sweep.state`` = the trial's state.

Every worker reconciles when it starts and when it ends; ``sweep status --repair`` does the same
on demand. All of it is idempotent, so several workers may reconcile at once.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from sweep.loop.budget import FINISHED
from sweep.record import end_stale_run
from sweep.record import pending
from sweep.record import RUN_END_BY, Tracker
from sweep.stores import original_number
from sweep.stores import FAILED_TRIAL, retry_later


# --- failed and dead trials -------------------------------------------------------------------

def fail_stale(study: optuna.Study) -> None:
    """Fail trials whose worker stopped beating (the storage's callback re-enqueues them by the
    retry rule: ``retry.retry_later``).
    Optuna marks this experimental and meant for ``optimize``; sweep owns the ask/tell loop and
    beats itself (``stores.heartbeat.Heartbeat``), as optimize does (the CLI silences the warning)."""
    optuna.storages.fail_stale_trials(study)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def worker_gone(t, host: str | None = None, me: int | None = None) -> bool:
    """Whether ``t``'s worker ran on this host (``host``) and its process is gone; a trial
    of another host, or of this process (``me``), is never judged here (heartbeats judge it)."""
    host = socket.gethostname() if host is None else host
    pid = t.user_attrs.get("pid")
    return (t.user_attrs.get("host") == host and isinstance(pid, int) and pid != (me or os.getpid())
            and not _pid_alive(pid))


def fail_dead_trials(study: optuna.Study, checkpoints=None) -> list[int]:
    """Fail RUNNING trials whose worker is gone; returns their numbers.

    Stale heartbeats (RDB storages) go through Optuna, which also re-enqueues them; trials run by
    a dead process on this host are failed and re-enqueued here (works for every storage).
    ``checkpoints`` (the worker's ``CheckpointDir``): the file of a failed trial the retry rule
    refused (a retry that made no progress) leaves with it, nobody resumes it.
    """
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not before:
        return []
    fail_stale(study)
    host, me = socket.gethostname(), os.getpid()
    failed = []
    for t in study.get_trials(deepcopy=False):
        if t.number not in before:
            continue
        if t.state != TrialState.RUNNING:
            failed.append(t.number)  # failed by heartbeat just now (or finished meanwhile)
            continue
        if worker_gone(t, host, me):
            try:  # the attribute first: a finished trial takes no more attributes
                study._storage.set_trial_user_attr(t._trial_id, "error", "worker died")
                if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    retry_later(study, study._storage.get_trial(t._trial_id))
                    failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker got there first
    if checkpoints is not None and failed:
        _drop_unretried_files(study, failed, checkpoints)
    return failed


def _drop_unretried_files(study: optuna.Study, numbers: list[int], checkpoints) -> None:
    """Remove the checkpoint files of the FAIL trials ``numbers`` that have no retry."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get(FAILED_TRIAL) for t in trials}
    by_number = {t.number: t for t in trials}
    for number in numbers:
        t = by_number.get(number)
        if t is not None and t.state == TrialState.FAIL and number not in retried:
            checkpoints.writer.remove(checkpoints.path(study, original_number(t.system_attrs,
                                                                              number)))


# --- MLflow runs left RUNNING -----------------------------------------------------------------

def stale_runs(study: optuna.Study, tracker: Tracker, experiment_id: str | None) -> list:
    """MLflow trial runs still RUNNING whose Optuna trial is finished (or gone): (run, trial)."""
    if experiment_id is None:
        return []
    running = tracker.trial_runs(experiment_id, status="RUNNING")
    if not running:
        return []
    # Runs first, trials second: a run is created after its trial is asked, so every trial a
    # listed run belongs to is in this later snapshot (the other order ends fresh runs).
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    spooled = pending(tracker.uri).ends  # ended, the end waiting in a spool: replay ends them
    out = []
    for run in running:
        if run.data.tags.get("optuna.study_name") != study.study_name or run.info.run_id in spooled:
            continue
        number = run.data.tags.get("sweep.trial_number")
        trial = trials.get(int(number)) if number and number.isdigit() else None
        if trial is None or (trial.state in FINISHED and not _end_on_its_way(trial)):
            out.append((run, trial))
    return out


def _end_on_its_way(trial) -> bool:
    """Whether the trial's own worker may still be writing its run's end: Optuna is told first
    and the run ends on the worker's writer thread once its points are stored or spooled, which
    the worker promised by ``RUN_END_BY`` (a user attribute, seconds since the epoch). Until
    then the run is not stale, unless its worker ran on this host and its pid is gone."""
    by = trial.user_attrs.get(RUN_END_BY)
    if not isinstance(by, (int, float)) or time.time() >= by:
        return False
    pid, host = trial.user_attrs.get("pid"), trial.user_attrs.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        return pid != os.getpid() and _pid_alive(pid)
    return True


def end_stale_runs(study: optuna.Study, tracker: Tracker, experiment_id: str | None) -> list[str]:
    """End the runs ``stale_runs`` finds; returns their run ids."""
    ended = []
    for run, trial in stale_runs(study, tracker, experiment_id):
        state = trial.state.name if trial is not None else "FAIL"
        error = None
        if trial is not None and trial.state != TrialState.COMPLETE:
            error = trial.user_attrs.get("error", "worker died")
        if end_stale_run(tracker, run.info.run_id, state, error):
            ended.append(run.info.run_id)
    return ended


@dataclass
class Reconciled:
    failed_trials: list[int] = field(default_factory=list)
    ended_runs: list[str] = field(default_factory=list)


def reconcile_study(study: optuna.Study, tracker: Tracker | None, experiment_id: str | None) -> Reconciled:
    """Fail dead workers' trials, then end MLflow runs whose trial is finished (when there is an
    MLflow store to look at)."""
    failed = fail_dead_trials(study)
    ended = end_stale_runs(study, tracker, experiment_id) if tracker is not None else []
    return Reconciled(failed, ended)
