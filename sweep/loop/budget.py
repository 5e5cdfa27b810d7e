"""A study's budget: what counts towards it, what a worker does next, outcomes as people read
them, the best trial and the parent run's summary. Below ``worker``, ``status`` and the views,
which all use it; free of torch, so ``sweep report``/``status``/``list`` count trials without
loading a training stack.

The budget counts finished trials (complete + pruned + failed) across every worker and every
resume. A trial that failed because its worker died or was interrupted is re-enqueued by the
retry rule (``sweep.stores.retry``); the failed original then no longer counts (its retry takes its place). A trial that lost the race
for the last slot is marked ``OVER_BUDGET`` and never counts. Repairing what dead workers leave
behind is ``sweep.loop.reconcile``.
"""

from __future__ import annotations

import sys

import optuna
from optuna.trial import TrialState

from sweep.errors import CredentialsRefused
from sweep.stores import FAILED_TRIAL, RETRY_HISTORY
from sweep.record import StudySummary, Tracker
from sweep.study.phases import CONFIRM, SEARCH, is_search, phase_of
from sweep.study.specs import StudySpec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
OVER_BUDGET = "sweep.over_budget"
BUDGET = "sweep.budget"  # study user attribute: the study's total trial budget
CONFIRM_BUDGET = "sweep.confirm_budget"  # study user attribute: the confirmation's trials
SETTINGS = "sweep.settings"  # study user attribute: the trial settings it was created with


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
    each launch, worker and pool, and by ``sweep status --repair``. Skipped on the way out of a
    worker that the store's ``CredentialsRefused`` stops (called from a ``finally``): the store
    would refuse this write too, and the worker's one line has said so."""
    if isinstance(sys.exc_info()[1], CredentialsRefused):
        return  # the next launch writes it
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
