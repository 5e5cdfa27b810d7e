"""A study's bookkeeping: its budget, what counts towards it, and reconciling the stores with
what really happened to the workers. Below ``worker`` and ``status``, which both use it; free of
torch, so ``sweep report``/``status``/``list`` count trials without loading a training stack.

The budget counts finished trials (complete + pruned + failed) across every worker and every
resume. A trial that failed because its worker died or was interrupted is re-enqueued once; the
failed original then no longer counts (its retry takes its place). A trial that lost the race
for the last slot is marked ``OVER_BUDGET`` and never counts.

Workers die without telling anyone (kill -9, node loss, preemption past the grace time). What
that leaves behind, and who cleans it up:

* an Optuna trial stuck RUNNING: with RDB storages its heartbeat stops, and after the grace
  period ``optuna.storages.fail_stale_trials`` fails it and the retry callback re-enqueues its
  parameters once. A trial whose worker ran on *this* host and whose pid is gone is failed at
  once (the only detection the journal storage has: it keeps no heartbeats).
* an MLflow trial run stuck RUNNING although its Optuna trial is finished: ended here with
  status FAILED (FINISHED for a complete trial) and tag ``sweep.state`` = the trial's state.

Every worker reconciles when it starts and when it ends; ``sweep status --repair`` does the same
on demand. All of it is idempotent, so several workers may reconcile at once.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from sweep.stores.retry import FAILED_TRIAL, RETRY_HISTORY, retry_later
from sweep.record import RUN_END_BY, STATE, pending, StudySummary, Tracker
from sweep.study.phases import CONFIRM, SEARCH, is_search, phase_of
from sweep.study.specs import StudySpec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
OVER_BUDGET = "sweep.over_budget"
BUDGET = "sweep.budget"  # study user attribute: the study's total trial budget
CONFIRM_BUDGET = "sweep.confirm_budget"  # study user attribute: the confirmation's trials
SETTINGS = "sweep.settings"  # study user attribute: the trial settings it was created with
_RUN_STATUS = {TrialState.COMPLETE: "FINISHED"}  # any other finished state -> FAILED


# --- the budget -------------------------------------------------------------------------------

def resolve_budget(study: optuna.Study, spec: StudySpec, trials: int | None) -> int:
    """The study's total budget, one rule for every path (launch, launch --workers, worker,
    submit): ``--trials`` when given, else the stored budget, else the study file's ``trials``.
    Whatever is chosen is stored, so every later launch and worker agrees until ``--trials``
    raises (or lowers) it again."""
    stored = study.user_attrs.get(BUDGET)
    budget = chosen_budget(stored, spec, trials)
    if budget != stored:
        study.set_user_attr(BUDGET, budget)
    return budget


def chosen_budget(stored: int | None, spec: StudySpec, trials: int | None) -> int:
    """``resolve_budget``'s rule without the store: ``--trials``, else the stored budget, else
    the study file's (``sweep launch --dry-run`` asks it without writing)."""
    return trials or stored or spec.trials


def _replaced(trials) -> set[int]:
    """Numbers of failed trials whose parameters were re-enqueued (their retry replaces them)."""
    return {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY, [])}


def counted(trials, phase: str = SEARCH) -> list:
    """The trials that count towards ``phase``'s budget or occupy a slot of it (running). The
    search budget counts search trials only, the confirmation budget confirmation trials only
    (``sweep.study.phases``)."""
    replaced = _replaced(trials)
    return [t for t in trials if t.number not in replaced and not t.user_attrs.get(OVER_BUDGET)
            and t.state in (*FINISHED, TrialState.RUNNING) and phase_of(t) == phase]


def budget_used(study: optuna.Study, phase: str = SEARCH) -> int:
    """Finished trials that count towards ``phase``'s budget."""
    return sum(1 for t in counted(study.get_trials(deepcopy=False), phase) if t.state in FINISHED)


RUN, WAIT, DONE = "run", "wait", "done"


def next_step(trials, budget: int, phase: str = SEARCH) -> str:
    """What a worker of ``phase`` does next: RUN a trial, WAIT while other workers' RUNNING
    trials hold the rest of the budget (one may be dead and need a retry), or stop (DONE).
    A confirmation never asks the sampler: it runs only trials ``sweep confirm`` enqueued."""
    mine = counted(trials, phase)
    left = budget - len(mine)
    if phase == CONFIRM:
        left = min(left, sum(1 for t in trials if t.state == TrialState.WAITING
                             and phase_of(t) == CONFIRM))
    if left > 0:
        return RUN
    if sum(1 for t in mine if t.state in FINISHED) >= budget:
        return DONE
    return WAIT if any(t.state == TrialState.RUNNING for t in mine) else DONE


def open_slots(trials, budget: int, phase: str = SEARCH) -> int:
    """Trials ``phase`` may still start (the most a fused pack should hold)."""
    return max(0, budget - len(counted(trials, phase)))


