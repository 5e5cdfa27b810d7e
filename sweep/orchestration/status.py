"""Reconciling a study with what really happened to its workers, and ``sweep status``.

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

import datetime as dt
import os
import socket
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from sweep.views.console import counts
from sweep.orchestration.tracking import STATE, Tracker
from sweep.orchestration.worker import FINISHED, budget_used, fail_stale, retry_later

_RUN_STATUS = {TrialState.COMPLETE: "FINISHED"}  # any other finished state -> FAILED


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
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and isinstance(pid, int) and pid != me \
                and not _pid_alive(pid):
            try:  # the attribute first: a finished trial takes no more attributes
                study._storage.set_trial_user_attr(t._trial_id, "error", "worker died")
                if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    retry_later(study, study._storage.get_trial(t._trial_id))
                    failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker got there first
    return failed


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
    out = []
    for run in running:
        if run.data.tags.get("optuna.study_name") != study.study_name:
            continue
        number = run.data.tags.get("sweep.trial_number")
        trial = trials.get(int(number)) if number and number.isdigit() else None
        if trial is None or trial.state in FINISHED:
            out.append((run, trial))
    return out


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


def reconcile(study: optuna.Study, tracker: Tracker, experiment_id: str | None) -> Reconciled:
    """Fail dead workers' trials, then end MLflow runs whose trial is finished."""
    failed = fail_dead_trials(study)
    return Reconciled(failed, end_stale_runs(study, tracker, experiment_id))


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
    c = counts(study)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    budget = study.user_attrs.get("sweep.budget")
    lines = [f"study {study.study_name!r}: {budget_used(study)}/{budget if budget else '?'} trials "
             f"used; complete {c['complete']}, pruned {c['pruned']}, diverged {c['diverged']}, "
             f"failed {c['failed']}, running {c['running']}, waiting {waiting}"]
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
    return "\n".join(lines)


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
