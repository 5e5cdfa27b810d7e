"""``sweep status``: counts per state, running trials with their worker and heartbeat, stale
MLflow runs; ``--repair`` reconciles the stores (the rules live in ``bookkeeping``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from sweep.orchestration.bookkeeping import (BUDGET, Reconciled, budget_used, reconcile,
                                             stale_runs, state_counts, update_parent_run)
from sweep.orchestration.checkpoints import waiting_with_checkpoint
from sweep.orchestration.completeness import Completeness, check, replay_spool
from sweep.orchestration.tracking import Tracker


RECORD_INCOMPLETE = 3  # exit status: MLflow lacks points, or points wait in a spool or were set aside


@dataclass
class StatusResult:
    text: str
    exit_code: int


def exit_code(record: Completeness | None) -> int:
    """``sweep status``'s exit status: 0 all well; 3 (``RECORD_INCOMPLETE``) when the MLflow
    record is incomplete. The one place that decides it."""
    if record is not None and not record.complete:
        return RECORD_INCOMPLETE
    return 0


def show_status(study: str, storage_url: str, tracking_uri: str,
                repair: bool = False) -> StatusResult:
    """``sweep status``: the status text of a stored study, after reconciling it with
    ``repair``, and its exit status (``exit_code``). Creates no store."""
    loaded, tracker, experiment_id = open_for_status(study, storage_url, tracking_uri)
    replayed: list[str] = []
    if repair and tracker is not None:  # first: a replayed run's end beats a repair's guess
        replay_spool(tracker, replayed.append)
    fixed = reconcile(loaded, tracker, experiment_id) if repair else None
    if repair and tracker is not None:
        update_parent_run(loaded, tracker, experiment_id)
    lines, record = status_lines(loaded, tracker, experiment_id, fixed)
    return StatusResult("\n".join([*replayed, *lines]), exit_code(record))

def heartbeat_ages(study: optuna.Study) -> dict[int, float]:
    """Seconds since the last heartbeat of each RUNNING trial, by trial id (RDB storages only)."""
    storage = study._storage
    if not isinstance(storage, optuna.storages.RDBStorage):
        return {}
    import sqlalchemy
    from optuna.storages._rdb import models

    session = storage.scoped_session()
    try:
        now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
        rows = (session.query(models.TrialHeartbeatModel.trial_id, models.TrialHeartbeatModel.heartbeat)
                .join(models.TrialModel, models.TrialModel.trial_id == models.TrialHeartbeatModel.trial_id)
                .filter(models.TrialModel.study_id == study._study_id)
                .filter(models.TrialModel.state == TrialState.RUNNING).all())
        return {tid: (now - beat.replace(tzinfo=None)).total_seconds() for tid, beat in rows}
    finally:
        session.close()


def status_text(study: optuna.Study, tracker: Tracker | None, experiment_id: str | None,
                repaired: Reconciled | None = None) -> str:
    """Counts per state, running trials with worker host/pid and heartbeat age, stale runs."""
    return "\n".join(status_lines(study, tracker, experiment_id, repaired)[0])


def status_lines(study: optuna.Study, tracker: Tracker | None, experiment_id: str | None,
                 repaired: Reconciled | None = None) -> tuple[list[str], Completeness | None]:
    """``status_text``'s lines, and the MLflow record's completeness (None: no store)."""
    c = state_counts(study)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    budget = study.user_attrs.get(BUDGET)
    lines = [f"study {study.study_name!r}: {budget_used(study)}/{budget if budget else '?'} trials "
             f"used; complete {c['complete']}, pruned {c['pruned']}, diverged {c['diverged']}, "
             f"failed {c['failed']}, running {c['running']}, waiting {waiting}"]
    resumable = waiting_with_checkpoint(study.get_trials(deepcopy=False))
    if resumable:
        lines.append(f"  {len(resumable)} waiting trial(s) resume from a checkpoint: "
                     + ", ".join(f"#{n} ({epochs} epochs done)" for n, epochs in resumable))
    ages = heartbeat_ages(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        age = ages.get(t._trial_id)
        started = t.datetime_start
        since = (dt.datetime.now() - started).total_seconds() if started else None
        lines.append(f"  running #{t.number}: host {t.user_attrs.get('host', '?')} pid "
                     f"{t.user_attrs.get('pid', '?')}, heartbeat "
                     f"{f'{age:.0f} s ago' if age is not None else 'n/a'}"
                     + (f", started {since:.0f} s ago" if since is not None else ""))
    if repaired is not None:
        lines.append(f"repaired: failed {len(repaired.failed_trials)} stale trial(s)"
                     + (f" {repaired.failed_trials}" if repaired.failed_trials else "")
                     + f", ended {len(repaired.ended_runs)} stale MLflow run(s)")
    if tracker is not None:
        stale = stale_runs(study, tracker, experiment_id)
        for run, trial in stale:
            lines.append(f"  stale MLflow run {run.info.run_id} (trial "
                         f"#{run.data.tags.get('sweep.trial_number', '?')} is "
                         f"{trial.state.name if trial else 'unknown'}) is still RUNNING")
        if stale:
            lines.append("fix: sweep status --repair (ends those runs as FAILED)")
        record = check(tracker, experiment_id)
        lines += record.lines(study.study_name)
        return lines, record
    return lines, None


def open_for_status(study: str, storage_url: str, tracking_uri: str):
    """(study, tracker or None, experiment id or None) for ``sweep status``; creates no store.

    ``study`` is a study name, or a study file (its ``name`` is used)."""
    from sweep.orchestration.storage import load_existing_study, sqlite_path

    if study.endswith((".yaml", ".yml")) or "/" in study:
        from sweep.study.spec import load_study

        study = load_study(study).name
    loaded = load_existing_study(study, storage_url)
    tracker, experiment_id = None, None
    mlflow_path = sqlite_path(tracking_uri)
    if mlflow_path is None or mlflow_path.is_file():
        tracker = Tracker(tracking_uri)
        experiment_id = tracker.experiment_id(study, create=False)
    return loaded, tracker, experiment_id