def over_budget(study: optuna.Study, trial: optuna.Trial, budget: int,
                phase: str = SEARCH) -> bool:
    """Two workers may both pass the budget check at once; the later-numbered trial yields
    (it is told FAIL with ``OVER_BUDGET`` set, and never counts). A trial of the other phase
    taken from the queue runs (its slot was reserved when it was enqueued: a search retry, or a
    replicate a search worker picked up); a fresh one in the confirmation phase yields."""
    if phase_of(trial) != phase:
        system_attrs = study._storage.get_trial_system_attrs(trial._trial_id)
        queued = {"fixed_params", FAILED_TRIAL} & set(system_attrs)
        if queued:
            return False
        ahead = [None] * budget  # a confirmation worker got a fresh sampler trial: yield it
    else:
        ahead = [t for t in counted(study.get_trials(deepcopy=False), phase)
                 if t.number < trial.number]
    if len(ahead) < budget:
        return False
    trial.set_user_attr(OVER_BUDGET, True)
    study.tell(trial, state=TrialState.FAIL)
    return True


def outcome(t: optuna.trial.FrozenTrial) -> str:
    """A trial's state as people read it: ``DIVERGED`` for a trial pruned because it diverged,
    else the Optuna state's name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    if t.state == TrialState.PRUNED and t.user_attrs.get("prune_reason") == "diverged":
        return "DIVERGED"
    return t.state.name


def state_counts(study: optuna.Study, phase: str | None = None) -> dict[str, int]:
    """Trials per outcome as people read them: complete, pruned, diverged, failed, running
    (trials that lost the race for the last slot are not failures); of one phase, or all."""
    out = {"complete": 0, "pruned": 0, "diverged": 0, "failed": 0, "running": 0}
    for t in study.get_trials(deepcopy=False):
        if phase is not None and phase_of(t) != phase:
            continue
        if t.state == TrialState.FAIL and t.user_attrs.get(OVER_BUDGET):
            continue
        key = {"FAIL": "failed"}.get(outcome(t), outcome(t).lower())
        if key in out:
            out[key] += 1
    return out


def best_trial(trials, direction: optuna.study.StudyDirection):
    """The best complete search trial of ``trials`` (None when there is none). Confirmation
    replicates never count: a replicate's lucky seed is no search result."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
            and is_search(t)]
    if not done:
        return None
    pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(done, key=lambda t: t.value)


def study_summary(study: optuna.Study) -> StudySummary:
    """The study's standing for its parent MLflow run (``Tracker.update_study_run``)."""
    trials = study.get_trials(deepcopy=False)
    best = best_trial(trials, study.direction)
    ends = [t.datetime_complete for t in trials if t.state in FINISHED and t.datetime_complete]
    return StudySummary(
        budget=int(study.user_attrs.get(BUDGET) or 0), used=budget_used(study),
        counts=state_counts(study), best_value=best.value if best else None,
        best_trial=best.number if best else None,
        last_end_ms=int(max(ends).timestamp() * 1000) if ends else None)


def update_parent_run(study: optuna.Study, tracker: Tracker, experiment_id: str | None,
                      parent_run_id: str | None = None) -> None:
    """Write ``study_summary`` to the study's parent run (found when not given); called after
    each launch, worker and pool, and by ``sweep status --repair``."""
    if parent_run_id is None:
        parents = tracker.study_runs(experiment_id, study.study_name) if experiment_id else []
        if not parents:
            return
        parent_run_id = parents[0].info.run_id
    try:
        tracker.update_study_run(parent_run_id, study_summary(study))
    except Exception as err:  # the trials are stored; the next launch or --repair writes it again
        print(f"warning: parent run {parent_run_id} of study {study.study_name!r} not updated: "
              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400],
              file=sys.stderr)


# --- failed and dead trials -------------------------------------------------------------------

def fail_stale(study: optuna.Study) -> None:
    """Fail trials whose worker stopped beating (the storage's callback re-enqueues them once:
    ``retry.retry_later``).
    Optuna marks this experimental and meant for ``optimize``; sweep owns the ask/tell loop and
    beats itself (``worker._Heartbeat``), as optimize does (the CLI silences the warning)."""
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


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker is gone; returns their numbers.

    Stale heartbeats (RDB storages) go through Optuna, which also re-enqueues them; trials run by
    a dead process on this host are failed and re-enqueued here (works for every storage).
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
    return failed


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
        run_id = run.info.run_id
        if tracker.client.get_run(run_id).info.status != "RUNNING":
            continue  # its worker ended it meanwhile (it ends the run before telling Optuna)
        tracker.client.set_tag(run_id, STATE, state)
        if trial is not None and trial.state != TrialState.COMPLETE:
            tracker.client.set_tag(run_id, "sweep.error", trial.user_attrs.get("error", "worker died"))
        tracker.client.set_terminated(run_id, _RUN_STATUS.get(getattr(trial, "state", None), "FAILED"))
        ended.append(run_id)
    return ended


@dataclass
class Reconciled:
    failed_trials: list[int] = field(default_factory=list)
    ended_runs: list[str] = field(default_factory=list)


def reconcile(study: optuna.Study, tracker: Tracker | None, experiment_id: str | None) -> Reconciled:
    """Fail dead workers' trials, then end MLflow runs whose trial is finished (when there is an
    MLflow store to look at)."""
    failed = fail_dead_trials(study)
    ended = end_stale_runs(study, tracker, experiment_id) if tracker is not None else []
    return Reconciled(failed, ended)
